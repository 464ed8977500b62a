"""The functions behind the ``predict_baseline`` methods of :mod:`comtip.predict.registry`, and
the context they read.

Every method predicts the normalised (log1p CP10k) expression of all panel genes for the spots of
one test sample, from what the training samples teach it; nothing here looks at test expression.

``retrieval_mean_comtip`` and ``retrieval_weighted_comtip`` are BLEEP's and mclSTExp's
*prediction rules* applied to CoMTIP's embeddings: they measure CoMTIP's embedding space, not
BLEEP or mclSTExp (they were called ``bleep_comtip`` and ``mclstexp_comtip`` before; the config
check names the new names). ``retrieval_weighted_comtip`` follows mclSTExp's ``evel_her2st.py`` in
k, the weights and the roles (expression-side references queried with image embeddings), without
mclSTExp's spot context (learned x/y position embeddings and a Transformer over the spots of a
batch). Optional and ours: ``evaluate.retrieval_weighted_smooth_query`` averages each test image
embedding with its spatial neighbours' before retrieval.

``bleep`` is BLEEP itself: its own bi-encoder trained by rule ``train_bleep``
(:mod:`comtip.baselines`) on the same training spots and budget as CoMTIP, its embeddings
written by ``embed_bleep`` in the keys read here (``sentence_embeddings`` = BLEEP's expression
embeddings), and BLEEP's prediction: L2-normalised, top-``bleep_k`` training spots by dot
product, mean expression. ``mclstexp`` is mclSTExp itself, likewise (rules ``train_mclstexp``,
``embed_mclstexp``; ``sentence_embeddings`` = its spot encoder's embeddings), predicting by
mclSTExp's rule (top-``mclstexp_top_k``, weights 1 / L1²). Details in ``docs/evaluation.md``.

The encoder of ``ridge_{encoder}`` is ``comtip`` (the pretrained checkpoint) or ``random`` (same
architecture, random initialisation, seeded): the difference between the two is what pretraining
bought. Cross-modal retrieval runs on aligned encoders only (``comtip``, ``bleep``,
``mclstexp``): a random
encoder's image and sentence spaces are not aligned, so retrieval from it has no meaning.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np

from comtip._core.errors import ConfigError, PipelineInputError
from comtip._core.rows import Rows, open_rows
from comtip.predict.baselines import (
    bleep_retrieval,
    mclstexp_retrieval,
    mean_baseline,
    spatial_neighbour_mean,
)
from comtip.predict.registry import method as registry_method
from comtip.predict.ridge import load_ridge_probe
from comtip.predict.writers import write_prediction_h5ad

log = logging.getLogger(__name__)

# The ``evaluate.*`` settings the methods read, with the schema's defaults (a test keeps them equal).
DEFAULT_SETTINGS: dict[str, Any] = {
    "bleep_k": 50,
    "mclstexp_top_k": 200,
    "retrieval_mean_k": 50,
    "retrieval_weighted_k": 200,
    "retrieval_weighted_smooth_query": False,
    "ridge_pca_dim": 256,
    "zeroshot_grid": 16,
    "zeroshot_grid_kind": "quantile",
    "zeroshot_prior": "training",
    "zeroshot_temperature": None,
}


@dataclass(frozen=True)
class PredictionContext:
    """What a method may read for one test sample: the rule's input files by role and the
    ``evaluate`` settings (missing ones take :data:`DEFAULT_SETTINGS`).

    ``train_value_files`` hold ``panel_values`` and ``train_embedding_files`` the embeddings of the
    training spots, stacked in the given order: the one stacked file of each that the rule reads
    (:mod:`comtip.predict.reference`), or the per-sample files.

    The training arrays are :class:`~comtip._core.rows.Rows`: from the one stacked file (what the
    workflow passes) they are never loaded, only read in chunks or by row with ``preadv``, so a
    method's memory does not grow with the cohort; several files (tests) are concatenated in
    memory. The test sample's arrays are loaded on first use; rows of its embeddings and spots
    are checked to be its ``gene_sentences.npz`` rows in order.
    """

    spots_h5ad: str | Path
    test_sentences: str | Path
    train_value_files: Sequence[str | Path]
    train_embedding_files: Sequence[str | Path] = ()
    test_embedding: str | Path | None = None
    ridge_probe: str | Path | None = None
    checkpoint: str | Path | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)
    sample: str | None = None
    device: str = "cpu"

    def setting(self, key: str) -> Any:
        return self.settings[key] if key in self.settings else DEFAULT_SETTINGS[key]

    @functools.cached_property
    def _test(self) -> dict[str, np.ndarray]:
        with np.load(self.test_sentences) as npz:
            return {key: npz[key] for key in ("barcodes", "panel_genes")}

    @property
    def barcodes(self) -> np.ndarray:
        return self._test["barcodes"]

    @property
    def genes(self) -> list[str]:
        return list(self._test["panel_genes"])

    @functools.cached_property
    def train_values(self) -> Rows:
        """(training spots, panel genes) normalised values of every training sample, stacked."""
        return _stack(self.train_value_files, "panel_values")

    def train_stack(self, key: str) -> Rows:
        """``key`` of the training samples' embeddings, stacked in sample order."""
        return _stack(self.train_embedding_files, key)

    def test_rows(self, key: str) -> np.ndarray:
        """``key`` of the test sample's embeddings, refused unless its rows are the test spots in order."""
        data = np.load(self.test_embedding)
        if not np.array_equal(np.asarray(data["barcodes"], dtype=str), np.asarray(self.barcodes, dtype=str)):
            raise PipelineInputError(
                "embedding rows are not the test sample's spots in gene_sentences.npz order",
                sample=self.sample,
                path=self.test_embedding,
            )
        return data[key]

    def spot_xy(self) -> np.ndarray:
        """Test spot centres (full-resolution px) from ``spots.h5ad``, checked to be the test rows."""
        spots = ad.read_h5ad(self.spots_h5ad, backed="r")
        try:
            if not np.array_equal(np.asarray(spots.obs_names, dtype=str), np.asarray(self.barcodes, dtype=str)):
                raise PipelineInputError(
                    "spots are not the test sample's gene_sentences.npz rows", sample=self.sample, path=self.spots_h5ad
                )
            return np.asarray(spots.obsm["spatial"], dtype=np.float64)
        finally:
            spots.file.close()

    def retrieval_k(self, key: str) -> int:
        """``evaluate.{key}``, refused unless 1 <= k <= the number of training spots."""
        k, n_train = self.setting(key), len(self.train_values)
        if not 1 <= k <= n_train:
            raise ConfigError(
                f"config key 'evaluate.{key}' = {k}: retrieval needs 1 <= k <= the number of training spots ({n_train})"
            )
        return k


def _stack(npzs: Sequence[str | Path], key: str) -> Rows:
    """``key`` of one stacked file, read where it lies; of several files, concatenated in memory."""
    if len(npzs) == 1:
        return open_rows(npzs[0], key)
    return Rows(np.concatenate([np.load(p)[key] for p in npzs], axis=0))


def mean(ctx: PredictionContext) -> np.ndarray:
    return mean_baseline(ctx.train_values, len(ctx.barcodes))


def ridge(ctx: PredictionContext) -> np.ndarray:
    """The HEST probe fitted once on the training samples (rule ``fit_ridge``, with intercept),
    refused unless it was fitted on the test sample's panel genes with ``evaluate.ridge_pca_dim``."""
    probe, info = load_ridge_probe(ctx.ridge_probe)
    genes = [str(g) for g in info["panel_genes"]]
    if genes != [str(g) for g in ctx.genes]:
        raise PipelineInputError(
            f"the ridge probe was fitted on {len(genes)} panel genes that are not the "
            f"{len(ctx.genes)} panel genes of {Path(ctx.test_sentences).absolute()} in order; refit it "
            "(rule fit_ridge) on gene sentences built from the same gene_panel.tsv",
            sample=ctx.sample,
            path=ctx.ridge_probe,
        )
    if int(info["pca_dim"]) != ctx.setting("ridge_pca_dim"):
        raise PipelineInputError(
            f"the ridge probe was fitted with pca_dim {int(info['pca_dim'])}, the config says "
            f"evaluate.ridge_pca_dim = {ctx.setting('ridge_pca_dim')}; refit it (rule fit_ridge)",
            sample=ctx.sample,
            path=ctx.ridge_probe,
        )
    return probe.predict(ctx.test_rows("features"))


def _mean_of_top_k(ctx: PredictionContext, key: str) -> np.ndarray:
    """BLEEP's "average": test image embeddings against the training spots' expression-side
    (sentence) embeddings, both L2-normalised, mean expression of the top ``evaluate.{key}``."""
    k = ctx.retrieval_k(key)
    return bleep_retrieval(
        ctx.train_stack("sentence_embeddings"),
        ctx.train_values,
        ctx.test_rows("image_embeddings"),
        k=k,
        method="average",
    )


def retrieval_mean(ctx: PredictionContext) -> np.ndarray:
    return _mean_of_top_k(ctx, "retrieval_mean_k")


def bleep(ctx: PredictionContext) -> np.ndarray:
    return _mean_of_top_k(ctx, "bleep_k")


def retrieval_weighted(ctx: PredictionContext) -> np.ndarray:
    k = ctx.retrieval_k("retrieval_weighted_k")
    query = ctx.test_rows("image_embeddings")
    if ctx.setting("retrieval_weighted_smooth_query"):
        query = spatial_neighbour_mean(query, ctx.spot_xy())
    return mclstexp_retrieval(ctx.train_stack("sentence_embeddings"), ctx.train_values, query, k=k)


def mclstexp(ctx: PredictionContext) -> np.ndarray:
    """mclSTExp's ``evel_her2st.py``: test image embeddings against the training spots' spot
    embeddings, top ``evaluate.mclstexp_top_k`` by cosine, weights 1 / L1 distance²."""
    k = ctx.retrieval_k("mclstexp_top_k")
    return mclstexp_retrieval(
        ctx.train_stack("sentence_embeddings"), ctx.train_values, ctx.test_rows("image_embeddings"), k=k
    )


def zeroshot(ctx: PredictionContext) -> np.ndarray:
    # torch is imported here, by the one method that runs a model: the others' jobs stay ~0.9 GB
    # smaller without it (benchmarks/bench_cohort.py)
    from comtip.predict.zeroshot import zero_shot, zero_shot_grid_and_prior
    from comtip.training.checkpoint import load_pretrained

    model, info = load_pretrained(ctx.checkpoint)
    grid, prior = zero_shot_grid_and_prior(
        ctx.train_values,
        ctx.setting("zeroshot_grid"),
        grid=ctx.setting("zeroshot_grid_kind"),
        prior=ctx.setting("zeroshot_prior"),
    )
    return zero_shot(
        model,
        ctx.test_rows("image_embeddings"),
        ctx.genes,
        grid,
        np.asarray(info["bin_edges"], np.float32),
        temperature=ctx.setting("zeroshot_temperature"),
        prior=prior,
        device=ctx.device,
    )


def predict_with_method(method: str, ctx: PredictionContext, out_h5ad: str | Path) -> np.ndarray:
    """Predict all panel genes of one test sample with ``method`` (a ``predict_baseline`` entry of
    the registry); write the prediction h5ad and return the prediction."""
    entry = registry_method(method)
    if entry.rule != "predict_baseline":
        raise ValueError(f"method {method!r} runs in rule {entry.rule}, not through predict_with_method")
    pred = entry.resolve()(ctx)
    log.info("%s: predicted %d spots x %d genes", method, *pred.shape)
    write_prediction_h5ad(out_h5ad, pred, ctx.genes, ctx.spots_h5ad, method, barcodes=ctx.barcodes)
    return pred

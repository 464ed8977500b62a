"""The prediction methods compared by the pipeline, each as one function the rules call.

Every method predicts the normalised (log1p CP10k) expression of all panel genes for the spots of
one test sample, from what the training samples teach it; nothing here looks at test expression.

| method | what it is |
|---|---|
| ``mean`` | mean expression of the training spots (the floor any method must beat) |
| ``ridge_{encoder}`` | HEST-Benchmark probe on frozen image features: StandardScaler → PCA 256 → ridge |
| ``bleep_{encoder}`` | BLEEP retrieval: average expression of the top-k training spots whose *sentence* embedding is closest to the test image embedding |
| ``mclstexp_{encoder}`` | mclSTExp retrieval: the top-k (200) training spots by the same cosine, weighted by 1 / L1 distance² |
| ``zeroshot`` | CoMTIP zero-shot: image embedding scored against "gene at value v" sentences, with a training value prior |
| ``finetune_{mode}`` | an expression head on the pretrained image encoder (``comtip.finetune``) |

``mclstexp_`` is faithful to mclSTExp's ``evel_her2st.py`` in k, the weights and the roles
(expression-side references queried with image embeddings). It is not mclSTExp in its spot
context: mclSTExp embeds each reference spot's expression with learned x/y position embeddings
and a Transformer over the spots of a batch (a trained model property); ours are CoMTIP's
per-spot sentence embeddings, with no position and no neighbours. Optional and ours, not
mclSTExp's: ``evaluate.mclstexp_smooth_query`` averages each test image embedding with its
spatial neighbours' before retrieval. Details in ``docs/evaluation.md``.

``{encoder}`` is ``comtip`` (the pretrained checkpoint) or ``random`` (same architecture, random
initialisation, seeded): the difference between the two is what pretraining bought. The
retrieval methods (``bleep_``, ``mclstexp_``) run on ``comtip`` only: a random encoder's image and
sentence spaces are not aligned, so cross-modal retrieval from it has no meaning.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import torch

from comtip.atomic import atomic_path
from comtip.baselines import bleep_retrieval, hest_ridge, mclstexp_retrieval, mean_baseline, spatial_neighbour_mean
from comtip.inference import image_embeddings, image_features, zero_shot, zero_shot_grid_and_prior
from comtip.method_names import BASELINE_METHODS, ENCODERS  # noqa: F401 (re-exported)
from comtip.model import CoMTIP, ModelConfig
from comtip.predict import write_prediction_h5ad
from comtip.training.checkpoint import load_pretrained

log = logging.getLogger(__name__)


def load_encoder(checkpoint: str | Path, encoder: str, seed: int) -> tuple[CoMTIP, dict]:
    """The pretrained model, or a seeded random initialisation of the same architecture."""
    model, info = load_pretrained(checkpoint)
    if encoder == "random":
        torch.manual_seed(seed)
        model = CoMTIP(ModelConfig.from_dict(info["model_config"]), info["vocabulary"]).eval()
    elif encoder != "comtip":
        raise ValueError(f"encoder must be one of {ENCODERS}, got {encoder!r}")
    return model, info


def embed_sample(checkpoint: str | Path, patches_npy: str | Path, sentences_npz: str | Path, out_npz: str | Path,
                 *, encoder: str, seed: int, batch_size: int = 128, device: str = "cpu") -> None:
    """Image features (pre-projection), image embeddings and sentence embeddings of one sample."""
    model, info = load_encoder(checkpoint, encoder, seed)
    image_size = int(info["model_config"]["image_size"])
    patches = np.load(patches_npy, mmap_mode="r")
    sentences = np.load(sentences_npz)
    if list(sentences["vocabulary"]) != list(info["vocabulary"]):
        raise ValueError(f"{Path(sentences_npz).absolute()}: gene vocabulary differs from the checkpoint's")
    features = image_features(model, patches, image_size, batch_size=batch_size, device=device)
    embeddings = image_embeddings(model, patches, image_size, batch_size=batch_size, device=device)
    text = []
    with torch.no_grad():
        for start in range(0, len(patches), batch_size):
            part = slice(start, start + batch_size)
            text.append(model.encode_sentences(
                torch.as_tensor(sentences["gene_ids"][part], dtype=torch.long, device=device),
                torch.as_tensor(sentences["values"][part], dtype=torch.float32, device=device),
                torch.as_tensor(sentences["bins"][part], dtype=torch.long, device=device),
                torch.as_tensor(sentences["pad"][part], dtype=torch.bool, device=device)).cpu().numpy())
    with atomic_path(out_npz) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, barcodes=sentences["barcodes"], features=features.astype(np.float32),
                 image_embeddings=embeddings.astype(np.float32),
                 sentence_embeddings=np.concatenate(text).astype(np.float32))


def _stack(npzs: Sequence[str | Path], key: str) -> np.ndarray:
    return np.concatenate([np.load(p)[key] for p in npzs], axis=0)


def _test_rows(npz: str | Path, key: str, barcodes: np.ndarray) -> np.ndarray:
    """``key`` of the test sample's embeddings, refused unless its rows are the test spots in order."""
    data = np.load(npz)
    if not np.array_equal(np.asarray(data["barcodes"], dtype=str), np.asarray(barcodes, dtype=str)):
        raise ValueError(f"{Path(npz).absolute()}: embedding rows are not the test sample's spots in "
                         "gene_sentences.npz order")
    return data[key]


def _check_k(key: str, k: int, n_train: int) -> None:
    if not 1 <= k <= n_train:
        raise ValueError(f"config key 'evaluate.{key}' = {k}: retrieval needs 1 <= k <= the number of "
                         f"training spots ({n_train})")


def _spot_xy(spots_h5ad: str | Path, barcodes: np.ndarray) -> np.ndarray:
    """Spot centres (full-resolution px) of ``spots_h5ad``, checked to be the rows of ``barcodes``."""
    spots = ad.read_h5ad(spots_h5ad, backed="r")
    try:
        if not np.array_equal(np.asarray(spots.obs_names, dtype=str), np.asarray(barcodes, dtype=str)):
            raise ValueError(f"{Path(spots_h5ad).absolute()}: spots are not the test sample's gene_sentences.npz rows")
        return np.asarray(spots.obsm["spatial"], dtype=np.float64)
    finally:
        spots.file.close()


def predict_with_method(method: str, *, spots_h5ad: str | Path, test_sentences: str | Path,
                        train_sentences: Sequence[str | Path], out_h5ad: str | Path,
                        train_embeddings: Sequence[str | Path] = (), test_embedding: str | Path | None = None,
                        checkpoint: str | Path | None = None, bleep_k: int = 50, mclstexp_k: int = 200,
                        mclstexp_smooth_query: bool = False, ridge_pca_dim: int = 256,
                        zeroshot_grid: int = 16, zeroshot_temperature: float | None = None,
                        zeroshot_grid_kind: str = "quantile", zeroshot_prior: str = "training",
                        device: str = "cpu") -> np.ndarray:
    """Predict all panel genes of one test sample with ``method``; write the prediction h5ad.

    Retrieval methods: ``bleep_*`` averages the top-``bleep_k`` training spots, ``mclstexp_*``
    weights the top-``mclstexp_k`` by 1 / L1²; both rank training *sentence* embeddings against
    the test *image* embeddings. ``mclstexp_smooth_query`` first averages each test image
    embedding with its spatial neighbours' (``spatial_neighbour_mean`` on the test spots'
    ``obsm["spatial"]``). ``zeroshot`` takes its value grid (``zeroshot_grid`` points, kind
    ``zeroshot_grid_kind``) and value prior (``zeroshot_prior``) from the training values only.
    """
    test = np.load(test_sentences)
    genes = list(test["panel_genes"])
    train_values = _stack(train_sentences, "panel_values")
    n_test = len(test["barcodes"])
    if method == "mean":
        pred = mean_baseline(train_values, n_test)
    elif method.startswith("ridge_"):
        pred = hest_ridge(_stack(train_embeddings, "features"), train_values,
                          _test_rows(test_embedding, "features", test["barcodes"]), pca_dim=ridge_pca_dim,
                          fit_intercept=True)
    elif method.startswith("bleep_"):
        _check_k("bleep_k", bleep_k, len(train_values))
        pred = bleep_retrieval(_stack(train_embeddings, "sentence_embeddings"), train_values,
                               _test_rows(test_embedding, "image_embeddings", test["barcodes"]), k=bleep_k,
                               method="average")
    elif method.startswith("mclstexp_"):
        _check_k("mclstexp_k", mclstexp_k, len(train_values))
        query = _test_rows(test_embedding, "image_embeddings", test["barcodes"])
        if mclstexp_smooth_query:
            query = spatial_neighbour_mean(query, _spot_xy(spots_h5ad, test["barcodes"]))
        pred = mclstexp_retrieval(_stack(train_embeddings, "sentence_embeddings"), train_values, query,
                                  k=mclstexp_k)
    elif method == "zeroshot":
        model, info = load_pretrained(checkpoint)
        grid, prior = zero_shot_grid_and_prior(train_values, zeroshot_grid, grid=zeroshot_grid_kind,
                                               prior=zeroshot_prior)
        pred = zero_shot(model, _test_rows(test_embedding, "image_embeddings", test["barcodes"]), genes, grid,
                         np.asarray(info["bin_edges"], np.float32), temperature=zeroshot_temperature, prior=prior,
                         device=device)
    else:
        raise ValueError(f"unknown method {method!r}")
    log.info("%s: predicted %d spots x %d genes", method, *pred.shape)
    write_prediction_h5ad(out_h5ad, pred, genes, spots_h5ad, method, barcodes=test["barcodes"])
    return pred

"""Gene panel (chosen on training samples only) and per-spot gene sentences.

A gene sentence is the set of (gene, value) tokens of one spot: the panel genes it expresses,
sorted by value, descending, capped at ``max_len``. Values are log1p of counts per 10,000
(library-size normalisation needs no statistics from other samples); value bins have edges fixed
on the training samples, so a value means the same bin in every sample.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from comtip._core.atomic import atomic_path, atomic_paths
from comtip._core.errors import PipelineInputError
from comtip.data.gene_stats import (
    ExactQuantiles,
    GeneMoments,
    normalised_csr,
    read_normalised,
    seurat_dispersion_norm,
)

log = logging.getLogger(__name__)

PANEL_METHODS = ("hvg", "heg", "hvg_heg", "svg")


def normalise(counts) -> np.ndarray:
    """log1p(counts / library size × 1e4), dense float32 (spots × genes)."""
    return normalised_csr(counts).toarray()


def _common_genes(paths: Sequence[str | Path]) -> pd.Index:
    common: pd.Index | None = None
    for path in paths:
        names = pd.Index(ad.read_h5ad(path, backed="r").var_names)
        common = names if common is None else common.intersection(names, sort=False)
    assert common is not None
    return common


def gene_statistics(train_h5ads: Sequence[str | Path]) -> pd.DataFrame:
    """Per-gene statistics of the genes common to all training samples, one sample in memory at a
    time (memory O(genes), not O(cohort)): ``mean``, ``variance`` (ddof 0) and ``spot_fraction`` of
    the normalised values, Seurat's normalised ``dispersion`` and both ranks (ties by gene order).
    ``attrs["n_spots"]`` is the number of training spots."""
    common = _common_genes(train_h5ads)
    moments = GeneMoments(len(common))
    for path in train_h5ads:
        moments.add(read_normalised(path, list(common))[1])
    stats = pd.DataFrame(
        {"gene": common, "mean": moments.mean, "variance": moments.variance, "spot_fraction": moments.spot_fraction}
    ).set_index("gene", drop=False)
    stats["dispersion"] = seurat_dispersion_norm(moments)
    stats["dispersion_rank"] = stats["dispersion"].rank(ascending=False, method="first").astype(int)
    stats["mean_rank"] = stats["mean"].rank(ascending=False, method="first").astype(int)
    stats.attrs["n_spots"] = moments.n_spots
    return stats


def select_genes(
    train_h5ads: Sequence[str | Path],
    out_panel: str | Path,
    out_bins: str | Path,
    *,
    n_genes: int = 250,
    method: str = "hvg_heg",
    explicit: Sequence[str] = (),
    heldout_fraction: float = 0.2,
    n_bins: int = 16,
    min_spots_fraction: float = 0.05,
    seed: int = 0,
    svg_neighbours: int = 6,
    svg_combine: str = "mean",
) -> pd.DataFrame:
    """Choose the panel on training samples only and fix the value-bin edges.

    Candidates are genes present in every training sample and expressed in at least
    ``min_spots_fraction`` of training spots. ``hvg`` ranks by Seurat's normalised dispersion
    (scanpy ``flavor="seurat"``), ``heg`` by mean normalised expression, ``hvg_heg``
    takes alternately from both rankings, ``svg`` ranks by Moran's I on the training slides
    (``svg_neighbours``-nearest-neighbour graph per slide, per-slide I combined by
    ``svg_combine``; :mod:`comtip.data.svg`), the panel table then gaining ``morans_i``,
    ``morans_i_slides`` and ``morans_i_rank``. ``explicit`` genes come first and must exist. A seeded
    ``heldout_fraction`` of the panel is marked ``heldout`` (never seen in pretraining).
    """
    if not train_h5ads:
        raise PipelineInputError("no training sample: gene selection needs at least one sample with split = train")
    if method not in PANEL_METHODS:
        raise ValueError(f"method must be one of {PANEL_METHODS}, got {method!r}")
    stats = gene_statistics(train_h5ads)
    missing = [g for g in explicit if g not in stats.index]
    if missing:
        raise PipelineInputError(
            f"explicit panel genes absent from some training sample: {missing[:10]}", path=train_h5ads[0]
        )
    candidates = stats[stats["spot_fraction"] >= min_spots_fraction]
    by_dispersion = list(candidates.sort_values("dispersion_rank").index)
    by_mean = list(candidates.sort_values("mean_rank").index)
    svg, by_morans = None, []
    if method == "svg":
        from comtip.data.svg import svg_statistics

        scored = list(dict.fromkeys([*explicit, *candidates.index]))  # explicit genes get their I too
        svg = svg_statistics(train_h5ads, scored, n_neighbours=svg_neighbours, combine=svg_combine)
        by_morans = list(svg.loc[list(candidates.index)].sort_values("morans_i_rank").index)
    order = {"hvg": [by_dispersion], "heg": [by_mean], "hvg_heg": [by_dispersion, by_mean], "svg": [by_morans]}[method]
    panel = list(dict.fromkeys(explicit))
    cursors = [0] * len(order)
    while len(panel) < n_genes and any(c < len(o) for c, o in zip(cursors, order)):
        for k, ranking in enumerate(order):
            while cursors[k] < len(ranking) and ranking[cursors[k]] in panel:
                cursors[k] += 1
            if cursors[k] < len(ranking) and len(panel) < n_genes:
                panel.append(ranking[cursors[k]])
                cursors[k] += 1
    if len(panel) < 2:
        raise PipelineInputError(
            f"only {len(panel)} genes pass the filters; lower genes.min_spots_fraction", path=train_h5ads[0]
        )
    if len(panel) < n_genes:
        log.warning("only %d genes pass the filters (asked for %d)", len(panel), n_genes)

    rng = np.random.default_rng(seed)
    n_heldout = int(round(heldout_fraction * len(panel)))
    heldout = set(rng.choice(panel, size=n_heldout, replace=False)) if n_heldout else set()
    table = stats.loc[panel, ["gene", "mean", "variance", "dispersion_rank", "mean_rank"]].reset_index(drop=True)
    table.insert(1, "rank", np.arange(1, len(panel) + 1))
    if svg is not None:
        for column in ("morans_i", "morans_i_slides", "morans_i_rank"):
            table[column] = svg.loc[panel, column].to_numpy()
    table["heldout"] = table["gene"].isin(heldout)

    edges = _bin_edges(train_h5ads, list(table.loc[~table["heldout"], "gene"]), n_bins)
    with atomic_paths(out_panel, out_bins) as (tmp_panel, tmp_bins):
        table.to_csv(tmp_panel, sep="\t", index=False)
        pd.DataFrame({"edge": edges}).to_csv(tmp_bins, sep="\t", index=False)
    log.info(
        "panel of %d genes (%d held out) from %d training samples, %d spots; %d value bins",
        len(table),
        len(heldout),
        len(train_h5ads),
        stats.attrs["n_spots"],
        len(edges) + 1,
    )
    return table


def _bin_edges(train_h5ads: Sequence[str | Path], genes: list[str], n_bins: int) -> np.ndarray:
    """Quantiles of the pretraining genes' non-zero training values (exact; two passes, one
    sample in memory at a time)."""
    quantiles = ExactQuantiles(np.linspace(0, 1, n_bins)[1:-1])
    for path in train_h5ads:
        quantiles.add_coarse(read_normalised(path, genes)[1].data)
    if quantiles.total == 0:
        raise PipelineInputError("pretraining genes are never expressed in the training samples", path=train_h5ads[0])
    quantiles.finish_coarse()
    for path in train_h5ads:
        quantiles.add_fine(read_normalised(path, genes)[1].data)
    return np.unique(quantiles.result())


def read_panel(path: str | Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", dtype={"gene": str})


def read_bin_edges(path: str | Path) -> np.ndarray:
    return pd.read_csv(path, sep="\t")["edge"].to_numpy(np.float32)


def value_bins(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin 0 for zero; 1..len(edges)+1 for positive values by the fixed edges."""
    bins = np.digitize(values, edges) + 1
    return np.where(values > 0, bins, 0).astype(np.int16)


def sentences_from_values(values: np.ndarray, edges: np.ndarray, max_len: int) -> dict[str, np.ndarray]:
    """Gene sentences from normalised values (spots × vocabulary genes), vectorised.

    Each row keeps its non-zero genes sorted by value (descending; ties by gene order), up to
    ``max_len``; the rest is padding (``pad`` True, gene id 0, value 0, bin 0).
    """
    n, g = values.shape
    length = min(max_len, g)
    order = np.argsort(-values, axis=1, kind="stable")[:, :length]
    picked = np.take_along_axis(values, order, axis=1)
    pad = picked <= 0
    return {
        "gene_ids": np.where(pad, 0, order).astype(np.int32),
        "values": np.where(pad, 0.0, picked).astype(np.float32),
        "bins": np.where(pad, 0, value_bins(picked, edges)).astype(np.int16),
        "pad": pad,
    }


def build_gene_sentences(
    spots_h5ad: str | Path,
    panel_tsv: str | Path,
    bins_tsv: str | Path,
    out_npz: str | Path,
    *,
    max_len: int = 128,
    sample: str | None = None,
) -> dict[str, np.ndarray]:
    """Write ``gene_sentences.npz`` for one sample (rows in spots.h5ad order)."""
    panel = read_panel(panel_tsv)
    edges = read_bin_edges(bins_tsv)
    barcodes, panel_sparse = read_normalised(spots_h5ad, list(panel["gene"]))
    panel_values = panel_sparse.toarray()
    names = pd.Index(ad.read_h5ad(spots_h5ad, backed="r").var_names)
    absent = [g for g in panel["gene"] if g not in names]
    if absent:
        log.warning(
            "[%s] %d panel genes are not measured in this sample (set to 0): %s", sample, len(absent), absent[:5]
        )
    vocab_mask = ~panel["heldout"].to_numpy(bool)
    arrays = sentences_from_values(panel_values[:, vocab_mask], edges, max_len)
    empty = arrays["pad"].all(axis=1)
    if empty.all():
        raise PipelineInputError("no spot expresses any pretraining gene", sample=sample, path=spots_h5ad)
    arrays.update(
        {
            "barcodes": np.asarray(barcodes, dtype=str),
            "vocabulary": panel.loc[vocab_mask, "gene"].to_numpy(dtype=str),
            "panel_genes": panel["gene"].to_numpy(dtype=str),
            "panel_values": panel_values,
        }
    )
    # uncompressed: pretraining memory-maps the members (comtip._core.npzmap), ~2.5 KB per spot
    with atomic_path(out_npz) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    log.info(
        "[%s] %d sentences, median length %d of at most %d; %d spots express no pretraining gene",
        sample,
        len(barcodes),
        int(np.median((~arrays["pad"]).sum(1))),
        arrays["pad"].shape[1],
        int(empty.sum()),
    )
    return arrays

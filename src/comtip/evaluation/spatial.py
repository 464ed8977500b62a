"""Spatial autocorrelation of the true and predicted maps: Moran's I per gene (squidpy).

A pathologist reads a predicted map for its pattern (a gradient, a tumour island), which a
per-spot correlation does not show: a method can correlate with the truth and still give a
speckled map, or a smooth map where the tissue is patchy. Moran's I of each map answers that: 1
= neighbouring spots alike (smooth, structured), about 0 = no spatial structure (noise;
its expectation is -1 / (N - 1)), negative = neighbours unlike (checkerboard).

The graph and the statistic are :mod:`comtip.data.spatial_graph`'s, shared with gene selection's
``genes.method: svg``: squidpy's k-nearest-neighbour spatial graph on the spots' level-0
coordinates with ``k`` = :data:`N_NEIGHBOURS` = 6 (on Visium's hexagonal lattice a spot's six
immediate neighbours; the same ``k`` at any spacing: Visium HD bins, pseudo-spots),
row-standardised weights, the analytic I (deterministic). I is NaN for a map constant over the
slide's spots (undefined; the mean baseline's maps), as the correlations are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from comtip._core.errors import PipelineInputError
from comtip.data.spatial_graph import N_NEIGHBOURS, graph_morans_i, knn_graph

MORAN_COLUMNS = ("morans_i_true", "morans_i_pred", "morans_i_diff")


def _spot_graph(values: np.ndarray, xy: np.ndarray, n_neighbours: int) -> ad.AnnData:
    return knn_graph(np.asarray(values, dtype=np.float64), xy, n_neighbours)


def morans_i(values: np.ndarray, xy: np.ndarray, *, n_neighbours: int = N_NEIGHBOURS) -> np.ndarray:
    """Moran's I of each column of ``values`` (N spots, G genes) over the spots at ``xy`` (N, 2)."""
    return graph_morans_i(_spot_graph(values, xy, n_neighbours))


def moran_table(
    truth: np.ndarray,
    preds: Mapping[str, np.ndarray],
    xy: np.ndarray,
    genes: Sequence[str],
    *,
    n_neighbours: int = N_NEIGHBOURS,
) -> pd.DataFrame:
    """One slide: per method and gene ``morans_i_true``, ``morans_i_pred`` and ``morans_i_diff``
    (= pred - true: > 0 a map smoother than the tissue's, < 0 a noisier one); one graph for all."""
    adata = _spot_graph(truth, xy, n_neighbours)
    if adata.n_vars != len(genes):
        raise ValueError(f"{adata.n_vars} columns but {len(genes)} gene names")
    true_i = graph_morans_i(adata)
    tables = []
    for method, pred in preds.items():
        pred = np.asarray(pred, dtype=np.float64)
        if pred.shape != adata.shape:
            raise ValueError(f"method {method!r}: predictions {pred.shape}, truth {adata.shape}")
        adata.layers["pred"] = pred
        pred_i = graph_morans_i(adata, "pred")
        tables.append(
            pd.DataFrame(
                {
                    "method": method,
                    "gene": list(genes),
                    "morans_i_true": true_i,
                    "morans_i_pred": pred_i,
                    "morans_i_diff": pred_i - true_i,
                }
            )
        )
    return pd.concat(tables, ignore_index=True)


def spot_coordinates(spots_h5ad: str | Path, truth_npz: str | Path, n_spots: int, *, sample: str) -> np.ndarray:
    """``obsm["spatial"]`` of ``spots.h5ad``, checked to be the truth's spots in its order."""
    spots = ad.read_h5ad(spots_h5ad, backed="r")
    try:
        if "spatial" not in spots.obsm:
            raise PipelineInputError('obsm["spatial"] is missing', sample=sample, path=spots_h5ad)
        xy = np.asarray(spots.obsm["spatial"], dtype=np.float64)
        barcodes = spots.obs_names.to_numpy(dtype=str)
    finally:
        spots.file.close()
    with np.load(truth_npz) as arrays:
        truth_barcodes = arrays["barcodes"].astype(str) if "barcodes" in arrays else None
    if len(xy) != n_spots or (truth_barcodes is not None and not np.array_equal(truth_barcodes, barcodes)):
        raise PipelineInputError(
            f"{len(xy)} spots here are not the {n_spots} spots of {Path(truth_npz).absolute()} in their order",
            sample=sample,
            path=spots_h5ad,
        )
    return xy


def add_morans_i(
    metrics: pd.DataFrame,
    summary: pd.DataFrame,
    truth: Mapping[str, np.ndarray],
    preds: Mapping[tuple[str, str], np.ndarray],
    spots_h5ads: Mapping[str, str | Path],
    truth_npzs: Mapping[str, str | Path],
    genes: Sequence[str],
    gene_sets: Mapping[str, Sequence[str]],
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The long metrics table with :data:`MORAN_COLUMNS` appended (per sample, method, gene), and
    the summary with ``morans_i_abs_diff_mean``: per slide the mean |pred - true| over the set's
    genes (NaN excluded), averaged over slides, as the other summary columns."""
    tables = []
    for sample in sorted({s for s, _ in preds}):
        if sample not in spots_h5ads:
            raise ValueError(f"no spots.h5ad for test sample {sample!r}")
        xy = spot_coordinates(spots_h5ads[sample], truth_npzs[sample], len(truth[sample]), sample=sample)
        by_method = {m: p for (s, m), p in preds.items() if s == sample}
        table = moran_table(truth[sample], by_method, xy, genes)
        table.insert(0, "sample", sample)
        tables.append(table)
    moran = pd.concat(tables, ignore_index=True)
    merged = metrics.merge(moran, on=["sample", "method", "gene"], how="left", validate="one_to_one")
    merged["abs_diff"] = merged["morans_i_diff"].abs()
    means = {}
    for set_name, set_genes in gene_sets.items():
        subset = merged[merged["gene"].isin(set(set_genes))]
        per_slide = subset.groupby(["method", "sample"])["abs_diff"].mean()
        for method, value in per_slide.groupby(level="method").mean().items():
            means[(method, set_name)] = value
    summary = summary.copy()
    summary["morans_i_abs_diff_mean"] = [
        means.get((m, g), np.nan) for m, g in zip(summary["method"], summary["gene_set"], strict=True)
    ]
    return merged.drop(columns="abs_diff"), summary

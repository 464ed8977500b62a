"""Spatially variable genes (``genes.method: svg``): Moran's I of each candidate gene on every
training slide, one slide in memory at a time, combined over slides.

Per slide: the log1p-CP10k values (those the panel, the sentences and the metrics use), sparse,
on the slide's ``n_neighbours``-nearest-neighbour graph of :mod:`comtip.data.spatial_graph`
(squidpy ``spatial_neighbors_knn`` + ``spatial_autocorr``, the evaluation's graph and statistic:
row-standardised weights, analytic I, deterministic). Over slides: the mean (or median) of the
per-slide I, each slide weighted equally. Moran's I is a within-slide statistic: one graph over
all slides (block-diagonal) would be dominated by the largest slides, and a pooled I of
per-slide z-scores would still weight slides by their spot count; the mean of per-slide I asks
"how spatially structured is this gene on a typical training slide", which is what a panel for
predicting unseen slides wants. A gene constant on a slide (never detected there) has no
spatial structure on it and counts as I = 0 there (squidpy returns NaN): a gene patterned on one
slide and absent from the rest does not outrank one patterned on all. The median is the robust
choice when one odd slide (a fold, a bubble) may dominate a gene's mean.

Memory: one slide's sparse counts, its normalised copy restricted to the candidates and the
graph (O(spots × k)); across slides one float per gene and slide (200 × 18,000 × 8 B = 29 MB).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from comtip._core.errors import PipelineInputError
from comtip._core.memory import release_freed_memory
from comtip.data.gene_stats import normalised_csr

log = logging.getLogger(__name__)

SVG_COMBINE = ("mean", "median")


def _sample_of(path: str | Path) -> str:
    """The sample's name: ``results/{sample}/spots.h5ad``'s folder."""
    return Path(path).parent.name


def slide_morans_i(path: str | Path, genes: Sequence[str], n_neighbours: int) -> np.ndarray:
    """Moran's I of ``genes`` on one slide's spots, NaN where a gene is constant on the slide."""
    from comtip.data.spatial_graph import graph_morans_i, knn_graph

    sample = _sample_of(path)
    adata = ad.read_h5ad(path)
    if "spatial" not in adata.obsm:
        raise PipelineInputError(
            'obsm["spatial"] (spot coordinates) is missing: needed by genes.method: svg', sample=sample, path=path
        )
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    if xy.shape != (adata.n_obs, 2) or not np.isfinite(xy).all():
        raise PipelineInputError(
            f'obsm["spatial"] must be finite (x, y) per spot: shape {xy.shape} for {adata.n_obs} spots',
            sample=sample,
            path=path,
        )
    if adata.n_obs <= n_neighbours:
        raise PipelineInputError(
            f"{adata.n_obs} spots: Moran's I on a {n_neighbours}-neighbour graph needs more (genes.svg_neighbours)",
            sample=sample,
            path=path,
        )
    columns = pd.Index(adata.var_names).get_indexer(pd.Index(genes))
    assert (columns >= 0).all(), "svg candidates are genes common to every training sample"
    values = normalised_csr(adata.X)[:, columns]
    del adata
    scores = graph_morans_i(knn_graph(values, xy, n_neighbours))
    del values
    # AnnData views and squidpy's copies sit in reference cycles: without a collection here each
    # slide's ~15 M-value copy stayed until Python's occasional full collection (measured:
    # +175 MB per 5,000-spot slide, 457 MB flat with it)
    gc.collect()
    release_freed_memory()
    return scores


def svg_statistics(
    train_h5ads: Sequence[str | Path], genes: Sequence[str], *, n_neighbours: int = 6, combine: str = "mean"
) -> pd.DataFrame:
    """Per gene (index, in ``genes`` order): ``morans_i`` (per-slide I combined by ``combine``,
    a slide where the gene is constant counting 0), ``morans_i_slides`` (slides where it is
    defined) and ``morans_i_rank`` (1 = most spatially structured; ties by gene order)."""
    if combine not in SVG_COMBINE:
        raise ValueError(f"combine must be one of {SVG_COMBINE}, got {combine!r}")
    per_slide = np.empty((len(train_h5ads), len(genes)))
    for row, path in enumerate(train_h5ads):
        per_slide[row] = slide_morans_i(path, genes, n_neighbours)
        log.info("svg: Moran's I of %d genes on %s", len(genes), _sample_of(path))
    defined = np.isfinite(per_slide)
    scores = np.where(defined, per_slide, 0.0)
    combined = scores.mean(axis=0) if combine == "mean" else np.median(scores, axis=0)
    table = pd.DataFrame(
        {"morans_i": combined, "morans_i_slides": defined.sum(axis=0)}, index=pd.Index(list(genes), name="gene")
    )
    table["morans_i_rank"] = table["morans_i"].rank(ascending=False, method="first").astype(int)
    return table

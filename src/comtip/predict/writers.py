"""Predicted expression as AnnData that scanpy / squidpy read like a measured Visium sample.

:func:`write_prediction_h5ad` writes the predictions of any method for the spots of a measured
sample, with the spots' coordinates and images copied from ``spots.h5ad`` so that
``sc.pl.spatial`` draws predicted and measured expression the same way. H&E-only slides
("virtual Visium"): :mod:`comtip.predict.slides`.

Values are on the scale the models are trained on: normalised log1p(counts / library × 1e4)
("log1p_cp10k"), stated in ``uns["comtip_prediction"]["scale"]``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from comtip._core.atomic import atomic_path
from comtip._core.errors import PipelineInputError
from comtip.data.barcodes import first_mismatch, value_at

log = logging.getLogger(__name__)

SCALE = "log1p_cp10k"
SCALE_DESCRIPTION = "log1p(counts / total counts of the spot * 1e4), as gene_sentences.npz panel_values"
# obs columns of spots.h5ad that describe where a spot is (not what was measured in it)
GEOMETRY_OBS = ("in_tissue", "array_row", "array_col")
TILE_OBS = ("row", "col", "tissue_fraction")


def check_prediction(pred: np.ndarray, genes: Sequence[str]) -> np.ndarray:
    pred = np.asarray(pred, dtype=np.float32)
    if pred.ndim != 2 or pred.shape[1] != len(genes):
        raise ValueError(f"predictions of shape {pred.shape} do not match {len(genes)} genes")
    if len(set(genes)) != len(genes):
        raise ValueError("gene names must be unique")
    if not np.isfinite(pred).all():
        raise ValueError(f"{int((~np.isfinite(pred)).sum())} predicted values are not finite")
    return pred


def write_prediction_h5ad(
    out_path: str | Path,
    pred: np.ndarray,
    genes: Sequence[str],
    spots_h5ad: str | Path,
    method: str,
    extra_uns: dict[str, Any] | None = None,
    *,
    barcodes: Sequence[str] | None = None,
) -> ad.AnnData:
    """Write the (N, G) predictions for the spots of ``spots_h5ad`` as an h5ad; return it.

    Rows of ``pred`` are the spots of ``spots_h5ad`` in its row order (the order of
    spot_patches.npy and gene_sentences.npz); ``barcodes``, when given (e.g. gene_sentences.npz
    ``barcodes``), must equal the spots' barcodes in that order, otherwise nothing is written.
    ``obsm["spatial"]``, ``uns["spatial"]`` (scale factors, low-res image), ``uns["comtip"]`` and
    the spot-geometry obs columns are copied, so the file plots like the measured sample.
    """
    pred = check_prediction(pred, genes)
    spots = ad.read_h5ad(spots_h5ad, backed="r")
    try:
        obs_names = pd.Index(spots.obs_names)
        if len(obs_names) != len(pred):
            raise PipelineInputError(f"{len(pred)} predicted rows for {len(obs_names)} spots", path=spots_h5ad)
        if barcodes is not None:
            given, expected = np.asarray(barcodes, dtype=str), obs_names.to_numpy(dtype=str)
            if len(given) != len(expected) or not np.array_equal(given, expected):
                first = first_mismatch(given, expected)
                raise PipelineInputError(
                    f"prediction rows are not aligned with the spots: row {first} is barcode "
                    f"{value_at(given, first)!r} in the predictions but {value_at(expected, first)!r} here "
                    f"({len(given)} vs {len(expected)} rows)",
                    path=spots_h5ad,
                )
        if "spatial" not in spots.obsm:
            raise PipelineInputError('obsm["spatial"] is missing', path=spots_h5ad)
        obs = spots.obs[[c for c in GEOMETRY_OBS if c in spots.obs]].copy()
        spatial = np.asarray(spots.obsm["spatial"], dtype=np.float64)
        uns = {key: spots.uns[key] for key in ("spatial", "comtip") if key in spots.uns}
    finally:
        spots.file.close()
    adata = ad.AnnData(X=pred, obs=obs, var=pd.DataFrame(index=pd.Index(list(genes), dtype=str)))
    adata.obsm["spatial"] = spatial
    adata.uns.update(uns)
    adata.uns["comtip_prediction"] = {
        "method": method,
        "scale": SCALE,
        "scale_description": SCALE_DESCRIPTION,
        "spots_h5ad": str(Path(spots_h5ad).absolute()),
        **(extra_uns or {}),
    }
    with atomic_path(out_path) as tmp:
        adata.write_h5ad(tmp)
    return adata

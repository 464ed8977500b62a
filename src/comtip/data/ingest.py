"""Ingest one sample: its Space Ranger run read into ``spots.h5ad`` with the slide's geometry."""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad

from comtip._core.atomic import atomic_path
from comtip._core.errors import PipelineInputError
from comtip.io.readers import open_slide
from comtip.io.slide import resolve_mpp
from comtip.io.spaceranger import read_spaceranger

log = logging.getLogger(__name__)


def ingest_sample(
    outs_dir: str | Path,
    slide_path: str | Path,
    out_h5ad: str | Path,
    *,
    sample: str,
    mpp: float | None = None,
    spot_diameter_um: float = 55.0,
    min_counts: int = 1,
) -> ad.AnnData:
    """Read one sample, attach slide geometry (µm/px, size), check spots lie on the slide, write h5ad.

    µm/px comes from, in order: the sample sheet (``mpp``), the slide's metadata, the spot
    geometry (``spot_diameter_fullres`` px ↔ ``spot_diameter_um``).
    """
    adata = read_spaceranger(outs_dir, sample=sample, min_counts=min_counts)
    factors = adata.uns["spatial"][sample]["scalefactors"]
    with open_slide(slide_path, sample=sample) as slide:
        width, height = slide.dimensions
        value, source = resolve_mpp(
            sheet_mpp=mpp,
            slide_mpp=slide.metadata_mpp,
            spot_diameter_px=factors["spot_diameter_fullres"],
            spot_diameter_um=spot_diameter_um,
            sample=sample,
            path=slide_path,
        )
    xy = adata.obsm["spatial"]
    outside = (xy[:, 0] < 0) | (xy[:, 0] >= width) | (xy[:, 1] < 0) | (xy[:, 1] >= height)
    if outside.any():
        first = adata.obs_names[outside][0]
        raise PipelineInputError(
            f"{int(outside.sum())} of {adata.n_obs} in-tissue spots lie outside the slide "
            f"({width} x {height} px; first: {first!r} at x={xy[outside][0, 0]:.0f}, "
            f"y={xy[outside][0, 1]:.0f}); is this the full-resolution image Space Ranger was given?",
            sample=sample,
            path=slide_path,
        )
    log.info("[%s] %d in-tissue spots x %d genes; %.4f um/px from %s", sample, adata.n_obs, adata.n_vars, value, source)
    adata.uns["comtip"] = {
        "sample": sample,
        "mpp": float(value),
        "mpp_source": source,
        "spot_diameter_px": float(factors["spot_diameter_fullres"]),
        "spot_diameter_um": float(spot_diameter_um),
        "slide_path": str(Path(slide_path).absolute()),
        "slide_dimensions": [int(width), int(height)],
    }
    with atomic_path(out_h5ad) as tmp:
        adata.write_h5ad(tmp)
    return adata

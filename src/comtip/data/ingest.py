"""Ingest one sample: its Space Ranger run read into ``spots.h5ad`` with the slide's geometry."""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import numpy as np
from scipy.spatial import cKDTree

from comtip._core.atomic import atomic_path
from comtip._core.errors import PipelineInputError
from comtip.data.ingest_hd import hd_spots, read_hd_run
from comtip.io.layout import HD_DEFAULT_BIN_SIZE_UM, HD_POSITIONS, is_visium_hd
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
    spot_pitch_um: float = 100.0,
    mpp_source: str = "auto",
    mpp_tolerance: float = 0.1,
    min_counts: int = 1,
    bin_size_um: int | None = None,
    hd_pseudospot_um: float | None = None,
    hd_pseudospot_pitch_um: float | None = None,
) -> ad.AnnData:
    """Read one sample, attach slide geometry (µm/px, size), check spots lie on the slide, write h5ad.

    µm/px comes from the sample sheet (``mpp``), else the slide's metadata and the spot geometry
    (the pitch between neighbouring spots ↔ ``spot_pitch_um``), which must agree within
    ``mpp_tolerance`` unless ``mpp_source`` picks one (:func:`comtip.io.slide.resolve_mpp`).

    A Visium HD run (``outs/binned_outputs/``) is read at ``bin_size_um`` (default 16); its
    geometry is Space Ranger's ``microns_per_pixel`` and the spot diameter and pitch arguments
    are not used. Its units are the bins, or pseudo-spots of ``hd_pseudospot_um`` on a grid of
    ``hd_pseudospot_pitch_um`` (:mod:`comtip.data.pseudospots`).
    """
    if "cytassist_image" in Path(slide_path).name.lower():
        raise PipelineInputError(
            "this is the CytAssist's camera image (Space Ranger's spatial/cytassist_image.tiff: low "
            "resolution, not the histology); the slide is the microscope H&E given to Space Ranger "
            "with --image",
            sample=sample,
            path=slide_path,
        )
    hd_run, geometry = None, None
    if is_visium_hd(outs_dir):
        size = HD_DEFAULT_BIN_SIZE_UM if bin_size_um is None else int(bin_size_um)
        hd_run = read_hd_run(outs_dir, sample=sample, bin_size_um=size, tolerance=mpp_tolerance)
        factors, pitch_px = hd_run.factors, hd_run.bin_pitch_px
        geometry = (hd_run.mpp, f"Space Ranger's microns_per_pixel ({size} µm bins)")
    else:
        if bin_size_um is not None:
            raise PipelineInputError(
                f"the sample sheet sets bin_size_um {bin_size_um}, but this is not a Visium HD run "
                "(no binned_outputs/ folder); leave bin_size_um empty for Visium",
                sample=sample,
                path=outs_dir,
            )
        if (Path(outs_dir) / HD_POSITIONS).is_file():
            raise PipelineInputError(
                "this is one bin folder of a Visium HD run (spatial/tissue_positions.parquet): give the run's "
                "outs/ folder, the one holding binned_outputs/, as spaceranger_dir and the bin size as bin_size_um",
                sample=sample,
                path=outs_dir,
            )
        adata = read_spaceranger(outs_dir, sample=sample, min_counts=min_counts)
        factors = adata.uns["spatial"][sample]["scalefactors"]
        pitch_px = spot_pitch_px(adata.obsm["spatial"], adata.obs.get("array_col"), adata.obs.get("array_row"))
    with open_slide(slide_path, sample=sample) as slide:
        width, height = slide.dimensions
        slide_mpp = slide.metadata_mpp
        value, source = resolve_mpp(
            sheet_mpp=mpp,
            slide_mpp=slide_mpp,
            spot_diameter_px=factors["spot_diameter_fullres"],
            spot_diameter_um=spot_diameter_um,
            spot_pitch_px=pitch_px,
            spot_pitch_um=spot_pitch_um,
            prefer=mpp_source,
            tolerance=mpp_tolerance,
            sample=sample,
            path=slide_path,
            geometry_mpp=geometry,
        )
    if hd_run is None:
        unit = {
            "assay": "visium",
            "spot_shape": "circle",
            "spot_diameter_px": float(factors["spot_diameter_fullres"]),
            "spot_diameter_um": float(spot_diameter_um),
            "spot_pitch_px": float("nan") if pitch_px is None else float(pitch_px),
            "spot_pitch_um": float(spot_pitch_um),
        }
    else:
        adata, unit = hd_spots(
            hd_run,
            sample=sample,
            mpp=value,
            pseudospot_um=hd_pseudospot_um,
            pseudospot_pitch_um=hd_pseudospot_pitch_um,
            min_counts=min_counts,
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
        **unit,
        "slide_metadata_mpp": float("nan") if slide_mpp is None else float(slide_mpp),
        "slide_path": str(Path(slide_path).absolute()),
        "slide_dimensions": [int(width), int(height)],
    }
    with atomic_path(out_h5ad) as tmp:
        adata.write_h5ad(tmp)
    return adata


def spot_pitch_px(
    xy: np.ndarray, array_col: np.ndarray | None = None, array_row: np.ndarray | None = None
) -> float | None:
    """The centre-to-centre distance of neighbouring spots in full-resolution px, or None for
    fewer than three spots.

    With the spots' array coordinates, an affine fit of the positions on (col, row) gives the
    grid's step vectors (averaging out the jitter of spot centres detected one by one, as in
    legacy ST), and the pitch is the shortest step between grid neighbours that occur in the
    data: (2, 0) and (1, 1) on Visium's hexagonal grid, (1, 0) and (0, 1) on ST's square one.
    Without them, the median distance of each spot to its nearest other spot."""
    xy = np.asarray(xy, np.float64)
    if len(np.unique(xy, axis=0)) < 3:
        return None
    if array_col is None or array_row is None:
        distances, _ = cKDTree(xy).query(xy, k=2)
        return float(np.median(distances[:, 1]))
    grid = np.stack([np.asarray(array_col, np.int64), np.asarray(array_row, np.int64)], axis=1)
    design = np.column_stack([grid, np.ones(len(grid))])
    steps = np.linalg.lstsq(design, xy, rcond=None)[0][:2]  # rows: px per col step, per row step
    occupied = {tuple(g) for g in grid}
    lengths = [
        float(np.hypot(*(dc * steps[0] + dr * steps[1])))
        for dc in range(-2, 3)
        for dr in range(0, 3)
        if (dc, dr) > (0, 0) or dr > 0
        if any((c + dc, r + dr) in occupied for c, r in occupied)
    ]
    return min(lengths) if lengths else None

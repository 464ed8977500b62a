"""Ingest's Visium HD half: one bin size read, checked against Space Ranger's µm/px, and the
units written to ``spots.h5ad`` (the bins themselves, or pseudo-spots summed from them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from comtip._core.errors import PipelineInputError
from comtip.data.pseudospots import aggregate_bins, default_pitch_um
from comtip.io.layout import MATRIX_H5, SCALEFACTORS, hd_bin_dir
from comtip.io.spaceranger import qc_filter, spatial_uns
from comtip.io.visium_hd import read_hd_bins

# The affine fit of bin centres on array coordinates needs a sample, not every bin of a capture.
PITCH_FIT_BINS = 100_000


@dataclass(frozen=True)
class HDRun:
    """One bin size of a Visium HD run: in-tissue bins, every bin's positions, scale factors."""

    folder: Path
    bins: ad.AnnData
    positions: pd.DataFrame
    factors: dict
    bin_size_um: int
    bin_pitch_px: float | None

    @property
    def mpp(self) -> float:
        """Space Ranger's ``microns_per_pixel``: the geometry's µm/px for ``resolve_mpp``."""
        return float(self.factors["microns_per_pixel"])


def bin_pitch_px(positions: pd.DataFrame) -> float | None:
    """Centre-to-centre distance of neighbouring bins (full-res px): the shorter step vector of an
    affine fit of the centres on (array_col, array_row), on at most ``PITCH_FIT_BINS`` bins."""
    if len(positions) < 3:
        return None
    take = np.linspace(0, len(positions) - 1, min(len(positions), PITCH_FIT_BINS)).astype(np.int64)
    sample = positions.iloc[take]
    design = np.column_stack([sample["array_col"], sample["array_row"], np.ones(len(sample))]).astype(np.float64)
    if np.linalg.matrix_rank(design) < 3:
        return None
    xy = sample[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
    steps = np.linalg.lstsq(design, xy, rcond=None)[0][:2]
    return float(np.hypot(steps[:, 0], steps[:, 1]).min())


def read_hd_run(outs_dir: str | Path, *, sample: str, bin_size_um: int, tolerance: float) -> HDRun:
    """Read one bin size; the bins' pitch times ``microns_per_pixel`` must be ``bin_size_um``
    within ``tolerance`` (else the scale factors belong to another folder or run)."""
    folder = hd_bin_dir(outs_dir, bin_size_um)
    bins, positions, factors = read_hd_bins(outs_dir, sample=sample, bin_size_um=bin_size_um)
    pitch = bin_pitch_px(positions)
    run = HDRun(folder, bins, positions, factors, bin_size_um, pitch)
    if pitch is not None and abs(pitch * run.mpp / bin_size_um - 1) > tolerance:
        raise PipelineInputError(
            f"neighbouring bins are {pitch:.2f} px apart, which at microns_per_pixel {run.mpp:g} is "
            f"{pitch * run.mpp:.2f} µm, not the {bin_size_um} µm of the folder's bins (ingest.mpp_tolerance "
            f"{tolerance:.0%}): the scale factors and positions do not belong together",
            sample=sample,
            path=folder / SCALEFACTORS,
        )
    return run


def hd_spots(
    run: HDRun,
    *,
    sample: str,
    mpp: float,
    pseudospot_um: float | None,
    pseudospot_pitch_um: float | None,
    min_counts: int,
) -> tuple[ad.AnnData, dict]:
    """The units of ``spots.h5ad`` and their geometry for ``uns["comtip"]``: in-tissue bins
    (squares of ``bin_size_um``) when ``pseudospot_um`` is None, else pseudo-spots (discs of that
    diameter, :func:`comtip.data.pseudospots.aggregate_bins`) at the resolved ``mpp``."""
    factors = dict(run.factors)
    if pseudospot_um is None:
        adata = run.bins
        unit = {
            "spot_shape": "square",
            "spot_diameter_um": float(run.bin_size_um),
            "spot_diameter_px": float(factors["spot_diameter_fullres"]),
            "spot_pitch_um": float(run.bin_size_um),
            "spot_pitch_px": float("nan") if run.bin_pitch_px is None else run.bin_pitch_px,
        }
    else:
        pitch_um = default_pitch_um(pseudospot_um, pseudospot_pitch_um)
        adata = aggregate_bins(run.bins, run.positions, mpp=mpp, diameter_um=pseudospot_um, pitch_um=pitch_um)
        if adata.n_obs == 0:
            raise PipelineInputError(
                f"no pseudo-spot of {pseudospot_um:g} µm has a majority of in-tissue bins",
                sample=sample,
                path=run.folder / "spatial" / "tissue_positions.parquet",
            )
        unit = {
            "spot_shape": "circle",
            "spot_diameter_um": float(pseudospot_um),
            "spot_diameter_px": float(pseudospot_um / mpp),
            "spot_pitch_um": float(pitch_um),
            "spot_pitch_px": float(pitch_um / mpp),
        }
        factors["bin_diameter_fullres"] = factors["spot_diameter_fullres"]
        factors["spot_diameter_fullres"] = unit["spot_diameter_px"]  # what sc.pl.spatial draws
    adata = qc_filter(adata, min_counts=min_counts, sample=sample, path=run.folder / MATRIX_H5)
    adata.uns["spatial"] = spatial_uns(run.folder, factors, sample)
    unit.update(
        {
            "assay": "visium_hd",
            "bin_size_um": int(run.bin_size_um),
            "hd_pseudospot_um": float("nan") if pseudospot_um is None else float(pseudospot_um),
        }
    )
    return adata, unit

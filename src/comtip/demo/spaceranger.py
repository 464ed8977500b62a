"""Space Ranger ``outs/`` files of a simulated sample: the hires/lowres spatial images and
their scale factors, ``tissue_positions.csv``, the 10x feature-barcode matrix HDF5, and the
ground-truth ``truth.h5ad`` used by evaluations. Every file is written atomically.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from PIL import Image

from comtip._core.atomic import atomic_path
from comtip.demo.expression import _Programs, _Spots
from comtip.demo.params import HIRES_MAX_SIDE, LOWRES_MAX_SIDE, CellTypeLook, SimulationParams
from comtip.demo.tissue import _Geometry

# ---------------------------------------------------------------------------------------------
# Space Ranger files


def _write_spatial_images(
    spatial: Path,
    geom: _Geometry,
    levels: Sequence[np.ndarray],
    params: SimulationParams,
    extra_factors: dict | None = None,
) -> dict:
    """hires/lowres PNGs resampled from the smallest pyramid level that is still large enough,
    and the scale factors that map full-resolution pixels onto them (``extra_factors`` added or
    replacing; Visium HD's keys). Returns the scale factors written."""
    longest = max(geom.width_px, geom.height_px)
    scalefactors = {
        "spot_diameter_fullres": params.spot_diameter_um / params.mpp,
        "fiducial_diameter_fullres": params.fiducial_diameter_um / params.mpp,
        "tissue_hires_scalef": min(1.0, HIRES_MAX_SIDE / longest),
        "tissue_lowres_scalef": min(1.0, LOWRES_MAX_SIDE / longest),
        **(extra_factors or {}),
    }
    for name, key in (
        ("tissue_hires_image.png", "tissue_hires_scalef"),
        ("tissue_lowres_image.png", "tissue_lowres_scalef"),
    ):
        size = (round(geom.width_px * scalefactors[key]), round(geom.height_px * scalefactors[key]))
        large_enough = [level for level in levels if level.shape[1] >= size[0]] or [levels[0]]
        source = min(large_enough, key=lambda level: level.shape[1])
        image = Image.fromarray(source).resize(size, Image.Resampling.LANCZOS)
        with atomic_path(spatial / name) as tmp:
            image.save(tmp, format="PNG", compress_level=3)
    with atomic_path(spatial / "scalefactors_json.json") as tmp:
        tmp.write_text(json.dumps(scalefactors, indent=2) + "\n")
    return scalefactors


def _write_positions(path: Path, spots: _Spots, mpp: float) -> None:
    """Space Ranger >= 2 ``tissue_positions.csv`` (with header), all spots of the grid."""
    table = pd.DataFrame(
        {
            "barcode": spots.barcodes,
            "in_tissue": spots.in_tissue.astype(int),
            "array_row": spots.array_row,
            "array_col": spots.array_col,
            "pxl_row_in_fullres": spots.y_um / mpp,
            "pxl_col_in_fullres": spots.x_um / mpp,
        }
    )
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.3f")


def _write_10x_h5(
    path: Path,
    counts: np.ndarray | sp.spmatrix,
    barcodes: np.ndarray,
    programs: _Programs,
    sample: str,
    chemistry: str = "Visium Spatial Gene Expression (synthetic)",
) -> None:
    """10x Genomics feature-barcode matrix HDF5 (v3): CSC genes x barcodes, i.e. CSR of
    barcodes x genes (``counts`` dense or sparse). ``track_times=False`` keeps the bytes
    reproducible."""
    matrix = sp.csr_matrix(counts)
    fixed = {"track_times": False}
    packed = {"track_times": False, "compression": "gzip", "shuffle": True}
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["filetype"] = "matrix"
        f.attrs["version"] = np.int64(2)
        f.attrs["software_version"] = "comtip-simulate"
        f.attrs["library_ids"] = np.array([sample.encode()])
        f.attrs["chemistry_description"] = chemistry
        group = f.create_group("matrix")
        group.create_dataset("barcodes", data=np.array([b.encode() for b in barcodes]), **packed)
        group.create_dataset("data", data=matrix.data.astype(np.int32), **packed)
        group.create_dataset("indices", data=matrix.indices.astype(np.int64), **packed)
        group.create_dataset("indptr", data=matrix.indptr.astype(np.int64), **packed)
        shape = np.array([counts.shape[1], counts.shape[0]], np.int32)  # genes x barcodes
        group.create_dataset("shape", data=shape, **fixed)
        features = group.create_group("features")
        n = len(programs.ids)
        features.create_dataset("id", data=np.array([g.encode() for g in programs.ids]), **packed)
        names = np.array([g.encode() for g in programs.symbols])
        features.create_dataset("name", data=names, **packed)
        features.create_dataset("feature_type", data=np.array([b"Gene Expression"] * n), **packed)
        features.create_dataset("genome", data=np.array([b"synthetic"] * n), **packed)
        features.create_dataset("_all_tag_keys", data=np.array([b"genome"]), **fixed)


def _write_truth(
    path: Path,
    spots: _Spots,
    rates: np.ndarray,
    covariates: pd.DataFrame,
    programs: _Programs,
    looks: Sequence[CellTypeLook],
    meta: dict,
) -> None:
    """Ground truth for evaluations: noiseless rates (expected counts) per in-tissue spot."""
    sel = spots.in_tissue
    names = [look.name for look in looks]
    fractions = spots.type_fractions[sel].astype(np.float32)
    obs = pd.DataFrame(
        {
            "barcode": spots.barcodes[sel],
            "array_row": spots.array_row[sel],
            "array_col": spots.array_col[sel],
            "dominant_cell_type": pd.Categorical(np.array(names)[fractions.argmax(axis=1)], categories=names),
            **{k: v.to_numpy() for k, v in covariates.items()},
        },
        index=pd.Index(spots.barcodes[sel], name=None),
    )
    var = pd.DataFrame(
        {
            "gene_ids": programs.ids,
            "gene_symbol": programs.symbols,
            "marker_of": programs.marker_of,
            "density_beta": programs.density_beta.astype(np.float32),
        },
        index=ad.utils.make_index_unique(pd.Index(programs.symbols)),
    )
    truth = ad.AnnData(X=rates, obs=obs, var=var)
    truth.obsm["cell_type_fractions"] = fractions
    truth.obsm["spatial"] = np.column_stack([spots.x_um[sel], spots.y_um[sel]]) / meta["mpp"]
    truth.uns["cell_types"] = names
    truth.uns["simulation"] = meta
    with atomic_path(path) as tmp:
        truth.write_h5ad(tmp)

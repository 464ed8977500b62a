"""Read a Space Ranger ``outs/`` folder into one AnnData of in-tissue spots.

Handles both matrix layouts Space Ranger writes (``filtered_feature_bc_matrix.h5`` or the
``filtered_feature_bc_matrix/`` mtx folder) and both positions layouts
(``spatial/tissue_positions.csv`` with a header from Space Ranger 2 on,
``spatial/tissue_positions_list.csv`` without one before). Matrix reading is scanpy's; the
positions CSV is read here because scanpy's Visium reader needs the ``.h5`` and an image. File
names and layouts: :mod:`comtip.io.layout`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
from PIL import Image

from comtip._core.errors import PipelineInputError
from comtip.io.layout import MATRIX_H5, MATRIX_MTX_DIR, MTX_FILES, POSITION_COLUMNS, spaceranger_files

log = logging.getLogger(__name__)


def read_positions(path: str | Path, *, sample: str | None = None) -> pd.DataFrame:
    """Spot positions indexed by barcode, from either Space Ranger layout."""
    path = Path(path)
    if not path.exists():
        raise PipelineInputError("tissue positions file is missing", sample=sample, path=path)
    with open(path) as fh:
        first = fh.readline()
    has_header = first.lower().startswith("barcode")
    try:
        df = pd.read_csv(path, header=0 if has_header else None)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise PipelineInputError(f"cannot parse tissue positions: {err}", sample=sample, path=path) from err
    if not has_header:
        if df.shape[1] != len(POSITION_COLUMNS):
            raise PipelineInputError(
                f"expected {len(POSITION_COLUMNS)} columns ({', '.join(POSITION_COLUMNS)}), found {df.shape[1]}",
                sample=sample,
                path=path,
            )
        df.columns = POSITION_COLUMNS
    missing = [c for c in POSITION_COLUMNS if c not in df.columns]
    if missing:
        raise PipelineInputError(f"tissue positions lack columns {missing}", sample=sample, path=path)
    df = df[POSITION_COLUMNS].copy()
    df["barcode"] = df["barcode"].astype(str)
    if df["barcode"].duplicated().any():
        dup = df.loc[df["barcode"].duplicated(), "barcode"].iloc[0]
        raise PipelineInputError(f"barcode {dup!r} appears twice", sample=sample, path=path)
    for col in POSITION_COLUMNS[1:]:
        df[col] = pd.to_numeric(df[col], errors="coerce")
    bad = df[POSITION_COLUMNS[1:]].isna().any(axis=1)
    if bad.any():
        raise PipelineInputError(
            f"{int(bad.sum())} rows have non-numeric values (first: barcode {df.loc[bad, 'barcode'].iloc[0]!r})",
            sample=sample,
            path=path,
        )
    df["in_tissue"] = df["in_tissue"].astype(bool)
    df[["array_row", "array_col"]] = df[["array_row", "array_col"]].astype(int)
    return df.set_index("barcode")


def read_scalefactors(path: str | Path, *, sample: str | None = None) -> dict:
    """``scalefactors_json.json`` as a dict; ``spot_diameter_fullres`` must be there."""
    path = Path(path)
    if not path.exists():
        raise PipelineInputError("scale factors file is missing", sample=sample, path=path)
    try:
        factors = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PipelineInputError(f"not valid JSON: {err}", sample=sample, path=path) from err
    diameter = factors.get("spot_diameter_fullres")
    if not isinstance(diameter, int | float) or not np.isfinite(diameter) or diameter <= 0:
        raise PipelineInputError(
            f"'spot_diameter_fullres' must be a positive number, got {diameter!r}", sample=sample, path=path
        )
    return factors


@contextlib.contextmanager
def _duplicate_names_expected():
    """Silence anndata's duplicate-gene warning: read_matrix makes the names unique next."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Variable names are not unique")
        yield


def read_matrix(outs_dir: str | Path, *, sample: str | None = None) -> ad.AnnData:
    """Raw counts (spots × genes) from the ``.h5`` or the mtx folder; unique gene symbols."""
    files = spaceranger_files(outs_dir)
    if "matrix_h5" in files:
        path = files["matrix_h5"]
        if not path.exists():
            raise PipelineInputError(
                f"no count matrix: neither {MATRIX_H5} nor {MATRIX_MTX_DIR}/ exists", sample=sample, path=path
            )
        try:
            with _duplicate_names_expected():
                adata = sc.read_10x_h5(path, gex_only=True)
        except (OSError, KeyError, ValueError) as err:
            raise PipelineInputError(f"cannot read 10x HDF5 matrix: {err}", sample=sample, path=path) from err
    else:
        mtx_dir = Path(outs_dir) / MATRIX_MTX_DIR
        for name in MTX_FILES:
            if not (mtx_dir / name).exists():
                raise PipelineInputError("mtx matrix folder is incomplete", sample=sample, path=mtx_dir / name)
        try:
            with _duplicate_names_expected():
                adata = sc.read_10x_mtx(mtx_dir, var_names="gene_symbols", gex_only=True, make_unique=False)
        except (OSError, KeyError, ValueError) as err:
            raise PipelineInputError(f"cannot read mtx matrix: {err}", sample=sample, path=mtx_dir) from err
    adata.var_names_make_unique()
    adata.obs_names = adata.obs_names.astype(str)
    return adata


def _lowres_image(outs: Path) -> np.ndarray | None:
    path = outs / "spatial" / "tissue_lowres_image.png"
    if not path.exists():
        return None
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def read_spaceranger(outs_dir: str | Path, *, sample: str, min_counts: int = 1) -> ad.AnnData:
    """In-tissue spots of one Space Ranger run with counts, positions and QC metrics.

    ``obsm["spatial"]`` holds (x, y) = (pxl_col_in_fullres, pxl_row_in_fullres), the
    convention scanpy and squidpy use. ``uns["spatial"]`` carries the scale factors and the
    low-res image so ``sc.pl.spatial`` works on the file as it is.
    """
    outs = Path(outs_dir)
    if not outs.is_dir():
        raise PipelineInputError("Space Ranger outs/ folder does not exist", sample=sample, path=outs)
    files = spaceranger_files(outs)
    positions = read_positions(files["positions"], sample=sample)
    factors = read_scalefactors(files["scalefactors"], sample=sample)
    adata = read_matrix(outs, sample=sample)

    matrix_file = files.get("matrix_h5", outs / MATRIX_MTX_DIR)
    not_positioned = adata.obs_names.difference(positions.index)
    if len(not_positioned):
        raise PipelineInputError(
            f"{len(not_positioned)} matrix barcodes have no row in {files['positions'].name} "
            f"(first: {not_positioned[0]!r}); the matrix and positions come from different runs?",
            sample=sample,
            path=matrix_file,
        )
    in_tissue = positions.index[positions["in_tissue"]]
    no_counts = in_tissue.difference(adata.obs_names)
    if len(no_counts):
        raise PipelineInputError(
            f"{len(no_counts)} in-tissue barcodes of {files['positions'].name} are missing from "
            f"the count matrix (first: {no_counts[0]!r})",
            sample=sample,
            path=matrix_file,
        )
    # A raw (unfiltered) matrix also holds spots outside the tissue: keep in-tissue ones only.
    adata = adata[in_tissue].copy()
    if adata.n_obs == 0:
        raise PipelineInputError("no spot is marked in_tissue = 1", sample=sample, path=files["positions"])

    pos = positions.loc[adata.obs_names]
    for col in ("in_tissue", "array_row", "array_col"):
        adata.obs[col] = pos[col].to_numpy()
    adata.obsm["spatial"] = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64)

    adata = qc_filter(adata, min_counts=min_counts, sample=sample, path=matrix_file)
    adata.uns["spatial"] = spatial_uns(outs, factors, sample)
    return adata


def qc_filter(adata: ad.AnnData, *, min_counts: int, sample: str, path: str | Path) -> ad.AnnData:
    """scanpy's QC metrics (``mt`` = ``MT-`` genes) and the spots with at least ``min_counts``."""
    adata.var["mt"] = adata.var_names.str.upper().str.startswith("MT-")
    sc.pp.calculate_qc_metrics(adata, qc_vars=["mt"], percent_top=None, log1p=False, inplace=True)
    keep = adata.obs["total_counts"].to_numpy() >= min_counts
    if not keep.any():
        raise PipelineInputError(f"no in-tissue spot has at least {min_counts} counts", sample=sample, path=path)
    if not keep.all():
        log.info("[%s] dropping %d spots with fewer than %d counts", sample, int((~keep).sum()), min_counts)
        adata = adata[keep].copy()
    return adata


def spatial_uns(folder: Path, factors: dict, sample: str) -> dict:
    """``uns["spatial"]`` as ``sc.pl.spatial`` reads it: numeric scale factors, low-res image."""
    images = {}
    lowres = _lowres_image(folder)
    if lowres is not None:
        images["lowres"] = lowres
    return {
        sample: {
            "images": images,
            "scalefactors": {k: float(v) for k, v in factors.items() if isinstance(v, int | float)},
            "metadata": {"source": str(folder.absolute())},
        }
    }

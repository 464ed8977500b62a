"""Read one bin size of a Visium HD run (Space Ranger >= 3 ``binned_outputs/square_{NNN}um/``).

Each bin folder holds the standard 10x feature-barcode matrix HDF5 (read by
:func:`comtip.io.spaceranger.read_matrix`'s scanpy reader), ``spatial/tissue_positions.parquet``
(the columns of ``tissue_positions.csv``, typed) and scale factors with HD's extra keys
(``microns_per_pixel``, ``bin_size_um``; ``spot_diameter_fullres`` is the bin's side in full-res
px). Bins are squares; the pseudo-spots made from them are in :mod:`comtip.data.pseudospots`.
"""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import scanpy as sc

from comtip._core.errors import PipelineInputError
from comtip.io.layout import HD_BIN_SIZES_UM, HD_POSITIONS, MATRIX_H5, POSITION_COLUMNS, SCALEFACTORS, hd_bin_dir
from comtip.io.spaceranger import _duplicate_names_expected

# What each column of tissue_positions.parquet must be (10x writes string, int64 and float64).
_POSITION_KINDS = {
    "barcode": ("a string", lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)),
    "in_tissue": ("an integer", pa.types.is_integer),
    "array_row": ("an integer", pa.types.is_integer),
    "array_col": ("an integer", pa.types.is_integer),
    "pxl_row_in_fullres": ("a float", pa.types.is_floating),
    "pxl_col_in_fullres": ("a float", pa.types.is_floating),
}
HD_SCALEFACTOR_KEYS = ("spot_diameter_fullres", "microns_per_pixel")


def read_hd_positions(path: str | Path, *, sample: str | None = None) -> pd.DataFrame:
    """Bin positions indexed by barcode: ``in_tissue`` (bool), array row/col (int64), full-res
    row/col (float64). Every missing or mistyped column is named in one error."""
    path = Path(path)
    if not path.is_file():
        raise PipelineInputError("tissue positions file is missing", sample=sample, path=path)
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as err:
        raise PipelineInputError(f"cannot read tissue positions parquet: {err}", sample=sample, path=path) from err
    problems = []
    for name, (kind, check) in _POSITION_KINDS.items():
        index = schema.get_field_index(name)
        if index < 0:
            problems.append(f"column {name!r} is missing")
        elif not check(schema.field(index).type):
            problems.append(f"column {name!r} must be {kind}, is {schema.field(index).type}")
    if problems:
        raise PipelineInputError(
            f"tissue positions: {'; '.join(problems)} (columns found: {', '.join(schema.names)})",
            sample=sample,
            path=path,
        )
    table = pq.read_table(path, columns=POSITION_COLUMNS)
    nulls = [name for name in POSITION_COLUMNS if table.column(name).null_count]
    if nulls:
        raise PipelineInputError(f"tissue positions: columns {nulls} hold empty values", sample=sample, path=path)
    df = pd.DataFrame(
        {
            "in_tissue": table.column("in_tissue").to_numpy() != 0,
            "array_row": table.column("array_row").to_numpy().astype(np.int64),
            "array_col": table.column("array_col").to_numpy().astype(np.int64),
            "pxl_row_in_fullres": table.column("pxl_row_in_fullres").to_numpy().astype(np.float64),
            "pxl_col_in_fullres": table.column("pxl_col_in_fullres").to_numpy().astype(np.float64),
        },
        index=pd.Index(table.column("barcode").to_numpy(zero_copy_only=False).astype(str), name="barcode"),
    )
    if df.index.has_duplicates:
        raise PipelineInputError(
            f"barcode {df.index[df.index.duplicated()][0]!r} appears twice", sample=sample, path=path
        )
    return df


def read_hd_scalefactors(path: str | Path, *, bin_size_um: int, sample: str | None = None) -> dict:
    """HD ``scalefactors_json.json``: ``spot_diameter_fullres`` (bin side, px) and
    ``microns_per_pixel`` must be positive numbers; ``bin_size_um``, when written, must be the
    bin size asked for (another folder's file otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineInputError("scale factors file is missing", sample=sample, path=path)
    try:
        factors = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PipelineInputError(f"not valid JSON: {err}", sample=sample, path=path) from err
    for key in HD_SCALEFACTOR_KEYS:
        value = factors.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value) or value <= 0:
            raise PipelineInputError(
                f"{key!r} must be a positive number in a Visium HD scale factors file, got {value!r}",
                sample=sample,
                path=path,
            )
    written = factors.get("bin_size_um")
    if written is not None and written != bin_size_um:
        raise PipelineInputError(
            f"scale factors say bin_size_um {written!r}, but the folder read is for {bin_size_um} µm bins",
            sample=sample,
            path=path,
        )
    return factors


def read_hd_bins(outs_dir: str | Path, *, sample: str, bin_size_um: int) -> tuple[ad.AnnData, pd.DataFrame, dict]:
    """In-tissue bins of one bin size: (counts with ``obs`` in_tissue/array_row/array_col and
    ``obsm["spatial"]`` = (x, y) full-res px; every bin's positions, in or out of tissue; the
    scale factors). Nothing is filtered on counts here: pseudo-spots sum bins first."""
    if bin_size_um not in HD_BIN_SIZES_UM:
        raise PipelineInputError(f"bin_size_um must be one of {HD_BIN_SIZES_UM}, got {bin_size_um!r}", sample=sample)
    folder = hd_bin_dir(outs_dir, bin_size_um)
    if not folder.is_dir():
        raise PipelineInputError(
            f"this Visium HD run has no {bin_size_um} µm bins (set bin_size_um in the sample sheet to one the run has)",
            sample=sample,
            path=folder,
        )
    positions = read_hd_positions(folder / HD_POSITIONS, sample=sample)
    factors = read_hd_scalefactors(folder / SCALEFACTORS, bin_size_um=bin_size_um, sample=sample)
    matrix_file = folder / MATRIX_H5
    if not matrix_file.is_file():
        raise PipelineInputError("count matrix is missing", sample=sample, path=matrix_file)
    try:
        with _duplicate_names_expected():
            adata = sc.read_10x_h5(matrix_file, gex_only=True)
    except (OSError, KeyError, ValueError) as err:
        raise PipelineInputError(f"cannot read 10x HDF5 matrix: {err}", sample=sample, path=matrix_file) from err
    adata.var_names_make_unique()
    adata.obs_names = adata.obs_names.astype(str)

    where = positions.index.get_indexer(adata.obs_names)
    if (where < 0).any():
        first = adata.obs_names[where < 0][0]
        raise PipelineInputError(
            f"{int((where < 0).sum())} matrix barcodes have no row in tissue_positions.parquet (first: {first!r}); "
            "the matrix and positions come from different bin sizes or runs?",
            sample=sample,
            path=matrix_file,
        )
    in_tissue = positions["in_tissue"].to_numpy()
    counted = np.zeros(len(positions), bool)
    counted[where] = True
    if (in_tissue & ~counted).any():
        raise PipelineInputError(
            f"{int((in_tissue & ~counted).sum())} in-tissue bins of tissue_positions.parquet are missing from the "
            f"count matrix (first: {positions.index[in_tissue & ~counted][0]!r})",
            sample=sample,
            path=matrix_file,
        )
    keep = in_tissue[where]
    if not keep.any():
        raise PipelineInputError("no bin is marked in_tissue = 1", sample=sample, path=folder / "spatial")
    if not keep.all():  # a raw matrix also holds bins outside the tissue (a copy only then: HD is big)
        adata = adata[keep].copy()
    rows = where[keep]
    for col in ("in_tissue", "array_row", "array_col"):
        adata.obs[col] = positions[col].to_numpy()[rows]
    adata.obsm["spatial"] = positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy()[rows]
    return adata, positions, factors

"""Where Space Ranger puts the files this pipeline reads: names and layouts only, no readers.

Visium HD runs (Space Ranger >= 3) are recognised by ``outs/binned_outputs/``: one folder per
bin size (``square_002um``, ``square_008um``, ``square_016um``), each with its own matrix,
``spatial/tissue_positions.parquet`` and scale factors.

Importable with the standard library alone: the workflow's input functions call
:func:`spaceranger_files` when Snakemake parses the workflow.
"""

from __future__ import annotations

from pathlib import Path

POSITION_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
MATRIX_H5 = "filtered_feature_bc_matrix.h5"
MATRIX_MTX_DIR = "filtered_feature_bc_matrix"
MTX_FILES = ("matrix.mtx.gz", "barcodes.tsv.gz", "features.tsv.gz")
POSITIONS_V2 = "spatial/tissue_positions.csv"
POSITIONS_V1 = "spatial/tissue_positions_list.csv"
SCALEFACTORS = "spatial/scalefactors_json.json"
HD_BINNED_DIR = "binned_outputs"
HD_POSITIONS = "spatial/tissue_positions.parquet"
HD_BIN_SIZES_UM = (2, 8, 16)
HD_DEFAULT_BIN_SIZE_UM = 16


def is_visium_hd(outs_dir: str | Path) -> bool:
    """True when ``outs_dir`` holds Space Ranger's ``binned_outputs/`` (a Visium HD run)."""
    return (Path(outs_dir) / HD_BINNED_DIR).is_dir()


def hd_bin_dir(outs_dir: str | Path, bin_size_um: int | None = None) -> Path:
    """``binned_outputs/square_{NNN}um`` of a Visium HD run (default bin: 16 µm)."""
    size = HD_DEFAULT_BIN_SIZE_UM if bin_size_um is None else int(bin_size_um)
    if size not in HD_BIN_SIZES_UM:
        raise ValueError(f"bin_size_um must be one of {HD_BIN_SIZES_UM}, got {bin_size_um!r}")
    return Path(outs_dir) / HD_BINNED_DIR / f"square_{size:03d}um"


def spaceranger_files(outs_dir: str | Path, bin_size_um: int | None = None) -> dict[str, Path]:
    """The files of an ``outs/`` folder this pipeline reads, by role.

    For a Visium HD run, those of the ``bin_size_um`` folder of ``binned_outputs/``
    (:func:`hd_bin_dir`). Where the folder does not exist yet (a demo sample that a rule will
    simulate), the Space Ranger ≥ 2 layout with an ``.h5`` matrix is assumed.
    """
    outs = Path(outs_dir)
    if is_visium_hd(outs):
        bins = hd_bin_dir(outs, bin_size_um)
        return {"matrix_h5": bins / MATRIX_H5, "positions": bins / HD_POSITIONS, "scalefactors": bins / SCALEFACTORS}
    files: dict[str, Path] = {}
    mtx_dir = outs / MATRIX_MTX_DIR
    if not (outs / MATRIX_H5).exists() and mtx_dir.is_dir():
        for name in MTX_FILES:
            files["mtx_" + name.split(".")[0]] = mtx_dir / name
    else:
        files["matrix_h5"] = outs / MATRIX_H5
    v1 = outs / POSITIONS_V1
    files["positions"] = v1 if (v1.exists() and not (outs / POSITIONS_V2).exists()) else outs / POSITIONS_V2
    files["scalefactors"] = outs / SCALEFACTORS
    return files

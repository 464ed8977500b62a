"""Where Space Ranger puts the files this pipeline reads: names and layouts only, no readers.

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


def spaceranger_files(outs_dir: str | Path) -> dict[str, Path]:
    """The files of an ``outs/`` folder this pipeline reads, by role.

    Where the folder does not exist yet (a demo sample that a rule will simulate), the
    Space Ranger ≥ 2 layout with an ``.h5`` matrix is assumed.
    """
    outs = Path(outs_dir)
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

"""A synthetic Visium HD run: Space Ranger 3/4's ``outs/binned_outputs/square_{NNN}um/`` folders
and the H&E slide, drawn by the same tissue, nuclei and renderer as :func:`simulate_sample`.

Bins tile the whole slide (the HD capture area covers it) on a square grid of ``BASE_BIN_UM``
(8 µm). Each base bin measures its square as a Visium spot measures its disc (cell-type
fractions and nuclei from the drawn fields) and gets negative-binomial counts; a bin is in tissue
when its centre is. Coarser bins (16 µm) are sums of 2 x 2 base bins, as Space Ranger sums its
2 µm bins, and are in tissue when any of their base bins is, so every bin size holds the same
total counts. ``SimulationParams.mean_counts`` is the mean UMIs of an in-tissue base bin.

Files per bin folder, as 10x writes them: ``filtered_feature_bc_matrix.h5`` (in-tissue bins),
``raw_feature_bc_matrix.h5`` (every bin), ``spatial/tissue_positions.parquet`` (barcode string;
in_tissue, array_row, array_col int32; pxl_row/col_in_fullres float64),
``spatial/scalefactors_json.json`` (HD's keys) and the hires/lowres images.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
from scipy.spatial import cKDTree

from comtip._core.atomic import atomic_path
from comtip.demo.expression import _expression, _gene_programs, _Spots
from comtip.demo.params import HIRES_MAX_SIDE, SimulationParams, _rng, _validate
from comtip.demo.render import _Renderer, _write_slide
from comtip.demo.spaceranger import _write_10x_h5, _write_spatial_images
from comtip.demo.tissue import _cell_type, _interp_points, _tissue_scene

BASE_BIN_UM = 8
HD_BIN_SIZES_WRITTEN = (8, 16)
# ~3,000 in-tissue 8 µm bins (~800 at 16 µm) on a 1720 x 1491 px slide: seconds to write.
HD_PARAMS = SimulationParams(tissue_mm=0.6, margin_mm=0.1, n_genes=40, mean_counts=60.0)
HD_CHEMISTRY = "Visium HD Spatial Gene Expression (synthetic)"
_SUBSAMPLE_UM = np.array([-3.0, -1.0, 1.0, 3.0])  # 4 x 4 points measure an 8 µm bin's square


def hd_barcodes(bin_size_um: int, array_row: np.ndarray, array_col: np.ndarray) -> np.ndarray:
    """Space Ranger's HD barcodes: ``s_{NNN}um_{row:05d}_{col:05d}-1``."""
    return np.array([f"s_{bin_size_um:03d}um_{r:05d}_{c:05d}-1" for r, c in zip(array_row, array_col)])


def _base_bins(geom, fields, nuclei, params: SimulationParams) -> _Spots:
    """The 8 µm bins of the slide (an even number of rows and columns), measured like spots."""
    n_rows = int(geom.height_um // (2 * BASE_BIN_UM)) * 2
    n_cols = int(geom.width_um // (2 * BASE_BIN_UM)) * 2
    row, col = (a.ravel() for a in np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij"))
    x, y = (col + 0.5) * BASE_BIN_UM, (row + 0.5) * BASE_BIN_UM
    ox, oy = (a.ravel() for a in np.meshgrid(_SUBSAMPLE_UM, _SUBSAMPLE_UM))
    values = _interp_points(fields.stack, x[:, None] + ox[None, :], y[:, None] + oy[None, :])
    tissue = values[0] > 0.5
    cell_type = _cell_type(values, fields.n_types)
    type_counts = np.stack([(tissue & (cell_type == t)).sum(axis=1) for t in range(fields.n_types)], axis=1)
    n_tissue = tissue.sum(axis=1)
    tree = cKDTree(np.column_stack([nuclei.x_um, nuclei.y_um]))
    nuclei_count = tree.query_ball_point(np.column_stack([x, y]), BASE_BIN_UM / 2, p=np.inf, return_length=True)
    return _Spots(
        barcodes=hd_barcodes(BASE_BIN_UM, row, col),
        array_row=row,
        array_col=col,
        x_um=x,
        y_um=y,
        in_tissue=_interp_points(fields.stack[:1], x, y)[0] > 0.5,
        tissue_fraction=n_tissue / ox.size,
        type_fractions=type_counts / np.maximum(n_tissue, 1)[:, None],
        nuclei_count=np.asarray(nuclei_count),
    )


def _binned(base: _Spots, counts: sp.csr_matrix, factor: int) -> tuple[dict, sp.csr_matrix]:
    """Bins ``factor`` x ``factor`` times the base: positions (centre = the block's centre) and
    the summed counts of every bin (zero outside the tissue)."""
    row, col = base.array_row // factor, base.array_col // factor
    n_cols = int(col.max()) + 1
    key = row * n_cols + col
    keys, member = np.unique(key, return_inverse=True)
    n = len(keys)
    block = sp.csr_matrix((np.ones(len(key)), (member, np.arange(len(key)))), shape=(n, len(key)))
    size = np.bincount(member)
    positions = {
        "array_row": (keys // n_cols).astype(np.int32),
        "array_col": (keys % n_cols).astype(np.int32),
        "in_tissue": (np.bincount(member, weights=base.in_tissue) > 0).astype(np.int32),
        "x_um": np.bincount(member, weights=base.x_um) / size,
        "y_um": np.bincount(member, weights=base.y_um) / size,
    }
    return positions, sp.csr_matrix(block @ counts, dtype=np.int32)


def _write_hd_positions(path: Path, barcodes: np.ndarray, positions: dict, mpp: float) -> None:
    table = pa.table(
        {
            "barcode": pa.array(barcodes.tolist(), pa.string()),
            "in_tissue": pa.array(positions["in_tissue"], pa.int32()),
            "array_row": pa.array(positions["array_row"], pa.int32()),
            "array_col": pa.array(positions["array_col"], pa.int32()),
            "pxl_row_in_fullres": pa.array(positions["y_um"] / mpp, pa.float64()),
            "pxl_col_in_fullres": pa.array(positions["x_um"] / mpp, pa.float64()),
        }
    )
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def simulate_visium_hd(
    out_dir: str | Path,
    sample: str = "hd",
    seed: int = 0,
    params: SimulationParams = HD_PARAMS,
    bin_sizes: Sequence[int] = HD_BIN_SIZES_WRITTEN,
) -> dict:
    """Write one synthetic Visium HD sample: ``outs/binned_outputs/square_{NNN}um/`` for each of
    ``bin_sizes`` (multiples of 8) and ``slide.tif``. Returns the paths, and per bin size the
    number of bins, of in-tissue bins and the total counts."""
    _validate(params, sample, seed)
    if not bin_sizes or any(size % BASE_BIN_UM or size <= 0 for size in bin_sizes):
        raise ValueError(f"bin sizes must be positive multiples of {BASE_BIN_UM} µm, got {bin_sizes}")
    out = Path(out_dir)
    geom, looks, fields, nuclei = _tissue_scene(params, seed, sample)
    programs = _gene_programs(params, looks)
    base = _base_bins(geom, fields, nuclei, params)
    # _expression's density reference is per spot area: give it the base bin's area.
    bin_params = dataclasses.replace(params, spot_diameter_um=2 * BASE_BIN_UM / math.sqrt(math.pi))
    _, tissue_counts, _ = _expression(base, programs, bin_params, seed, sample)
    counts = sp.lil_matrix((len(base.barcodes), params.n_genes), dtype=np.int32)
    counts[np.flatnonzero(base.in_tissue)] = tissue_counts
    counts = counts.tocsr()

    stain_jitter = _rng(seed, sample, "stain").lognormal(0.0, 0.04, 3).astype(np.float32)
    renderer = _Renderer(geom, fields, nuclei, looks, stain_jitter, seed, sample)
    description = f"comtip synthetic Visium HD slide; sample={sample}; seed={seed}"
    levels = _write_slide(out / "slide.tif", renderer, description)
    summary: dict = {"slide": str(out / "slide.tif"), "outs": str(out / "outs"), "mpp": params.mpp, "bins": {}}
    summary["slide_dimensions"] = (geom.width_px, geom.height_px)
    for size in bin_sizes:
        positions, binned = _binned(base, counts, size // BASE_BIN_UM)
        barcodes = hd_barcodes(size, positions["array_row"], positions["array_col"])
        folder = out / "outs" / "binned_outputs" / f"square_{size:03d}um"
        extra = {
            "spot_diameter_fullres": size / params.mpp,
            "bin_size_um": size,
            "microns_per_pixel": params.mpp,
            # the image Space Ranger registered to: the hires image here
            "regist_target_img_scalef": min(1.0, HIRES_MAX_SIDE / max(geom.width_px, geom.height_px)),
        }
        _write_spatial_images(folder / "spatial", geom, levels, params, extra)
        _write_hd_positions(folder / "spatial" / "tissue_positions.parquet", barcodes, positions, params.mpp)
        inside = positions["in_tissue"].astype(bool)
        _write_10x_h5(folder / "raw_feature_bc_matrix.h5", binned, barcodes, programs, sample, HD_CHEMISTRY)
        _write_10x_h5(
            folder / "filtered_feature_bc_matrix.h5", binned[inside], barcodes[inside], programs, sample, HD_CHEMISTRY
        )
        summary["bins"][size] = {
            "folder": str(folder),
            "n_bins": int(len(barcodes)),
            "n_in_tissue": int(inside.sum()),
            "total_counts": int(binned[inside].sum()),
        }
    return summary

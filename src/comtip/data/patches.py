"""Spot patches: one RGB image per spot, centred on it, at a fixed µm/px.

The patch of a spot is the level-0 box of side ``size_px * mpp / slide_mpp`` centred on the spot,
resampled to ``size_px`` x ``size_px`` from the best pyramid level. Where the reader gives the
level a tile grid (``Slide.band_grid``), patches are cut band by band from tiles each read once
(:mod:`comtip.data.patch_bands`); otherwise they are read one by one in spatial order. Either way
each patch equals ``Slide.read_region_scaled``'s and is written at its place in an ``.npy`` array
(memory-mappable at training time) in the row order of ``spots.h5ad``, so memory stays bounded
whatever the number of spots or the size of the slide.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from comtip._core.atomic import atomic_paths
from comtip._core.errors import PipelineInputError
from comtip.data.patch_bands import plan_patches, write_by_bands
from comtip.io.readers import open_slide
from comtip.io.slide import Slide, check_positive

log = logging.getLogger(__name__)

# Side, in pixels of the level read, of the blocks that spatial_order() visits one by one: a block
# and its border tiles (~6 x 6 tiles of 256 px) fit easily in the readers' tile caches.
SPATIAL_BLOCK_PX = 1024
INDEX_COLUMNS = ["barcode", "x_center", "y_center", "x0", "y0", "x1", "y1", "crosses_edge", "patch_index"]


@dataclass(frozen=True)
class Spots:
    """What patch extraction needs from ``spots.h5ad``: barcodes, centres, level-0 µm/px."""

    barcodes: np.ndarray
    centers: np.ndarray  # (N, 2) float64 (x, y) in level-0 (full-res) pixels
    mpp: float


def read_spots(spots_h5ad: str | Path, *, sample: str | None = None) -> Spots:
    """Barcodes, ``obsm["spatial"]`` and ``uns["comtip"]["mpp"]``, without loading the counts."""
    path = Path(spots_h5ad)
    if not path.is_file():
        raise PipelineInputError("spots file not found", sample=sample, path=path)
    try:
        adata = anndata.read_h5ad(path, backed="r")
    except OSError as err:
        raise PipelineInputError(f"cannot read spots file: {err}", sample=sample, path=path) from err
    try:
        if "spatial" not in adata.obsm:
            raise PipelineInputError('obsm["spatial"] is missing', sample=sample, path=path)
        mpp = adata.uns.get("comtip", {}).get("mpp")
        if mpp is None:
            raise PipelineInputError('uns["comtip"]["mpp"] is missing', sample=sample, path=path)
        centers = np.asarray(adata.obsm["spatial"], dtype=np.float64)
        barcodes = adata.obs_names.to_numpy(dtype=str)
    finally:
        adata.file.close()
    if centers.ndim != 2 or centers.shape[1] != 2:
        raise PipelineInputError(
            f'obsm["spatial"] has shape {centers.shape}; expected (N, 2)', sample=sample, path=path
        )
    if len(barcodes) == 0:
        raise PipelineInputError("no spots: cannot extract patches", sample=sample, path=path)
    return Spots(barcodes, centers, check_positive(mpp, 'uns["comtip"]["mpp"]', sample, path))


def patch_geometry(
    centers: np.ndarray,
    *,
    size_px: int,
    mpp: float,
    slide_mpp: float,
    slide_dimensions: tuple[int, int],
) -> pd.DataFrame:
    """Level-0 box of each patch: centre, bounds (floats) and whether it crosses the slide edge.

    The box side is ``size_px * mpp / slide_mpp`` level-0 pixels, so that ``size_px`` output
    pixels cover it at ``mpp`` µm/px.
    """
    side = size_px * mpp / slide_mpp
    x, y = centers[:, 0], centers[:, 1]
    width, height = slide_dimensions
    x0, y0, x1, y1 = x - side / 2, y - side / 2, x + side / 2, y + side / 2
    return pd.DataFrame(
        {
            "x_center": x,
            "y_center": y,
            "x0": x0,
            "y0": y0,
            "x1": x1,
            "y1": y1,
            "crosses_edge": (x0 < 0) | (y0 < 0) | (x1 > width) | (y1 > height),
        }
    )


def _check_centers_inside(spots: Spots, slide: Slide, spots_h5ad: str | Path, sample: str | None) -> None:
    """Every spot centre must lie on the slide: otherwise the spots belong to another image."""
    width, height = slide.dimensions
    x, y = spots.centers[:, 0], spots.centers[:, 1]
    outside = ~((x >= 0) & (x < width) & (y >= 0) & (y < height))
    if outside.any():
        first = ", ".join(spots.barcodes[outside][:5])
        raise PipelineInputError(
            f"{outside.sum()} spot centre(s) lie outside the slide {slide.path} "
            f"({width} x {height} px), e.g. {first}: spots and slide do not match",
            sample=sample,
            path=spots_h5ad,
        )


def extract_patches(
    spots_h5ad: str | Path,
    slide_path: str | Path,
    out_npy: str | Path,
    out_parquet: str | Path,
    *,
    size_px: int = 224,
    mpp: float = 0.5,
    threads: int = 2,
    chunk_size: int = 256,
    max_upsample: float = 4.0,
    sample: str | None = None,
) -> pd.DataFrame:
    """Write one ``size_px`` RGB patch per spot (h5ad row order) and its index; return the index.

    ``out_npy`` holds uint8 (N, size_px, size_px, 3); ``out_parquet`` one row per patch
    (:data:`INDEX_COLUMNS`); ``x0..y1`` are the box's level-0 bounds (see
    :meth:`Slide.read_region_scaled` for the half-pixel alignment of unscaled boxes). Both files
    appear together or not at all. ``threads`` workers read and write patches, ``chunk_size``
    spots at a time, so memory does not grow with N or slide size. A slide coarser than
    ``max_upsample`` × ``mpp`` is refused: its patches would be interpolation, not histology.
    """
    spots = read_spots(spots_h5ad, sample=sample)
    if spots.mpp > mpp * max_upsample:
        raise PipelineInputError(
            f"the slide is at {spots.mpp:.3g} µm/px and patches are cut at {mpp:g} µm/px: a "
            f"{spots.mpp / mpp:.1f}x upsampling (patches.max_upsample {max_upsample:g}) carries no "
            "histology. Is the slide a low-resolution image (the CytAssist camera image, a hires/lowres "
            "PNG) instead of the microscope H&E? Give the full-resolution slide, or set patches.mpp",
            sample=sample,
            path=slide_path,
        )
    with open_slide(slide_path, sample=sample) as slide:
        _check_centers_inside(spots, slide, spots_h5ad, sample)
        index = patch_geometry(
            spots.centers, size_px=size_px, mpp=mpp, slide_mpp=spots.mpp, slide_dimensions=slide.dimensions
        )
        index.insert(0, "barcode", spots.barcodes)
        index["patch_index"] = np.arange(len(index), dtype=np.int64)
        side = size_px * mpp / spots.mpp
        log.info(
            "%d patches of %d px at %.3g µm/px: level-0 box %.1f px, %s reader, %d cross the slide edge",
            len(index), size_px, mpp, side, slide.reader, int(index["crosses_edge"].sum()),
        )  # fmt: skip
        with atomic_paths(out_npy, out_parquet) as (tmp_npy, tmp_parquet):
            _write_patches(slide, index, side, size_px, tmp_npy, threads=threads, chunk_size=chunk_size)
            _write_index(index, tmp_parquet, size_px=size_px, mpp=mpp, slide=slide, slide_mpp=spots.mpp)
    return index


def spatial_order(centers: np.ndarray, block_px: float) -> np.ndarray:
    """Indices of ``centers`` block by block (snake order), row-major inside a block.

    Neighbouring patches share slide tiles: visiting them together lets the reader's tile cache
    serve most reads, whatever the row order of the spots (barcode order is spatially random).
    """
    bx = np.floor(centers[:, 0] / block_px).astype(np.int64)
    by = np.floor(centers[:, 1] / block_px).astype(np.int64)
    snake = np.where(by % 2 == 0, bx, -bx)
    return np.lexsort((centers[:, 0], centers[:, 1], snake, by))


def _visit_order(slide: Slide, index: pd.DataFrame, side: float, size_px: int) -> np.ndarray:
    """:func:`spatial_order` with blocks of :data:`SPATIAL_BLOCK_PX` pixels of the level read."""
    downsample = slide.level_downsamples[slide.best_level(side / size_px)]
    return spatial_order(index[["x_center", "y_center"]].to_numpy(), SPATIAL_BLOCK_PX * downsample)


def _write_patches(
    slide: Slide, index: pd.DataFrame, side: float, size_px: int, out: Path, *, threads: int, chunk_size: int
) -> None:
    """Create the ``.npy`` and let the workers write each patch at its row's offset.

    Patches are cut band by band (:func:`comtip.data.patch_bands.write_by_bands`: each needed tile
    decoded once), or read one by one in :func:`spatial_order` where the level cannot be read by
    tile-aligned chunks, and written in place with ``os.pwrite``, so the output keeps the h5ad row
    order while memory holds one band of tiles and the patches being cut (``chunk_size`` spots
    are handed to the workers at a time).
    """
    shape = (len(index), size_px, size_px, 3)
    header = np.lib.format.open_memmap(out, mode="w+", dtype=np.uint8, shape=shape)
    offset, patch_bytes = header.offset, size_px * size_px * 3
    del header
    x0, y0 = index["x0"].to_numpy(), index["y0"].to_numpy()
    fd = os.open(out, os.O_WRONLY)
    try:

        def write(i: int, patch: np.ndarray) -> None:
            _pwrite_all(fd, np.ascontiguousarray(patch), offset + int(i) * patch_bytes)

        plans = plan_patches(slide, x0, y0, side, size_px)
        if slide.band_grid(plans[0].level) is not None:
            stats = write_by_bands(slide, plans, size_px, write, threads=threads, chunk_size=chunk_size)
            log.info(
                "%d tiles of %d x %d px read once (through %s), in %d band(s) of %d tile row(s); at most %.0f MB "
                "of tiles held",
                stats.tiles_read, *stats.tile_size, stats.decoder, stats.bands, stats.band_rows,
                stats.max_held_bytes / 2**20,
            )  # fmt: skip
            return
        order = _visit_order(slide, index, side, size_px)

        def read_and_write(i: int) -> None:
            write(i, slide.read_region_scaled(x0[i], y0[i], side, side, size_px, size_px))

        with ThreadPoolExecutor(max_workers=threads) as pool:
            for start in range(0, len(order), chunk_size):
                list(pool.map(read_and_write, order[start : start + chunk_size]))  # re-raises a worker's error
    finally:
        os.close(fd)


def _pwrite_all(fd: int, data: np.ndarray, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (``os.pwrite`` may write less than asked)."""
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _write_index(index: pd.DataFrame, out: Path, *, size_px: int, mpp: float, slide: Slide, slide_mpp: float) -> None:
    """The patch index as parquet, with the extraction settings in the schema metadata."""
    table = pa.Table.from_pandas(index[INDEX_COLUMNS], preserve_index=False)
    settings = {
        "size_px": size_px,
        "mpp": mpp,
        "slide_mpp": slide_mpp,
        "slide_path": str(slide.path),
        "slide_reader": slide.reader,
        "slide_dimensions": list(slide.dimensions),
    }
    table = table.replace_schema_metadata({**table.schema.metadata, b"comtip": json.dumps(settings).encode()})
    pq.write_table(table, out)


def read_boxes_raw(slide: Slide, index: pd.DataFrame, size_px: int, side: float, *, threads: int = 1) -> int:
    """Read each patch's region exactly as :meth:`Slide.read_region_scaled` would, unresized.

    The decode ceiling for :func:`extract_patches`: same regions, same levels, same visiting
    order, one read per patch, but no resampling and no writing. Returns the pixels read.
    """
    order = _visit_order(slide, index, side, size_px)
    x0, y0 = index["x0"].to_numpy(), index["y0"].to_numpy()

    def read(i: int) -> int:
        plan = slide.plan_scaled_read(x0[i], y0[i], side, side, size_px, size_px)
        return slide.read_region(plan.x, plan.y, plan.w, plan.h, plan.level).shape[0] * plan.w

    with ThreadPoolExecutor(max_workers=threads) as pool:
        return sum(pool.map(read, order))

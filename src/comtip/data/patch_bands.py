"""Patches by spatial bands: decode each needed slide tile once, cut the patches from the tiles.

Reading patches one by one decodes every tile under a patch for each patch that covers it (a
reader's cache saves some of it); on JPEG slides the decode is most of the time. Here the patches
are grouped in horizontal bands of the level read (:data:`BAND_BYTES` of tile rows); for a band,
the tiles that its patches need and that are not yet held are decoded in parallel (the codecs
release the GIL), then the band's patches are cut from the held tiles, and the tiles no later patch
needs are dropped. Where the reader decodes tiles itself (:meth:`Slide.tile_decoder`: tifffile,
also for the TIFFs openslide opens, see :meth:`Slide.band_source`), a held tile is the codec's own
array, so each pixel is copied once, into its patch; other readers are read by runs of up to
:data:`RUN_TILES` tiles of a row per ``read_region`` call. Only tiles that some patch needs are
read, each once; memory is the band plus the rows that a patch spans, not the slide.

Each patch is exactly :meth:`Slide.read_region_scaled`'s output: the same plan
(:meth:`Slide.plan_scaled_read`), the plan's region assembled from the tiles (white outside the
level), and the same resize of the plan's box.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from comtip.io.slide import RESAMPLE, WHITE, LevelRead, Slide

# Bytes of decoded tile rows (level width x tile height x RGB) that make one band.
BAND_BYTES = 64 * 2**20
# Consecutive needed tiles of a row read by one read_region call (readers without a tile decoder).
RUN_TILES = 4


@dataclass
class BandStats:
    """What a band pass did: tiles read, bands, and the most tile bytes held at once."""

    tiles_read: int = 0
    bands: int = 0
    max_held_bytes: int = 0
    band_rows: int = 0  # tile rows per band
    tile_size: tuple[int, int] = (0, 0)
    decoder: str = ""  # the reader the tiles were read through (Slide.band_source)


def plan_patches(slide: Slide, x0: np.ndarray, y0: np.ndarray, side: float, size_px: int) -> list[LevelRead]:
    """The :meth:`Slide.plan_scaled_read` of every patch box (all at the same level)."""
    return [slide.plan_scaled_read(x, y, side, side, size_px, size_px) for x, y in zip(x0, y0)]


def write_by_bands(
    slide: Slide,
    plans: list[LevelRead],
    size_px: int,
    write: Callable[[int, np.ndarray], None],
    *,
    threads: int,
    chunk_size: int = 256,
    band_bytes: int = BAND_BYTES,
) -> BandStats:
    """Call ``write(i, patch)`` (from worker threads) for every plan, band by band.

    Needs ``slide.band_grid(level)`` (callers fall back to per-patch reads when it is None).
    """
    level = plans[0].level
    grid = slide.band_grid(level)
    if grid is None:
        raise ValueError(f"{slide.path} level {level} cannot be read by tile-aligned chunks")
    tw, th = grid
    lw, lh = slide.level_dimensions[level]
    d = slide.level_downsamples[level]
    lx = np.array([round(p.x / d) for p in plans], np.int64)
    ly = np.array([round(p.y / d) for p in plans], np.int64)
    w = np.array([p.w for p in plans], np.int64)
    h = np.array([p.h for p in plans], np.int64)
    inside = (np.minimum(lx + w, lw) > np.maximum(lx, 0)) & (np.minimum(ly + h, lh) > np.maximum(ly, 0))
    c0, c1 = np.maximum(lx, 0) // tw, (np.minimum(lx + w, lw) - 1) // tw
    r0, r1 = np.maximum(ly, 0) // th, (np.minimum(ly + h, lh) - 1) // th
    band_rows = max(1, band_bytes // (lw * th * 3))
    band = np.where(inside, r1 // band_rows, 0)
    order = np.lexsort((lx, band))
    bands, starts = np.unique(band[order], return_index=True)
    # the first tile row that any patch of this band or a later one needs: rows above are dropped
    tops = np.where(inside, r0, np.iinfo(np.int64).max)[order]
    keep_from = np.minimum.accumulate(tops[::-1])[::-1]
    source = slide.band_source(level)
    stats = BandStats(bands=len(bands), band_rows=band_rows, tile_size=(tw, th), decoder=source.reader)
    held: dict[tuple[int, int], np.ndarray] = {}

    decode = source.tile_decoder(level)
    run_tiles = 1 if decode is not None else RUN_TILES
    # patches whose region is all inside the level: the tiles cover them, no white to paint first
    covered = (lx >= 0) & (ly >= 0) & (lx + w <= lw) & (ly + h <= lh)

    def read_run(run: tuple[int, int, int]) -> list[tuple[tuple[int, int], np.ndarray]]:
        row, col, n = run
        if decode is not None:  # the codec's own tile array, held as is
            return [((row, col + k), decode(row, col + k)) for k in range(n)]
        x, y = col * tw, row * th
        width, height = min(n * tw, lw - x), min(th, lh - y)
        pixels = source.read_region(round(x * d), round(y * d), width, height, level)
        return [((row, col + k), pixels[:, k * tw : (k + 1) * tw]) for k in range(n)]

    def cut(i: int) -> None:
        if covered[i]:
            out = np.empty((h[i], w[i], 3), np.uint8)
        else:
            out = np.full((h[i], w[i], 3), WHITE, np.uint8)
        if inside[i]:
            for row in range(r0[i], r1[i] + 1):
                for col in range(c0[i], c1[i] + 1):
                    tile = held[(row, col)]
                    tx, ty = col * tw, row * th
                    x_a, y_a = max(lx[i], tx), max(ly[i], ty)
                    x_b, y_b = min(lx[i] + w[i], tx + tile.shape[1]), min(ly[i] + h[i], ty + tile.shape[0])
                    out[y_a - ly[i] : y_b - ly[i], x_a - lx[i] : x_b - lx[i]] = tile[
                        y_a - ty : y_b - ty, x_a - tx : x_b - tx
                    ]
        plan = plans[i]
        if plan.resample:
            out = np.array(Image.fromarray(out).resize((size_px, size_px), RESAMPLE, box=plan.box))
        write(int(i), out)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        ends = [*starts[1:], len(order)]
        for start, end in zip(starts, ends):
            members = order[start:end]
            needed = {
                (row, col)
                for i in members[inside[members]]
                for row in range(r0[i], r1[i] + 1)
                for col in range(c0[i], c1[i] + 1)
            }
            runs = _runs(sorted(needed - held.keys()), run_tiles)
            for tiles in pool.map(read_run, runs):
                held.update(tiles)
            stats.tiles_read += sum(n for _, _, n in runs)
            stats.max_held_bytes = max(stats.max_held_bytes, sum(t.nbytes for t in held.values()))
            for chunk in range(start, end, chunk_size):
                list(pool.map(cut, order[chunk : min(end, chunk + chunk_size)]))  # re-raises errors
            if end < len(order):
                held = {key: tile for key, tile in held.items() if key[0] >= keep_from[end]}
    return stats


def _runs(tiles: list[tuple[int, int]], longest: int) -> list[tuple[int, int, int]]:
    """(row, first column, count) runs of consecutive sorted tiles, at most ``longest`` long."""
    runs: list[tuple[int, int, int]] = []
    for row, col in tiles:
        if runs and runs[-1][0] == row and runs[-1][1] + runs[-1][2] == col and runs[-1][2] < longest:
            runs[-1] = (row, runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((row, col, 1))
    return runs

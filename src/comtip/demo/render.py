"""The H&E-like slide: :class:`_Renderer` draws level 0 band by band (stroma, nuclei, stain,
camera noise), and :func:`_write_slide` streams it as zlib-compressed tiles into a pyramidal
tiled TIFF, building the lower levels by 2x2 downsampling on the way.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage

from comtip._core.atomic import atomic_path
from comtip.demo.params import (
    BACKGROUND_RGB,
    CAMERA_NOISE,
    MIN_LEVEL_SIDE,
    TILE_PX,
    ZLIB_LEVEL,
    CellTypeLook,
    _rng,
)
from comtip.demo.tissue import (
    _cell_type,
    _Fields,
    _Geometry,
    _interp_band,
    _Nuclei,
    _rgb_to_od,
)

# ---------------------------------------------------------------------------------------------
# Slide rendering


@dataclass(frozen=True)
class _Renderer:
    """Draws horizontal bands of the level-0 image.

    The stroma (type colour, tissue edge, stain, fibres) is computed on square cells of ``step``
    pixels, ``step`` being the power of two that makes a cell about 1 µm, and repeated onto the
    pixels: it varies over several µm anyway, and this keeps a default slide to seconds. Nuclei
    and camera noise are drawn per pixel. Each band has its own random stream, so a band never
    depends on the bands drawn before it.
    """

    geom: _Geometry
    fields: _Fields
    nuclei: _Nuclei
    looks: tuple[CellTypeLook, ...]
    stain_jitter: np.ndarray  # per-channel OD factor: this sample's staining
    seed: int
    sample: str

    @property
    def step(self) -> int:
        """Pixels per side of the cells the stroma is computed on (cells of ~1 µm)."""
        return 2 ** max(0, math.floor(math.log2(1.0 / self.geom.mpp)))

    def band(self, index: int, y0: int, y1: int) -> np.ndarray:
        """RGB uint8 rows ``y0:y1`` of level 0."""
        rng = _rng(self.seed, self.sample, f"band-{index}")
        od = self._stroma_od(y0, y1, rng)
        self._draw_nuclei(od, y0, y1, rng)
        np.multiply(od, -self.stain_jitter, out=od)
        np.exp(od, out=od)
        od *= 255.0
        noise = rng.random(od.shape[:2], dtype=np.float32) * (2 * CAMERA_NOISE)
        noise += 0.5 - CAMERA_NOISE  # + 0.5: the cast to uint8 below truncates
        od += noise[..., None]
        return np.clip(od, 0, 255, out=od).astype(np.uint8)

    def _stroma_od(self, y0: int, y1: int, rng: np.random.Generator) -> np.ndarray:
        """Optical density (h, width, 3) of tissue-or-background without nuclei.

        Type colour, modulated by a smooth stain field and horizontal fibre streaks, blended
        into the background across the soft tissue edge.
        """
        step, width = self.step, self.geom.width_px
        cell_um = step * self.geom.mpp
        c0, c1 = y0 // step, -(-y1 // step)
        ys_um = (np.arange(c0, c1) + 0.5) * cell_um
        xs_um = (np.arange(-(-width // step)) + 0.5) * cell_um
        values = _interp_band(self.fields.stack[:-1], ys_um, xs_um)
        cell_type = _cell_type(values, self.fields.n_types)
        streak = max(3, round(8.0 / cell_um))
        white = rng.standard_normal(cell_type.shape, dtype=np.float32)
        streaks = ndimage.uniform_filter1d(white, streak, axis=1) * math.sqrt(streak)
        fibre = np.array([look.fibre_texture for look in self.looks], dtype=np.float32)[cell_type]
        factor = np.clip(1.0 + 0.12 * values[-1] + fibre * streaks, 0.3, 2.5)
        stroma = np.stack([_rgb_to_od(look.stroma_rgb) for look in self.looks])[cell_type]
        tissue = np.clip((values[0] - 0.5) * 5.0 + 0.5, 0.0, 1.0)[..., None]
        od = stroma * (factor[..., None] * tissue) + _rgb_to_od(BACKGROUND_RGB) * (1.0 - tissue)
        if step > 1:
            od = od.repeat(step, axis=0).repeat(step, axis=1)
        top = y0 - c0 * step
        return np.ascontiguousarray(od[top : top + y1 - y0, :width])

    def _draw_nuclei(self, od: np.ndarray, y0: int, y1: int, rng: np.random.Generator) -> None:
        """Anti-aliased ellipses with a darker rim and grainy chromatin, composited into ``od``.

        Soft edge pixels go first and solid interiors overwrite them, so an overlapping
        neighbour's edge never lightens a nucleus.
        """
        mpp = self.geom.mpp
        reach_um = float(self.nuclei.semi_major_um.max(initial=0.0)) + 2 * mpp
        lo, hi = np.searchsorted(self.nuclei.y_um, [y0 * mpp - reach_um, y1 * mpp + reach_um])
        in_band = self.nuclei.cell_type[lo:hi]
        pieces = [self._stamp(np.flatnonzero(in_band == t) + lo, y0, y1) for t in range(len(self.looks))]
        rows, cols, alpha, which, rim = (np.concatenate(p) for p in zip(*pieces, strict=True))
        grain = rng.uniform(0.75, 1.25, alpha.size).astype(np.float32)
        pixel_od = self.nuclei.od[which] * (grain * np.where(rim, 1.35, 1.0))[:, None]
        soft = alpha < 1.0
        a = alpha[soft, None]
        od[rows[soft], cols[soft]] = od[rows[soft], cols[soft]] * (1.0 - a) + pixel_od[soft] * a
        od[rows[~soft], cols[~soft]] = pixel_od[~soft]

    def _stamp(self, idx: np.ndarray, y0: int, y1: int) -> tuple[np.ndarray, ...]:
        """Pixels covered by nuclei ``idx``: band row, column, alpha, nucleus index, rim flag.

        Called per cell type so the stamping box fits that type's nucleus size.
        """
        mpp = self.geom.mpp
        if idx.size == 0:
            empty = np.empty(0, np.intp)
            return empty, empty, np.empty(0, np.float32), empty, np.empty(0, bool)
        a = self.nuclei.semi_major_um[idx] / mpp
        b = self.nuclei.semi_minor_um[idx] / mpp
        box = 2 * math.ceil(float(a.max())) + 3
        offsets = np.arange(box) - box // 2
        cx, cy = self.nuclei.x_um[idx] / mpp, self.nuclei.y_um[idx] / mpp
        px = np.floor(cx).astype(np.intp)[:, None] + offsets  # (n, box)
        py = np.floor(cy).astype(np.intp)[:, None] + offsets
        dx = (px + 0.5 - cx[:, None])[:, None, :]  # (n, 1, box)
        dy = (py + 0.5 - cy[:, None])[:, :, None]  # (n, box, 1)
        angle = self.nuclei.angle[idx][:, None, None]
        cos, sin = np.cos(angle), np.sin(angle)
        u = (dx * cos + dy * sin) / a[:, None, None]
        v = (dy * cos - dx * sin) / b[:, None, None]
        r = np.sqrt(u * u + v * v)
        alpha = np.clip((1.0 - r) * b[:, None, None] + 0.5, 0.0, 1.0)
        rows = np.broadcast_to(py[:, :, None], r.shape)
        cols = np.broadcast_to(px[:, None, :], r.shape)
        keep = (alpha > 0) & (rows >= y0) & (rows < y1) & (cols >= 0) & (cols < self.geom.width_px)
        which = np.broadcast_to(idx[:, None, None], r.shape)[keep]
        return rows[keep] - y0, cols[keep], alpha[keep].astype(np.float32), which, r[keep] > 0.75


def _downsample2(image: np.ndarray) -> np.ndarray:
    """2x2 box average (rounded); an odd last row/column is averaged with a copy of itself."""
    pad = ((0, image.shape[0] % 2), (0, image.shape[1] % 2), (0, 0))
    if pad[0][1] or pad[1][1]:
        image = np.pad(image, pad, mode="edge")
    total = image[0::2, 0::2].astype(np.uint16)
    total += image[1::2, 0::2]
    total += image[0::2, 1::2]
    total += image[1::2, 1::2]
    total += 2
    return (total >> 2).astype(np.uint8)


def _level0_tiles(renderer: _Renderer, level1: np.ndarray) -> Iterator[bytes]:
    """zlib-compressed level-0 tiles in TIFF order; fills ``level1`` on the way.

    Level 0 is never held whole: it is drawn one tile row (band) at a time, the next band in a
    worker thread while this thread compresses the current one (numpy and zlib both release
    the GIL, so the two overlap on two cores).
    """
    width, height = renderer.geom.width_px, renderer.geom.height_px
    starts = range(0, height, TILE_PX)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(renderer.band, 0, 0, min(TILE_PX, height))
        for index, y0 in enumerate(starts):
            band = pending.result()
            if index + 1 < len(starts):
                y1 = starts[index + 1]
                pending = pool.submit(renderer.band, index + 1, y1, min(y1 + TILE_PX, height))
            small = _downsample2(band)
            level1[y0 // 2 : y0 // 2 + small.shape[0]] = small
            padded = np.full((TILE_PX, -(-width // TILE_PX) * TILE_PX, 3), 255, np.uint8)
            padded[: band.shape[0], :width] = band
            for x0 in range(0, width, TILE_PX):
                yield zlib.compress(padded[:, x0 : x0 + TILE_PX].tobytes(), ZLIB_LEVEL)


def _write_slide(path: Path, renderer: _Renderer, description: str) -> list[np.ndarray]:
    """Pyramidal tiled TIFF, levels as consecutive pages (openslide ignores SubIFDs).

    Returns the levels below level 0, held in memory (level 1 is a quarter of level 0).
    """
    geom = renderer.geom
    level1 = np.zeros(((geom.height_px + 1) // 2, (geom.width_px + 1) // 2, 3), np.uint8)
    pyramid_bytes = geom.width_px * geom.height_px * 3 * 4 // 3  # level 0 + 1/4 + 1/16 + ...
    options = {
        "tile": (TILE_PX, TILE_PX),
        "photometric": "rgb",
        "compression": "zlib",
        "resolutionunit": "CENTIMETER",
        "metadata": None,
    }
    levels: list[np.ndarray] = []
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=pyramid_bytes > 2**31) as tif:
        tif.write(
            _level0_tiles(renderer, level1),
            shape=(geom.height_px, geom.width_px, 3),
            dtype=np.uint8,
            resolution=(1e4 / geom.mpp, 1e4 / geom.mpp),
            subfiletype=0,
            description=description,
            **options,
        )
        level = level1
        while True:
            levels.append(level)
            mpp = geom.mpp * geom.width_px / level.shape[1]
            tif.write(
                level,
                resolution=(1e4 / mpp, 1e4 / mpp),
                subfiletype=1,
                compressionargs={"level": ZLIB_LEVEL},
                maxworkers=2,
                **options,
            )
            if max(level.shape[:2]) <= MIN_LEVEL_SIDE:
                break
            level = _downsample2(level)
    return levels

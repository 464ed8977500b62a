"""Slide access: one small interface over openslide, tifffile and Pillow (the readers are in
:mod:`comtip.io.readers`, which also opens a file with the first reader that accepts it).

Whole-slide images come as vendor formats (openslide), OME-TIFFs whose pyramid openslide cannot
see (tifffile), or plain JPEG/PNG images (Pillow). Every reader answers the same questions
(dimensions, pyramid levels, µm/px from metadata) and returns RGB ``uint8`` regions addressed in
level-0 pixels, with everything outside the slide or transparent turned white, so the rest of
the pipeline never cares which reader opened a file.
"""

from __future__ import annotations

import abc
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from comtip._core.errors import PipelineInputError

WHITE = 255
# Antialiased when shrinking (PIL widens the kernel by the scale factor); see SUPPORT below.
RESAMPLE = Image.Resampling.BILINEAR
# Half-width of RESAMPLE's kernel in source pixels at scale 1: extra pixels read around a box so
# that pixels at its border are filtered like those inside it.
SUPPORT = 1.0
# A level counts as "downsample d" when within this relative tolerance: scanners store levels
# such as 4.0005 for a nominal 4, and reading it for a request of 4 costs nothing visible.
LEVEL_TOLERANCE = 1e-3
# Rows of a level read at once by thumbnail(): bounds the temporaries on huge images.
THUMBNAIL_BAND_BYTES = 64 * 2**20


_RESOLUTION_UNITS_UM = {"centimeter": 1e4, "inch": 25400.0}


class _Refused(Exception):
    """A reader declines a file; the message says why (collected into the final error).
    ``codec``: it could parse the file but not decode its pixels (a missing or failing codec),
    which open_slide logs as a warning when another reader then opens the file."""

    def __init__(self, reason: str, *, codec: bool = False):
        super().__init__(reason)
        self.codec = codec


@dataclass(frozen=True)
class LevelRead:
    """Where to read a level-0 box at a level: the integer read and the box inside it.

    ``x, y`` are the level-0 coordinates to pass to :meth:`Slide.read_region`, ``w, h`` the read
    size in pixels of ``level``; ``box`` is the requested box in the read's pixels (floats);
    ``resample`` is False when the read is already the output (pixel-aligned, same size).
    """

    level: int
    x: int
    y: int
    w: int
    h: int
    box: tuple[float, float, float, float]
    resample: bool


class Slide(abc.ABC):
    """An open slide: pyramid geometry, µm/px from metadata and RGB region reads.

    Subclasses implement :meth:`_read` (one level, level-0 origin, any position) and
    :meth:`close`; everything else (scaled reads, thumbnails) is built on those.
    """

    reader: str = ""

    def __init__(
        self,
        path: Path,
        level_dimensions: list[tuple[int, int]],
        level_downsamples: list[float],
        metadata_mpp: float | None,
    ):
        self.path = path
        self.level_dimensions = level_dimensions
        self.level_downsamples = level_downsamples
        self.dimensions = level_dimensions[0]
        self.metadata_mpp = metadata_mpp

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, dimensions={self.dimensions})"

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @abc.abstractmethod
    def close(self) -> None:
        """Release the file handle or the in-memory image."""

    # -- plain reads -------------------------------------------------------------------------

    def read_region(self, x: int, y: int, w: int, h: int, level: int = 0) -> np.ndarray:
        """RGB ``uint8`` (h, w, 3) of ``level``, top-left at level-0 ``(x, y)``; outside is white."""
        if not 0 <= level < len(self.level_dimensions):
            raise ValueError(f"level {level} out of range: {self.path} has {len(self.level_dimensions)}")
        if w <= 0 or h <= 0:
            raise ValueError(f"region size must be positive, got {w} x {h}")
        return self._read(operator.index(x), operator.index(y), operator.index(w), operator.index(h), level)

    @abc.abstractmethod
    def _read(self, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
        """The region, for a valid level and size, at any position (padding is the reader's job)."""

    def band_grid(self, level: int) -> tuple[int, int] | None:
        """Tile (width, height) of ``level`` for reads by tile-aligned chunks, or None.

        A chunk at level pixel ``(lx, ly)`` is read as ``read_region(round(lx * d), round(ly * d),
        ...)``; the reader must then return exactly the level's pixels from ``(lx, ly)``, so that
        pixels cut from chunks equal those of any other read. The default (a reader that rounds
        ``x / d`` to the level grid) answers 256 px; readers override it with their tile size, or
        None when their level coordinates are not exact.
        """
        return (256, 256)

    def band_source(self, level: int) -> Slide:
        """The slide that band reads of ``level`` (tile-aligned chunks, :meth:`band_grid`) go
        through: this one, unless a reader has a faster decoder that gives the same pixels."""
        return self

    def tile_decoder(self, level: int) -> Callable[[int, int], np.ndarray] | None:
        """A function that decodes tile ``(row, column)`` of ``level``'s :meth:`band_grid` to its
        RGB pixels inside the level (edge tiles cut at the level's edge), each call one decode and
        no copy, safe to call from several threads; None (the default) where the reader has no
        direct tile access, and band reads go through :meth:`read_region`."""
        return None

    # -- scaled reads ------------------------------------------------------------------------

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample is <= ``downsample`` (up to :data:`LEVEL_TOLERANCE`)."""
        limit = downsample * (1 + LEVEL_TOLERANCE)
        return max(i for i, d in enumerate(self.level_downsamples) if d <= limit or i == 0)

    def plan_scaled_read(self, x: float, y: float, w0: float, h0: float, out_w: int, out_h: int) -> LevelRead:
        """What :meth:`read_region_scaled` reads for these arguments (benchmarks reuse it)."""
        if w0 <= 0 or h0 <= 0 or out_w <= 0 or out_h <= 0:
            raise ValueError(f"box {w0} x {h0} and output {out_w} x {out_h} must be positive")
        level = self.best_level(min(w0 / out_w, h0 / out_h))
        d = self.level_downsamples[level]
        if math.isclose(w0 / d, out_w, rel_tol=1e-9) and math.isclose(h0 / d, out_h, rel_tol=1e-9):
            ix, iy = round(x / d), round(y / d)
            box = (0.0, 0.0, float(out_w), float(out_h))
            return LevelRead(level, round(ix * d), round(iy * d), out_w, out_h, box, resample=False)
        margin = math.ceil(SUPPORT * max(w0 / d / out_w, h0 / d / out_h, 1.0))
        lx0, ly0, lx1, ly1 = x / d, y / d, (x + w0) / d, (y + h0) / d
        ix0, iy0 = math.floor(lx0) - margin, math.floor(ly0) - margin
        ix1, iy1 = math.ceil(lx1) + margin, math.ceil(ly1) + margin
        box = (lx0 - ix0, ly0 - iy0, lx1 - ix0, ly1 - iy0)
        return LevelRead(level, round(ix0 * d), round(iy0 * d), ix1 - ix0, iy1 - iy0, box, resample=True)

    def read_region_scaled(self, x: float, y: float, w0: float, h0: float, out_w: int, out_h: int) -> np.ndarray:
        """The level-0 box ``(x, y, w0, h0)`` resampled to (out_h, out_w, 3), from the best level.

        The best level is the coarsest whose downsample is <= ``w0 / out_w``; the rest of the
        scaling is a PIL antialiased resize of exactly the box (fractional edges included), read
        with a margin so that border pixels are filtered like inner ones. When the box is exactly
        ``out_w`` x ``out_h`` pixels of that level, it is aligned to the level's pixel grid (a
        shift of at most half a pixel) and copied as is: resampling would only blur it.
        """
        plan = self.plan_scaled_read(x, y, w0, h0, out_w, out_h)
        region = self.read_region(plan.x, plan.y, plan.w, plan.h, plan.level)
        if not plan.resample:
            return region
        return np.array(Image.fromarray(region).resize((out_w, out_h), RESAMPLE, box=plan.box))

    def thumbnail(self, downsample: float) -> tuple[np.ndarray, tuple[float, float]]:
        """The whole slide at about level-0 size / ``downsample``, and the exact (sx, sy) factors.

        Reads the best level in horizontal bands so memory stays bounded on huge levels; each band
        is resized with its neighbouring rows in view, so the bands join without seams.
        """
        if not downsample >= 1:
            raise ValueError(f"thumbnail downsample must be >= 1, got {downsample}")
        width, height = self.dimensions
        out_w, out_h = max(1, round(width / downsample)), max(1, round(height / downsample))
        level = self.best_level(min(width / out_w, height / out_h))
        lw, lh = self.level_dimensions[level]
        d = self.level_downsamples[level]
        ry = lh / out_h  # level rows per output row
        margin = math.ceil(SUPPORT * max(ry, 1.0)) + 1
        rows_per_band = max(1, int(THUMBNAIL_BAND_BYTES // (4 * lw * max(ry, 1.0))))
        image = np.empty((out_h, out_w, 3), np.uint8)
        for r0 in range(0, out_h, rows_per_band):
            r1 = min(out_h, r0 + rows_per_band)
            top = max(0, math.floor(r0 * ry) - margin)
            bottom = min(lh, math.ceil(r1 * ry) + margin)
            band = self.read_region(0, round(top * d), lw, bottom - top, level)
            box = (0.0, r0 * ry - top, float(lw), r1 * ry - top)
            image[r0:r1] = np.asarray(Image.fromarray(band).resize((out_w, r1 - r0), RESAMPLE, box=box))
        return image, (width / out_w, height / out_h)


def _paste_inside(
    read_inside: Callable[[int, int, int, int], np.ndarray],
    level_size: tuple[int, int],
    lx: int,
    ly: int,
    w: int,
    h: int,
) -> np.ndarray:
    """Read (lx, ly, w, h) of a level of ``level_size`` through ``read_inside``, padding white.

    ``read_inside`` only ever sees rectangles inside the level.
    """
    lw, lh = level_size
    x0, y0, x1, y1 = max(lx, 0), max(ly, 0), min(lx + w, lw), min(ly + h, lh)
    if (x0, y0, x1, y1) == (lx, ly, lx + w, ly + h):
        return read_inside(lx, ly, w, h)
    out = np.full((h, w, 3), WHITE, np.uint8)
    if x1 > x0 and y1 > y0:
        out[y0 - ly : y1 - ly, x0 - lx : x1 - lx] = read_inside(x0, y0, x1 - x0, y1 - y0)
    return out


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """RGB of a non-premultiplied RGBA array laid over white (opaque pixels unchanged)."""
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha.astype(np.uint16)
    rgb = (rgba[..., :3] * a + WHITE * (255 - a) + 127) // 255
    return rgb.astype(np.uint8)


def _mpp_from_resolution(resolution: float, unit: str) -> float | None:
    """µm/px from a TIFF XResolution (pixels per unit) and its unit name; None when unusable."""
    per_unit = _RESOLUTION_UNITS_UM.get(unit.lower())
    if per_unit is None or not resolution > 0 or not math.isfinite(resolution):
        return None
    return per_unit / resolution


MPP_SOURCES = ("auto", "slide_metadata", "spot_geometry")
# Space Ranger's spot_diameter_fullres is not the same share of the spot pitch in every version
# (55 µm, "a theoretical 65 µm spot" in 1.3's docs, 0.70 of the pitch in a 3.0 CytAssist run):
# the geometry takes µm/px from the pitch, and the diameter only has to agree within this factor
# (a legacy ST sheet left at Visium's 100 µm pitch is off by 2).
DIAMETER_PITCH_FACTOR = 1.4


def resolve_mpp(
    *,
    sheet_mpp: float | None,
    slide_mpp: float | None,
    spot_diameter_px: float | None,
    spot_diameter_um: float | None,
    spot_pitch_px: float | None = None,
    spot_pitch_um: float | None = None,
    prefer: str = "auto",
    tolerance: float = 0.1,
    sample: str | None = None,
    path: str | Path | None = None,
    geometry_mpp: tuple[float, str] | None = None,
) -> tuple[float, str]:
    """µm/px of level 0 and where it came from: sample sheet, slide metadata or spot geometry.

    The sheet's value wins. The spot geometry is the pitch between neighbouring spots (px in the
    positions ↔ ``spot_pitch_um``) when known, else the spot diameter (``spot_diameter_fullres``
    px ↔ ``spot_diameter_um``). ``prefer`` (the sheet's ``mpp_source``) = ``auto``: when the
    slide's metadata and the geometry are both known they must agree within ``tolerance``
    (relative), else a PipelineInputError names both — the slide is then likely not the image
    Space Ranger was given (e.g. the CytAssist camera image instead of the microscope H&E), or
    its metadata is wrong; the metadata is used when they agree. ``geometry_mpp`` = (µm/px,
    how), when given, is the geometry instead of the spots' (Visium HD: Space Ranger's
    ``microns_per_pixel``). ``slide_metadata`` or
    ``spot_geometry`` takes that source without the check. A given value that is not a positive
    finite number is an error (rather than silently trying the next source). Pass None for an
    absent value.
    """
    if prefer not in MPP_SOURCES:
        raise PipelineInputError(f"mpp_source must be one of {', '.join(MPP_SOURCES)}, got {prefer!r}", sample=sample)
    if sheet_mpp is not None:
        return check_positive(sheet_mpp, "sample sheet mpp", sample, path), "sample_sheet"
    slide = None if slide_mpp is None else check_positive(slide_mpp, "slide metadata µm/px", sample, path)
    if prefer == "slide_metadata":
        if slide is None:
            raise PipelineInputError(
                "mpp_source is slide_metadata but the slide has no µm/px", sample=sample, path=path
            )
        return slide, "slide_metadata"
    if geometry_mpp is not None:
        geometry = (check_positive(geometry_mpp[0], geometry_mpp[1], sample, path), geometry_mpp[1])
    else:
        geometry = _geometry_mpp(spot_diameter_px, spot_diameter_um, spot_pitch_px, spot_pitch_um, sample, path)
    if prefer == "spot_geometry":
        if geometry is None:
            raise PipelineInputError(
                "mpp_source is spot_geometry but the spot positions give no geometry", sample=sample, path=path
            )
        return geometry[0], "spot_geometry"
    if slide is not None and geometry is not None and abs(slide / geometry[0] - 1) > tolerance:
        raise PipelineInputError(
            f"the slide's metadata says {slide:.4g} µm/px but the spots' geometry says {geometry[0]:.4g} "
            f"µm/px ({geometry[1]}), {abs(slide / geometry[0] - 1):.0%} apart (ingest.mpp_tolerance "
            f"{tolerance:.0%}): the slide is likely not the image Space Ranger was given (e.g. the "
            "CytAssist camera image spatial/cytassist_image.tiff instead of the microscope H&E given "
            "with --image), or its metadata is wrong; set the sheet's mpp_source to slide_metadata "
            "or spot_geometry to accept one, or mpp to give the value",
            sample=sample,
            path=path,
        )
    if slide is not None:
        return slide, "slide_metadata"
    if geometry is not None:
        return geometry[0], "spot_geometry"
    raise PipelineInputError(
        "no µm/px: set 'mpp' in the sample sheet, or provide a slide with µm/px metadata, "
        "or spot positions with their pitch or both spot diameters (µm and full-res px)",
        sample=sample,
        path=path,
    )


def _geometry_mpp(
    diameter_px: float | None,
    diameter_um: float | None,
    pitch_px: float | None,
    pitch_um: float | None,
    sample: str | None,
    path: str | Path | None,
) -> tuple[float, str] | None:
    """(µm/px, how) from the spot pitch, else the spot diameter; None when neither is known."""
    diameter = None
    if diameter_px is not None and diameter_um is not None:
        diameter = (
            check_positive(diameter_um, "spot_diameter_um", sample, path),
            check_positive(diameter_px, "spot_diameter_px", sample, path),
        )
    if pitch_px is not None and pitch_um is not None:
        um = check_positive(pitch_um, "spot_pitch_um", sample, path)
        px = check_positive(pitch_px, "spot pitch in px", sample, path)
        if diameter is not None:
            seen, assumed = diameter[1] / px, diameter[0] / um
            if max(seen / assumed, assumed / seen) > DIAMETER_PITCH_FACTOR:
                raise PipelineInputError(
                    f"the spots' diameter is {seen:.2f} of their pitch in the positions "
                    f"({diameter[1]:.1f} of {px:.1f} px), but spot_diameter_um / spot_pitch_um = "
                    f"{diameter[0]:g} / {um:g} = {assumed:.2f}: set spot_pitch_um right in the sample "
                    "sheet (Visium 100 µm; legacy ST 200 µm with spot_diameter_um 100), or give mpp "
                    "(or mpp_source slide_metadata) when the spots are on another grid",
                    sample=sample,
                    path=path,
                )
        return um / px, f"spot pitch {px:.1f} px = {um:g} µm"
    if diameter is not None:
        return diameter[0] / diameter[1], f"spot diameter {diameter[1]:.1f} px = {diameter[0]:g} µm"
    return None


def check_positive(value: object, what: str, sample: str | None = None, path: str | Path | None = None) -> float:
    """``value`` as a float when it is a positive finite number, else a PipelineInputError."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise PipelineInputError(f"{what} must be a number, got {value!r}", sample=sample, path=path)
    if not (math.isfinite(value) and value > 0):
        raise PipelineInputError(f"{what} must be a positive finite number, got {value!r}", sample=sample, path=path)
    return float(value)

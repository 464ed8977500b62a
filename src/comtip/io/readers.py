"""The slide readers behind :class:`comtip.io.slide.Slide` — openslide (vendor formats), tifffile
(OME-TIFFs and SubIFD pyramids openslide cannot see), Pillow (plain JPEG/PNG/TIFF, in
:mod:`comtip.io.pillow_reader`) — and :func:`open_slide`, which picks the first reader that
accepts a file."""

from __future__ import annotations

import functools
import logging
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import tifffile

from comtip._core.errors import PipelineInputError
from comtip.io.pillow_reader import PillowSlide
from comtip.io.slide import WHITE, Slide, _composite_on_white, _mpp_from_resolution, _paste_inside, _Refused

log = logging.getLogger(__name__)

# Decoded tiles kept by the tifffile reader (openslide has its own cache).
TILE_CACHE_BYTES = 64 * 2**20
_OME_UNITS_UM = {"pm": 1e-6, "Å": 1e-4, "nm": 1e-3, "µm": 1.0, "um": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6}
# YCbCr tiles are JPEG, which the codec decodes to RGB.
_TIFF_PHOTOMETRICS = {tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR}


# -- openslide ----------------------------------------------------------------------------------


class OpenSlideSlide(Slide):
    """A slide read through openslide (thread-safe handle; openslide pads and caches)."""

    reader = "openslide"

    def __init__(self, path: Path):
        try:
            self._osr = openslide.OpenSlide(str(path))
        except openslide.OpenSlideError as err:
            raise _Refused(str(err) or type(err).__name__) from err
        try:
            mpp = _openslide_mpp(self._osr.properties, path)
        except BaseException:
            self._osr.close()
            raise
        super().__init__(
            path,
            [tuple(d) for d in self._osr.level_dimensions],
            [float(d) for d in self._osr.level_downsamples],
            mpp,
        )
        self._twin: TiffFileSlide | None | bool = None  # opened by the first band_source call
        self._band_sources: dict[int, Slide] = {}

    def _read(self, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
        image = self._osr.read_region((x, y), level, (w, h))
        rgba = np.asarray(image)
        if rgba[..., 3].min() == 255:  # the common case; PIL drops alpha faster than numpy
            return np.array(image.convert("RGB"))
        return _composite_on_white(rgba)

    def band_grid(self, level: int) -> tuple[int, int] | None:
        """The level's tile size; None at a non-integer downsample, where openslide would place
        the level at fractional offsets (so chunk reads could differ from other reads)."""
        d = self.level_downsamples[level]
        if d != round(d):
            return None
        props = self._osr.properties
        size = [props.get(f"openslide.level[{level}].tile-{dim}") for dim in ("width", "height")]
        return (int(size[0]), int(size[1])) if all(size) else (256, 256)

    def band_source(self, level: int) -> Slide:
        """A tifffile reader of the same file for band reads, where it decodes ``level``'s tiles to
        exactly openslide's pixels; else this slide.

        openslide's cost grows with the pixels it returns (it composites every region through
        premultiplied ARGB), tifffile's with the tiles it decodes: on JPEG tiles band reads through
        tifffile take a fraction of the time (BENCHMARKS.md, "Patch extraction"). Used only at a
        level that both readers see with the same size and tile grid, and only once a region of
        that level has been read by both and compared equal, pixel for pixel.
        """
        if level not in self._band_sources:
            self._band_sources[level] = self._tifffile_twin(level) or self
        return self._band_sources[level]

    def _tifffile_twin(self, level: int) -> Slide | None:
        if self._twin is None:
            try:
                self._twin = TiffFileSlide(self.path)
            except Exception as err:  # noqa: BLE001 - not a TIFF tifffile decodes: openslide serves
                log.debug("%s: band reads through openslide (tifffile: %s)", self.path, err)
                self._twin = False
        twin = self._twin
        if twin is False or level >= len(twin.level_dimensions):
            return None
        if twin.level_dimensions[level] != self.level_dimensions[level] or twin.band_grid(level) != self.band_grid(
            level
        ):
            return None
        tw, th = twin.band_grid(level)
        lw, lh = self.level_dimensions[level]
        d = self.level_downsamples[level]
        # a 2 x 2-tile region in the middle of the level and the level's first tile
        for lx, ly, w, h in (
            ((lw // 2) // tw * tw, (lh // 2) // th * th, 2 * tw, 2 * th),
            (0, 0, tw, th),
        ):
            x, y = round(lx * d), round(ly * d)
            if not np.array_equal(twin.read_region(x, y, w, h, level), self.read_region(x, y, w, h, level)):
                log.info(
                    "%s level %d: tifffile's pixels differ from openslide's; band reads through openslide",
                    self.path,
                    level,
                )
                return None
        return twin

    def close(self) -> None:
        if self._twin:
            self._twin.close()
        self._osr.close()


def _openslide_mpp(props: Any, path: Path) -> float | None:
    """``openslide.mpp-x``, else TIFF XResolution with a centimeter/inch unit, else None."""
    if openslide.PROPERTY_NAME_MPP_X in props:
        value = props[openslide.PROPERTY_NAME_MPP_X]
        try:
            return float(value)
        except ValueError as err:
            raise PipelineInputError(f"unreadable {openslide.PROPERTY_NAME_MPP_X} {value!r}", path=path) from err
    if "tiff.XResolution" in props and "tiff.ResolutionUnit" in props:
        return _mpp_from_resolution(float(props["tiff.XResolution"]), props["tiff.ResolutionUnit"])
    return None


# -- tifffile -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TiffLevel:
    """One tiled level: where its tiles are in the file and how to decode them."""

    width: int
    height: int
    tile_w: int
    tile_h: int
    samples: int
    offsets: tuple[int, ...]
    bytecounts: tuple[int, ...]
    decode: Callable[..., tuple[Any, Any, Any]]
    jpegtables: bytes | None

    @property
    def tiles_across(self) -> int:
        return -(-self.width // self.tile_w)


class TiffFileSlide(Slide):
    """A tiled TIFF pyramid read tile by tile through tifffile (OME-TIFF, SubIFD pyramids).

    Only the tiles that intersect a region are read and decoded, and the last decoded tiles are
    kept (:data:`TILE_CACHE_BYTES`) because neighbouring regions share them. File reads are
    serialised by a lock (one shared handle); decoding runs outside it, so threads overlap.
    """

    reader = "tifffile"

    def __init__(self, path: Path):
        try:
            self._tif = tifffile.TiffFile(path)
        except (tifffile.TiffFileError, OSError) as err:
            raise _Refused(str(err)) from err
        self._lock = threading.Lock()
        try:
            if not self._tif.series:
                raise _Refused("no image in this TIFF")
            self._levels = [_tiff_level(level) for level in self._tif.series[0].levels]
            tile_bytes = max(lv.tile_w * lv.tile_h * 3 for lv in self._levels)
            self._tile = functools.lru_cache(maxsize=max(1, TILE_CACHE_BYTES // tile_bytes))(self._decode_tile)
            for index in range(len(self._levels)):
                self._check_decodes(index)
            mpp = _tifffile_mpp(self._tif, path)
        except BaseException:
            self._tif.close()
            raise
        dims = [(lv.width, lv.height) for lv in self._levels]
        w0, h0 = dims[0]
        super().__init__(path, dims, [(w0 / w + h0 / h) / 2 for w, h in dims], mpp)

    def _check_decodes(self, level: int) -> None:
        """Decode one tile of a level now, so that a missing codec refuses the file at open."""
        stored = [i for i, count in enumerate(self._levels[level].bytecounts) if count][:1]
        try:
            for tile in stored:
                self._tile(level, tile)
        except Exception as err:  # any codec failure means this reader cannot serve the file
            raise _Refused(f"cannot decode tiles of level {level}: {type(err).__name__}: {err}", codec=True) from err

    def _decode_tile(self, level: int, index: int) -> np.ndarray:
        """Tile ``index`` of ``level`` as read-only RGB (tile_h, tile_w, 3); a missing tile is white."""
        lv = self._levels[level]
        offset, count = lv.offsets[index], lv.bytecounts[index]
        if count == 0:
            tile = np.full((lv.tile_h, lv.tile_w, 3), WHITE, np.uint8)
        else:
            with self._lock:
                handle = self._tif.filehandle
                handle.seek(offset)
                data = handle.read(count)
            pixels = lv.decode(data, index, jpegtables=lv.jpegtables)[0]
            tile = _to_rgb(pixels.reshape(lv.tile_h, lv.tile_w, lv.samples))
        tile.flags.writeable = False  # shared through the cache
        return tile

    def _read(self, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
        d = self.level_downsamples[level]
        lv = self._levels[level]
        reader = lambda lx, ly, rw, rh: self._read_inside(level, lx, ly, rw, rh)  # noqa: E731
        return _paste_inside(reader, (lv.width, lv.height), round(x / d), round(y / d), w, h)

    def _read_inside(self, level: int, lx: int, ly: int, w: int, h: int) -> np.ndarray:
        lv = self._levels[level]
        out = np.empty((h, w, 3), np.uint8)
        for ty in range(ly // lv.tile_h, (ly + h - 1) // lv.tile_h + 1):
            for tx in range(lx // lv.tile_w, (lx + w - 1) // lv.tile_w + 1):
                tile = self._tile(level, ty * lv.tiles_across + tx)
                tx0, ty0 = tx * lv.tile_w, ty * lv.tile_h
                x0, y0 = max(lx, tx0), max(ly, ty0)
                x1, y1 = min(lx + w, tx0 + lv.tile_w), min(ly + h, ty0 + lv.tile_h)
                out[y0 - ly : y1 - ly, x0 - lx : x1 - lx] = tile[y0 - ty0 : y1 - ty0, x0 - tx0 : x1 - tx0]
        return out

    def band_grid(self, level: int) -> tuple[int, int]:
        """The level's TIFF tiles: a tile-aligned chunk decodes each of its tiles once."""
        lv = self._levels[level]
        return (lv.tile_w, lv.tile_h)

    def tile_decoder(self, level: int) -> Callable[[int, int], np.ndarray]:
        """The level's tiles straight from the codec (not through the tile cache: the band pass
        holds the tiles it needs, and a tile it decodes is never asked for again)."""
        lv = self._levels[level]

        def decode(row: int, col: int) -> np.ndarray:
            tile = self._decode_tile(level, row * lv.tiles_across + col)
            return tile[: lv.height - row * lv.tile_h, : lv.width - col * lv.tile_w]

        return decode

    def close(self) -> None:
        self._tile.cache_clear()
        self._tif.close()


def _tiff_level(level: tifffile.TiffPageSeries) -> _TiffLevel:
    """Check that a series level is one tiled 8-bit RGB/grey plane and describe its tiles."""
    if len(level.pages) != 1:
        raise _Refused(f"a level has {len(level.pages)} planes; expected one RGB image")
    page, key = level.pages[0], level.keyframe
    if not key.is_tiled:
        raise _Refused("level is not tiled")
    if key.dtype != np.uint8 or key.samplesperpixel not in (1, 3, 4):
        raise _Refused(f"pixels are {key.dtype} x {key.samplesperpixel} samples; expected 8-bit grey/RGB(A)")
    if key.photometric not in _TIFF_PHOTOMETRICS:
        raise _Refused(f"photometric {key.photometric.name} is not grey or RGB")
    if key.samplesperpixel > 1 and key.planarconfig != tifffile.PLANARCONFIG.CONTIG:
        raise _Refused("planar (separated) samples are not supported")
    if key.imagedepth != 1:
        raise _Refused("volumetric tiles are not supported")
    return _TiffLevel(
        width=key.imagewidth,
        height=key.imagelength,
        tile_w=key.tilewidth,
        tile_h=key.tilelength,
        samples=key.samplesperpixel,
        offsets=tuple(page.dataoffsets),
        bytecounts=tuple(page.databytecounts),
        decode=key.decode,
        jpegtables=key.jpegtables,
    )


def _to_rgb(pixels: np.ndarray) -> np.ndarray:
    """(h, w, s) grey, RGB or RGBA ``uint8`` to RGB, RGBA composited on white."""
    if pixels.shape[2] == 1:
        return np.repeat(pixels, 3, axis=2)
    if pixels.shape[2] == 4:
        return _composite_on_white(pixels)
    return pixels


def _tifffile_mpp(tif: tifffile.TiffFile, path: Path) -> float | None:
    """µm/px from OME ``PhysicalSizeX``, else from level-0 resolution tags (cm or inch)."""
    if tif.is_ome:
        mpp = _ome_mpp(tif.ome_metadata, path)
        if mpp is not None:
            return mpp
    page = tif.series[0].levels[0].keyframe
    if "XResolution" not in page.tags or "ResolutionUnit" not in page.tags:
        return None
    return _mpp_from_resolution(page.resolution[0], page.resolutionunit.name)


def _ome_mpp(xml: str | None, path: Path) -> float | None:
    """``PhysicalSizeX`` of the first OME image in µm, or None when the OME-XML has none."""
    pixels = ET.fromstring(xml).find(".//{*}Image/{*}Pixels") if xml else None
    if pixels is None or "PhysicalSizeX" not in pixels.attrib:
        return None
    unit = pixels.attrib.get("PhysicalSizeXUnit", "µm")
    if unit not in _OME_UNITS_UM:
        raise PipelineInputError(f"OME PhysicalSizeXUnit {unit!r} is not a length unit", path=path)
    return float(pixels.attrib["PhysicalSizeX"]) * _OME_UNITS_UM[unit]


# -- opening ------------------------------------------------------------------------------------

_READERS: dict[str, Callable[[Path], Slide]] = {
    "openslide": OpenSlideSlide,
    "tifffile": TiffFileSlide,
    "pillow": PillowSlide,
}


def open_slide(path: str | Path, *, sample: str | None = None) -> Slide:
    """Open a slide with the first reader that accepts it (order chosen by file type).

    TIFFs go to openslide first, except OME-TIFFs and SubIFD pyramids (whose levels openslide
    does not see), which go to tifffile first; other files to openslide, then Pillow. Raises
    :class:`PipelineInputError` naming the file and each reader's reason when none accepts it.
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineInputError("slide file not found", sample=sample, path=path)
    reasons, codec_failures = [], []
    for name in _reader_order(path):
        try:
            slide = _READERS[name](path)
        except _Refused as err:
            reasons.append(f"{name}: {err}")
            if err.codec:
                codec_failures.append(f"{name}: {err}")
            continue
        except PipelineInputError as err:  # bad metadata found by a reader: add the sample
            raise PipelineInputError(err.message, sample=sample, path=path) from err
        for failure in codec_failures:  # a fallback that may see less of the file: never silent
            log.warning(
                "%s%s: %s; opened with %s instead (%d level(s), µm/px %s), which may not see the whole "
                "pyramid or the resolution",
                f"[sample {sample}] " if sample else "",
                path,
                failure,
                name,
                len(slide.level_dimensions),
                "unknown" if slide.metadata_mpp is None else f"{slide.metadata_mpp:.4g}",
            )
        return slide
    raise PipelineInputError("no reader can open this slide (" + "; ".join(reasons) + ")", sample=sample, path=path)


def _reader_order(path: Path) -> list[str]:
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic not in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
        return ["openslide", "pillow"]
    if _pyramid_hidden_from_openslide(path):
        return ["tifffile", "openslide", "pillow"]
    return ["openslide", "tifffile", "pillow"]


def _pyramid_hidden_from_openslide(path: Path) -> bool:
    """True for OME-TIFFs and SubIFD pyramids: openslide would open them with level 0 only."""
    try:
        with tifffile.TiffFile(path) as tif:
            return bool(tif.is_ome or (len(tif.pages) and tif.pages[0].subifds))
    except tifffile.TiffFileError:
        return False  # not parseable by tifffile: let the readers give their own reasons

"""The Pillow reader of :func:`comtip.io.readers.open_slide`: a plain image (JPEG, PNG, non-tiled
TIFF) decoded once into memory."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from comtip.io.slide import Slide, _composite_on_white, _mpp_from_resolution, _paste_inside, _Refused

# Rows of a plain image copied at once into its array by the Pillow reader.
PILLOW_BAND_BYTES = 64 * 2**20
_PILLOW_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"}


class PillowSlide(Slide):
    """A plain image (JPEG, PNG, non-tiled TIFF) decoded once and kept in memory as RGB."""

    reader = "pillow"

    def __init__(self, path: Path):
        with _unlimited_pixels():
            try:
                image = Image.open(path)
            except OSError as err:
                raise _Refused(str(err)) from err
            with image:
                _check_plain_image(image)
                mpp = _pillow_mpp(image)
                try:
                    self._pixels = _pillow_rgb(image)
                except OSError as err:  # truncated or corrupt pixel data
                    raise _Refused(f"cannot decode pixels: {err}") from err
        height, width = self._pixels.shape[:2]
        super().__init__(path, [(width, height)], [1.0], mpp)

    def _read(self, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
        reader = lambda lx, ly, rw, rh: self._pixels[ly : ly + rh, lx : lx + rw].copy()  # noqa: E731
        return _paste_inside(reader, self.dimensions, x, y, w, h)

    def close(self) -> None:
        self._pixels = np.empty((0, 0, 3), np.uint8)


@contextlib.contextmanager
def _unlimited_pixels() -> Iterator[None]:
    """Lift Pillow's decompression-bomb limit while opening one slide (full-res H&E is huge)."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _check_plain_image(image: Image.Image) -> None:
    """Refuse what would be wrong to load whole: tiled or multi-page TIFFs, non-8-bit pixels."""
    if image.format == "TIFF" and (322 in image.tag_v2 or 330 in image.tag_v2):  # TileWidth, SubIFDs
        raise _Refused("tiled or SubIFD TIFF: a pyramid must not be loaded whole into memory")
    if getattr(image, "n_frames", 1) > 1:
        raise _Refused(f"{image.n_frames} frames/pages: a pyramid must not be loaded whole into memory")
    if image.mode not in _PILLOW_MODES:
        raise _Refused(f"pixel mode {image.mode!r} is not 8-bit grey/colour")


def _pillow_mpp(image: Image.Image) -> float | None:
    """µm/px only from TIFF resolution tags in centimeters (dpi of plain images is arbitrary)."""
    if image.format != "TIFF" or image.tag_v2.get(296) != 3 or 282 not in image.tag_v2:
        return None
    return _mpp_from_resolution(float(image.tag_v2[282]), "centimeter")


def _pillow_rgb(image: Image.Image) -> np.ndarray:
    """Decode to an RGB array band by band (no whole-image temporaries), transparency on white."""
    has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    mode = "RGBA" if has_alpha else "RGB"
    decoded = image if image.mode == mode else image.convert(mode)
    width, height = decoded.size
    rows = max(1, PILLOW_BAND_BYTES // (4 * width))
    out = np.empty((height, width, 3), np.uint8)
    for top in range(0, height, rows):
        band = np.asarray(decoded.crop((0, top, width, min(height, top + rows))))
        out[top : top + rows] = _composite_on_white(band) if has_alpha else band
    return out

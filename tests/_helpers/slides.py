"""Synthetic slide pyramids whose every pixel is known (test_slide, test_patches)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

WIDTH, HEIGHT = 1000, 760
DOWNSAMPLES = (1, 2, 4)


def position_image(width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """RGB where every pixel of the image has a distinct colour that encodes its position."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x % 256, y % 256, 16 * (x // 256) + 64 * (y // 256) + 3], axis=-1).astype(np.uint8)


def pyramid(source: np.ndarray) -> list[np.ndarray]:
    """Levels of downsample 1, 2, 4 taken by striding, so each level's pixels are known exactly."""
    return [np.ascontiguousarray(source[::d, ::d]) for d in DOWNSAMPLES]


def write_generic_tiff(path: Path, levels: list[np.ndarray], mpp: float) -> Path:
    """Tiled pyramid as consecutive pages with µm/px in centimeter tags: openslide generic-tiff."""
    with tifffile.TiffWriter(path) as tw:
        for i, level in enumerate(levels):
            ppcm = 1e4 / (mpp * DOWNSAMPLES[i])
            tw.write(
                level, tile=(128, 128), compression="zlib", photometric="rgb",
                resolution=(ppcm, ppcm), resolutionunit="CENTIMETER", subfiletype=0 if i == 0 else 1,
            )  # fmt: skip
    return path


def write_jpeg_ome_tiff(path: Path, levels: list[np.ndarray], mpp: float, *, tile: int = 128) -> Path:
    """A JPEG-compressed (quality 90) pyramidal OME-TIFF, as QuPath and bfconvert write them:
    the levels in SubIFDs, µm/px in the OME-XML (PhysicalSizeX/Y)."""
    options = {"tile": (tile, tile), "compression": "jpeg", "compressionargs": {"level": 90}, "photometric": "rgb"}
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(
            levels[0], subifds=len(levels) - 1, **options,
            metadata={"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp, "PhysicalSizeXUnit": "µm",
                      "PhysicalSizeYUnit": "µm"},
        )  # fmt: skip
        for level in levels[1:]:
            tw.write(level, subfiletype=1, **options)
    return path

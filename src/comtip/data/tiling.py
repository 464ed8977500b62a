"""Tissue detection at low resolution, a tile grid at the target µm/px, and a thumbnail to check.

Tissue is found the usual way for H&E (as in CLAM and HEST): saturation of a low-resolution
image, Gaussian blur, Otsu threshold (with a floor, so an empty slide stays empty), then
morphological closing/opening, removal of small debris and filling of small holes. Sizes are
given in µm and converted with the slide's µm/px, so the same config fits any scanner.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, PngImagePlugin
from scipy import ndimage
from skimage.color import rgb2hsv
from skimage.filters import threshold_otsu

from comtip._core.atomic import atomic_paths
from comtip._core.errors import PipelineInputError
from comtip.io.readers import open_slide

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TissueParams:
    """Tissue detection settings (config key ``tiling``)."""

    mask_mpp: float = 8.0
    blur_sigma_px: float = 1.0
    min_saturation: float = 0.05
    closing_radius_um: float = 50.0
    opening_radius_um: float = 20.0
    min_object_um2: float = 40000.0
    max_hole_um2: float = 40000.0


def _disk(radius_px: float) -> np.ndarray:
    r = int(round(radius_px))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return xx * xx + yy * yy <= r * r


def _drop_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_px
    keep[0] = False
    return keep[labels]


def detect_tissue(rgb: np.ndarray, mask_mpp: float, params: TissueParams) -> np.ndarray:
    """Boolean tissue mask of an RGB image whose pixels are ``mask_mpp`` µm wide."""
    saturation = rgb2hsv(rgb)[..., 1]
    if params.blur_sigma_px > 0:
        saturation = ndimage.gaussian_filter(saturation, params.blur_sigma_px)
    flat = saturation.ravel()
    threshold = threshold_otsu(flat) if flat.min() < flat.max() else flat.max()
    mask = saturation > max(threshold, params.min_saturation)
    if params.closing_radius_um > 0:
        # Pad so that closing does not eat tissue touching the image border.
        pad = int(round(params.closing_radius_um / mask_mpp)) + 1
        padded = np.pad(mask, pad, mode="edge")
        mask = ndimage.binary_closing(padded, _disk(params.closing_radius_um / mask_mpp))[pad:-pad, pad:-pad]
    if params.opening_radius_um > 0:
        mask = ndimage.binary_opening(mask, _disk(params.opening_radius_um / mask_mpp))
    px_area = mask_mpp * mask_mpp
    mask = _drop_small(mask, params.min_object_um2 / px_area)
    holes = ndimage.binary_fill_holes(mask) & ~mask
    large_holes = _drop_small(holes, params.max_hole_um2 / px_area)
    return mask | (holes & ~large_holes)


def tile_grid(
    mask: np.ndarray,
    scale: tuple[float, float],
    dimensions: tuple[int, int],
    tile_size: float,
    min_tissue_fraction: float,
) -> pd.DataFrame:
    """Non-overlapping tiles of ``tile_size`` level-0 px that fit inside the slide.

    ``scale`` = level-0 px per mask px (x, y). The tissue fraction of a tile is the mean of the
    mask over the tile's footprint, from a summed-area table (exact for whole mask pixels).
    Tiles with less tissue than ``min_tissue_fraction`` are left out.
    """
    width, height = dimensions
    n_cols, n_rows = int(width // tile_size), int(height // tile_size)
    if n_cols == 0 or n_rows == 0:
        return pd.DataFrame(columns=["x", "y", "size", "row", "col", "tissue_fraction"])
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1))
    integral[1:, 1:] = mask.astype(np.float64).cumsum(0).cumsum(1)
    cols, rows = np.meshgrid(np.arange(n_cols), np.arange(n_rows))
    x0, y0 = cols.ravel() * tile_size, rows.ravel() * tile_size

    def to_mask(v: np.ndarray, s: float, n: int) -> np.ndarray:
        return np.clip(np.round(v / s).astype(int), 0, n)

    mx0, mx1 = to_mask(x0, scale[0], mask.shape[1]), to_mask(x0 + tile_size, scale[0], mask.shape[1])
    my0, my1 = to_mask(y0, scale[1], mask.shape[0]), to_mask(y0 + tile_size, scale[1], mask.shape[0])
    mx1, my1 = np.maximum(mx1, mx0 + 1), np.maximum(my1, my0 + 1)
    mx1, my1 = np.minimum(mx1, mask.shape[1]), np.minimum(my1, mask.shape[0])
    area = (mx1 - mx0) * (my1 - my0)
    inside = integral[my1, mx1] - integral[my0, mx1] - integral[my1, mx0] + integral[my0, mx0]
    fraction = np.where(area > 0, inside / np.maximum(area, 1), 0.0)
    tiles = pd.DataFrame(
        {
            "x": x0.astype(np.float64),
            "y": y0.astype(np.float64),
            "size": np.full(x0.shape, float(tile_size)),
            "row": rows.ravel(),
            "col": cols.ravel(),
            "tissue_fraction": fraction,
        }
    )
    return tiles[tiles["tissue_fraction"] >= min_tissue_fraction].reset_index(drop=True)


def draw_overlay(
    thumb: np.ndarray,
    mask: np.ndarray,
    spots_xy: np.ndarray | None,
    spot_diameter: float,
    scale: tuple[float, float],
    spot_shape: str = "circle",
) -> Image.Image:
    """Thumbnail with the tissue contour (green) and the spots (blue circles, or squares for
    Visium HD bins: ``spot_shape``) drawn on it.

    ``spots_xy`` and ``spot_diameter`` (a square's side) are in level-0 px; ``scale`` = level-0
    px per thumb px.
    """
    image = Image.fromarray(thumb).convert("RGB")
    mask_img = Image.fromarray(mask.astype(np.uint8) * 255).resize(image.size, Image.Resampling.NEAREST)
    big = np.asarray(mask_img) > 0
    edge = big & ~ndimage.binary_erosion(big, iterations=max(1, image.size[0] // 600))
    pixels = np.asarray(image).copy()
    pixels[edge] = (0, 200, 0)
    image = Image.fromarray(pixels)
    if spots_xy is not None and len(spots_xy):
        draw = ImageDraw.Draw(image)
        rx, ry = spot_diameter / 2 / scale[0], spot_diameter / 2 / scale[1]
        shape = draw.rectangle if spot_shape == "square" else draw.ellipse
        for x, y in spots_xy:
            cx, cy = x / scale[0], y / scale[1]
            shape((cx - rx, cy - ry, cx + rx, cy + ry), outline=(30, 60, 230))
    return image


def tile_slide(
    slide_path: str | Path,
    spots_h5ad: str | Path | None,
    out_mask: str | Path,
    out_tiles: str | Path,
    out_thumbnail: str | Path,
    *,
    sample: str,
    mpp: float | None = None,
    tissue: TissueParams = TissueParams(),
    tile_px: int = 224,
    tile_mpp: float = 0.5,
    min_tissue_fraction: float = 0.1,
    thumbnail_max_px: int = 1600,
) -> pd.DataFrame:
    """Write the tissue mask, the tile grid and the overlay thumbnail of one slide.

    µm/px comes from ``spots.h5ad`` (decided at ingest) when given, else from ``mpp`` (sample
    sheet), else from the slide's metadata; H&E-only samples have no spot geometry to fall back on.
    """
    spots_xy, spot_diameter, spot_shape = None, 0.0, "circle"
    if spots_h5ad is not None:
        spots = ad.read_h5ad(spots_h5ad, backed="r")
        info = spots.uns["comtip"]
        mpp = float(info["mpp"])
        spots_xy = np.asarray(spots.obsm["spatial"], dtype=np.float64)
        spot_diameter = float(info["spot_diameter_px"])
        spot_shape = str(info.get("spot_shape", "circle"))
        spots.file.close()
    with open_slide(slide_path, sample=sample) as slide:
        if mpp is None:
            mpp = slide.metadata_mpp
        if mpp is None:
            raise PipelineInputError(
                "no µm/px for this slide: its metadata has none and there is no Space Ranger "
                "output; set `mpp` in the sample sheet",
                sample=sample,
                path=slide_path,
            )
        mask_rgb, mask_scale = slide.thumbnail(tissue.mask_mpp / mpp)
        thumb_down = max(1.0, max(slide.dimensions) / thumbnail_max_px)
        thumb, thumb_scale = slide.thumbnail(thumb_down)
        dimensions = slide.dimensions
    mask_mpp = mpp * (mask_scale[0] + mask_scale[1]) / 2
    mask = detect_tissue(mask_rgb, mask_mpp, tissue)
    if not mask.any():
        raise PipelineInputError(
            "tissue mask is empty: no tissue found at the configured saturation threshold "
            f"(tiling.min_saturation = {tissue.min_saturation}); is the slide blank or not H&E?",
            sample=sample,
            path=slide_path,
        )
    tiles = tile_grid(mask, mask_scale, dimensions, tile_px * tile_mpp / mpp, min_tissue_fraction)
    log.info(
        "[%s] tissue covers %.1f %% of the slide; %d tiles of %d px at %.3g um/px",
        sample,
        100 * mask.mean(),
        len(tiles),
        tile_px,
        tile_mpp,
    )
    overlay = draw_overlay(thumb, mask, spots_xy, spot_diameter, thumb_scale, spot_shape)
    meta = PngImagePlugin.PngInfo()
    meta.add_text("downsample_x", repr(mask_scale[0]))
    meta.add_text("downsample_y", repr(mask_scale[1]))
    meta.add_text("level0_mpp", repr(mpp))
    with atomic_paths(out_mask, out_tiles, out_thumbnail) as (tmp_mask, tmp_tiles, tmp_thumb):
        Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_mask, format="PNG", pnginfo=meta)
        tiles.to_parquet(tmp_tiles, index=False)
        overlay.save(tmp_thumb, format="PNG")
    return tiles


def read_mask(path: str | Path) -> tuple[np.ndarray, tuple[float, float]]:
    """The tissue mask written by :func:`tile_slide` and its level-0 px per mask px (x, y)."""
    with Image.open(path) as im:
        mask = np.asarray(im) > 0
        return mask, (float(im.text["downsample_x"]), float(im.text["downsample_y"]))

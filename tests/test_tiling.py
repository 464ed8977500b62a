"""Tissue detection, tile grid and thumbnail on small synthetic slides."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from comtip._core.errors import PipelineInputError
from comtip.data.tiling import TissueParams, detect_tissue, read_mask, tile_grid, tile_slide

BACKGROUND = (242, 240, 244)


def he_like(size: int, box: tuple[int, int, int, int], seed: int = 0) -> np.ndarray:
    """White slide with an H&E-coloured rectangle and a little noise everywhere."""
    rng = np.random.default_rng(seed)
    image = np.empty((size, size, 3), np.float64)
    image[:] = BACKGROUND
    y0, y1, x0, x1 = box
    image[y0:y1, x0:x1] = (205, 120, 175)
    image += rng.normal(0, 3, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def test_mask_finds_the_tissue_rectangle():
    rgb = he_like(120, (30, 90, 20, 100))
    truth = np.zeros((120, 120), bool)
    truth[30:90, 20:100] = True
    mask = detect_tissue(rgb, 8.0, TissueParams())
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.9


def test_blank_slide_gives_an_empty_mask():
    rgb = he_like(120, (0, 0, 0, 0))
    assert not detect_tissue(rgb, 8.0, TissueParams()).any()


def test_debris_is_dropped_and_small_holes_filled():
    rgb = he_like(200, (40, 160, 40, 160))
    rgb[95:100, 95:100] = BACKGROUND  # 5x5 px hole = 1600 µm² at 8 µm/px: filled
    rgb[5:8, 180:183] = (205, 120, 175)  # 3x3 px speck = 576 µm²: dropped
    mask = detect_tissue(rgb, 8.0, TissueParams(opening_radius_um=0, closing_radius_um=0, blur_sigma_px=0))
    assert mask[97, 97]
    assert not mask[6, 181]


def test_tile_grid_fractions_and_bounds():
    mask = np.zeros((10, 10), bool)
    mask[:, :4] = True  # tissue on x < 40 of 100
    tiles = tile_grid(mask, (10.0, 10.0), (100, 100), 25.0, min_tissue_fraction=0.0)
    assert len(tiles) == 16
    assert (tiles["x"] + tiles["size"] <= 100).all() and (tiles["y"] + tiles["size"] <= 100).all()
    by_col = tiles.groupby("col")["tissue_fraction"].mean()
    np.testing.assert_allclose(by_col.to_numpy(), [1.0, 0.6, 0.0, 0.0], atol=0.1)
    kept = tile_grid(mask, (10.0, 10.0), (100, 100), 25.0, min_tissue_fraction=0.8)
    assert set(kept["col"]) == {0}


def write_spots(path: Path, xy: np.ndarray, mpp: float, diameter_px: float) -> Path:
    adata = ad.AnnData(np.ones((len(xy), 2), np.float32))
    adata.obs_names = [f"s{i}" for i in range(len(xy))]
    adata.obsm["spatial"] = xy.astype(np.float64)
    adata.uns["comtip"] = {"mpp": mpp, "spot_diameter_px": diameter_px}
    adata.write_h5ad(path)
    return path


def test_tile_slide_writes_mask_tiles_and_thumbnail(tmp_path):
    size = 1600  # 1600 px at 1 µm/px; tissue in the middle
    slide = tmp_path / "slide.png"
    Image.fromarray(he_like(size, (400, 1200, 300, 1300))).save(slide)
    spots = write_spots(tmp_path / "spots.h5ad", np.array([[800.0, 800.0], [500.0, 600.0]]), 1.0, 55.0)
    out = tmp_path / "out"
    tiles = tile_slide(
        slide,
        spots,
        out / "mask.png",
        out / "tiles.parquet",
        out / "thumb.png",
        sample="s1",
        tissue=TissueParams(mask_mpp=8.0),
        tile_px=100,
        tile_mpp=1.0,
        min_tissue_fraction=0.5,
        thumbnail_max_px=400,
    )
    mask, scale = read_mask(out / "mask.png")
    assert mask.shape == (200, 200) and scale == (8.0, 8.0)
    assert mask[100, 100] and not mask[10, 10]
    saved = pd.read_parquet(out / "tiles.parquet")
    pd.testing.assert_frame_equal(saved, tiles)
    # tiles sit on the tissue rectangle (x 300..1300, y 400..1200) and nowhere else
    centres_x, centres_y = saved["x"] + 50, saved["y"] + 50
    assert ((centres_x > 250) & (centres_x < 1350) & (centres_y > 350) & (centres_y < 1250)).all()
    assert len(saved) >= 0.9 * 10 * 8
    with Image.open(out / "thumb.png") as thumb:
        assert thumb.size == (400, 400)
        pixels = np.asarray(thumb.convert("RGB"))
    assert (pixels == (0, 200, 0)).all(axis=2).sum() > 100  # tissue contour drawn
    assert (pixels == (30, 60, 230)).all(axis=2).sum() > 10  # spot circles drawn


def test_empty_mask_is_an_error_naming_sample_and_file(tmp_path):
    slide = tmp_path / "blank.png"
    Image.fromarray(he_like(400, (0, 0, 0, 0))).save(slide)
    spots = write_spots(tmp_path / "spots.h5ad", np.array([[100.0, 100.0]]), 1.0, 55.0)
    out = tmp_path / "out"
    with pytest.raises(PipelineInputError, match=r"\[sample s1\].*blank\.png.*tissue mask is empty"):
        tile_slide(slide, spots, out / "m.png", out / "t.parquet", out / "th.png", sample="s1")
    assert not out.exists() or not any(out.iterdir())

"""The report's maps over the H&E and its headline table (comtip.evaluation.figures), on small
synthetic slides and tables."""

from __future__ import annotations

import base64
import re

import anndata as ad
import numpy as np
import pandas as pd
from PIL import Image

from _helpers.slides import position_image, pyramid, write_generic_tiff
from comtip.evaluation.figures import he_background, headline_table, landing_maps_html, spatial_maps

PINK = (231, 84, 190)  # far from every viridis colour and from white


def test_he_background_is_the_slide_box_around_the_spots(tmp_path):
    source = position_image()
    slide = write_generic_tiff(tmp_path / "slide.tif", pyramid(source), mpp=0.5)
    xy = np.array([[300.0, 200.0], [600.0, 500.0]])
    image, extent = he_background(slide, xy, margin=50)
    assert extent == (250.0, 650.0, 550.0, 150.0)  # left, right, bottom, top (imshow's order)
    np.testing.assert_array_equal(image, source[150:550, 250:650])
    small, _ = he_background(slide, xy, margin=50, max_px=100)
    assert small.shape == (100, 100, 3)


def test_maps_draw_truth_and_each_method_as_spots_over_the_he(tmp_path):
    """A pink slide: the map's panels show pink between the spots (the H&E is drawn), and the
    spots' colours vary (the values are drawn over it)."""
    write_generic_tiff(tmp_path / "slide.tif", pyramid(np.full((760, 1000, 3), PINK, np.uint8)), mpp=0.5)
    rows, cols = np.mgrid[0:8, 0:10]
    xy = np.stack([150 + 70.0 * cols.ravel() + 35 * (rows.ravel() % 2), 150 + 60.0 * rows.ravel()], axis=1)
    values = np.random.default_rng(0).random((len(xy), 2)).astype(np.float32)
    spots = ad.AnnData(np.zeros((len(xy), 2), np.float32), obsm={"spatial": xy})
    spots.uns["comtip"] = {"spot_shape": "circle", "spot_diameter_px": 30.0}
    spots.write_h5ad(tmp_path / "spots.h5ad")
    np.savez(tmp_path / "truth.npz", panel_genes=np.array(["G1", "G2"]), panel_values=values)
    ad.AnnData(values[:, ::-1].copy()).write_h5ad(tmp_path / "ridge.h5ad")
    out = tmp_path / "maps" / "s.png"
    spatial_maps("s", tmp_path / "truth.npz", tmp_path / "spots.h5ad", {"ridge": tmp_path / "ridge.h5ad"},
                 ["G1", "G2"], out, tmp_path / "slide.tif")  # fmt: skip
    with Image.open(out) as im:
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3).astype(int)
    pink = (np.abs(pixels - PINK).sum(axis=1) < 30).mean()
    assert pink > 0.05, f"the H&E covers {pink:.1%} of the figure"
    coloured = pixels[(np.abs(pixels - PINK).sum(axis=1) > 60) & (pixels.min(axis=1) < 200)]
    assert len(np.unique(coloured // 16, axis=0)) > 20, "the spots should be drawn in many colours"


def test_headline_table_has_one_row_per_method_and_its_mean_pearson_per_gene_set(tmp_path):
    summary = pd.DataFrame(
        {
            "method": ["mean", "mean", "ridge", "ridge"],
            "gene_set": ["all", "heldout", "all", "heldout"],
            "pearson_mean": [np.nan, np.nan, 0.41234, -0.0456],
            "mse_mean": [0.5, 0.6, 0.25, 0.3],
        }
    )
    summary.to_csv(tmp_path / "summary.tsv", sep="\t", index=False)
    headline_table(tmp_path / "summary.tsv", tmp_path / "headline.tsv")
    table = pd.read_csv(tmp_path / "headline.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert list(table.columns) == ["method", "Pearson all", "Pearson heldout", "MSE all"]
    assert table.to_numpy().tolist() == [["mean", "n/a", "n/a", "0.500"], ["ridge", "0.412", "-0.046", "0.250"]]


def test_landing_maps_inline_each_png_as_a_data_uri(tmp_path):
    pngs = []
    for name, colour in (("a", "red"), ("b", "blue")):
        Image.new("RGB", (30, 20), colour).save(tmp_path / f"{name}.png")
        pngs.append(tmp_path / f"{name}.png")
    landing_maps_html(pngs, tmp_path / "landing.html")
    html = (tmp_path / "landing.html").read_text()
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert [base64.b64decode(u) for u in uris] == [p.read_bytes() for p in pngs]
    assert f'alt="{pngs[0]}"' in html and "<figcaption>b</figcaption>" in html

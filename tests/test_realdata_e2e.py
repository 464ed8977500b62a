"""her2st sections (real H&E JPEG + counts) through ingest -> tile -> patches with Snakemake."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from skimage.color import rgb2hsv

from _helpers.workflow import snakemake, write_run_folder
from comtip.data.tiling import read_mask
from comtip.io.readers import open_slide
from conftest import shared_data

pytestmark = [pytest.mark.realdata, pytest.mark.e2e]
SECTIONS = ("C2", "C3")


@pytest.fixture(scope="module")
def her2st_run(tmp_path_factory):
    rows = []
    for section in SECTIONS:
        outs = shared_data("her2st", section, "outs")
        slide = next((outs / "image").glob("*.jpg"))
        rows.append(f"{section}\t{outs}\t{slide}\ttrain\t\t100\t\tC\t200")
    root = write_run_folder(tmp_path_factory.mktemp("her2st"), rows)
    targets = [
        f"results/{s}/{f}"
        for s in SECTIONS
        for f in ("spots.h5ad", "spot_patches.npy", "spot_patches.parquet", "tissue_mask.png")
    ]
    snakemake(root, *targets)
    return root


@pytest.mark.parametrize("section", SECTIONS)
def test_her2st_spot_patches_are_tissue(her2st_run, section):
    results = her2st_run / "results" / section
    spots = ad.read_h5ad(results / "spots.h5ad")
    assert spots.uns["comtip"]["mpp_source"] == "spot_geometry"
    assert spots.uns["comtip"]["mpp"] == pytest.approx(0.69, abs=0.01)
    patches = np.load(results / "spot_patches.npy", mmap_mode="r")
    assert patches.shape == (spots.n_obs, 224, 224, 3)
    index = pd.read_parquet(results / "spot_patches.parquet")
    assert list(index["barcode"]) == list(spots.obs_names)
    assert not index["crosses_edge"].any()

    # in-tissue spots lie on the detected tissue, and their patches look like stained tissue
    mask, (sx, sy) = read_mask(results / "tissue_mask.png")
    xy = spots.obsm["spatial"]
    on_mask = mask[(xy[:, 1] / sy).astype(int), (xy[:, 0] / sx).astype(int)]
    assert on_mask.mean() > 0.9
    saturation = np.array([rgb2hsv(np.asarray(p))[..., 1].mean() for p in patches[::5]])
    with open_slide(spots.uns["comtip"]["slide_path"]) as slide:
        corner = slide.read_region(0, 0, 224, 224)
    background = rgb2hsv(corner)[..., 1].mean()
    assert np.median(saturation) > background + 0.1

"""Prediction files: spot predictions that plot like the measured sample, and virtual Visium on a
synthetic H&E-only slide whose tissue gets brighter from left to right."""

from __future__ import annotations

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from PIL import Image

from _helpers.finetuning import GENES, save_pretrained, write_sample
from comtip._core.errors import PipelineInputError
from comtip.data.tiling import TissueParams, tile_slide
from comtip.finetune import FinetuneConfig, finetune, load_finetuned
from comtip.predict.slides import predict_slide
from comtip.predict.writers import write_prediction_h5ad

SAMPLE = "s1"
TISSUE = (192, 128, 640, 448)  # x0, y0, x1, y1 of the tissue rectangle, level-0 px (on the 64 px tile grid)
TINT = np.array([235.0, 160.0, 210.0])  # the patches' colour in _helpers.finetuning.write_sample


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_spots(path, n: int = 30, seed: int = 0):
    """A spots.h5ad as ingest writes it: counts, spatial coordinates, scale factors, low-res image."""
    rng = np.random.default_rng(seed)
    adata = ad.AnnData(
        X=rng.poisson(3, (n, 5)).astype(np.float32),
        obs=pd.DataFrame(
            {"in_tissue": 1, "array_row": np.arange(n) // 6, "array_col": np.arange(n) % 6, "total_counts": 1.0},
            index=[f"AAAC{i:04d}-1" for i in range(n)],
        ),
        var=pd.DataFrame(index=[f"G{i}" for i in range(5)]),
    )
    adata.obsm["spatial"] = rng.uniform(100, 900, (n, 2))
    adata.uns["spatial"] = {
        SAMPLE: {
            "images": {"lowres": rng.uniform(0, 1, (100, 100, 3)).astype(np.float32)},
            "scalefactors": {"tissue_lowres_scalef": 0.1, "spot_diameter_fullres": 40.0},
            "metadata": {"source": "synthetic"},
        }
    }
    adata.uns["comtip"] = {"sample": SAMPLE, "mpp": 0.5, "spot_diameter_px": 40.0}
    adata.write_h5ad(path)
    return adata


def test_spot_predictions_round_trip_with_the_spots_coordinates_and_images(tmp_path):
    spots = write_spots(tmp_path / "spots.h5ad")
    pred = np.random.default_rng(1).uniform(0, 3, (spots.n_obs, 3))
    genes = ["EPCAM", "PTPRC", "ACTB"]
    write_prediction_h5ad(
        tmp_path / "pred.h5ad",
        pred,
        genes,
        tmp_path / "spots.h5ad",
        "comtip_linear",
        {"checkpoint": "head.pt"},
        barcodes=list(spots.obs_names),
    )
    back = sc.read_h5ad(tmp_path / "pred.h5ad")
    assert back.X.dtype == np.float32
    np.testing.assert_allclose(back.X, pred.astype(np.float32))
    assert list(back.var_names) == genes and list(back.obs_names) == list(spots.obs_names)
    np.testing.assert_array_equal(back.obsm["spatial"], spots.obsm["spatial"])
    assert back.uns["spatial"][SAMPLE]["scalefactors"]["tissue_lowres_scalef"] == 0.1
    assert list(back.obs["array_row"]) == list(spots.obs["array_row"])
    assert "total_counts" not in back.obs  # measured QC is not a property of the prediction
    info = back.uns["comtip_prediction"]
    assert info["method"] == "comtip_linear" and info["scale"] == "log1p_cp10k" and info["checkpoint"] == "head.pt"
    sc.pl.spatial(back, color="EPCAM", img_key="lowres", library_id=SAMPLE, show=False)
    plt.close("all")


def test_misaligned_predictions_are_refused_and_nothing_is_written(tmp_path):
    spots = write_spots(tmp_path / "spots.h5ad")
    pred = np.zeros((spots.n_obs, 2))
    swapped = list(spots.obs_names)
    swapped[3], swapped[4] = swapped[4], swapped[3]
    with pytest.raises(PipelineInputError, match="row 3 is barcode 'AAAC0004-1'"):
        write_prediction_h5ad(tmp_path / "p.h5ad", pred, ["A", "B"], tmp_path / "spots.h5ad", "m", barcodes=swapped)
    with pytest.raises(PipelineInputError, match="29 predicted rows for 30 spots"):
        write_prediction_h5ad(tmp_path / "p.h5ad", pred[:-1], ["A", "B"], tmp_path / "spots.h5ad", "m")
    with pytest.raises(ValueError, match="3 genes"):
        write_prediction_h5ad(tmp_path / "p.h5ad", pred, ["A", "B", "C"], tmp_path / "spots.h5ad", "m")
    assert not (tmp_path / "p.h5ad").exists()


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> dict:
    """An 800 x 600 px PNG at 1 µm/px: white glass, one pink tissue rectangle whose brightness
    rises from 0.3 (left) to 0.9 (right), tiled into 64 px tiles (32 px at 2 µm/px)."""
    root = tmp_path_factory.mktemp("slide")
    rng = np.random.default_rng(0)
    image = np.full((600, 800, 3), 255.0)
    x0, y0, x1, y1 = TISSUE
    brightness = np.linspace(0.3, 0.9, x1 - x0)[None, :, None]
    image[y0:y1, x0:x1] = brightness * TINT + rng.normal(0, 12, (y1 - y0, x1 - x0, 3))
    path = root / "slide.png"
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path)
    tiles = tile_slide(
        path,
        None,
        root / "mask.png",
        root / "tiles.parquet",
        root / "thumb.png",
        sample=SAMPLE,
        mpp=1.0,
        tissue=TissueParams(),
        tile_px=32,
        tile_mpp=2.0,
        min_tissue_fraction=0.5,
    )
    return {"path": path, "tiles": root / "tiles.parquet", "n_tiles": len(tiles), "root": root}


def brightness_predictor(calls: list[int]):
    """Mean patch brightness (relative to the tint) as gene 0, its negative as gene 1, constants."""

    def predict(images: np.ndarray) -> np.ndarray:
        assert images.dtype == np.uint8 and images.shape[1:] == (32, 32, 3)
        calls.append(len(images))
        b = images.reshape(len(images), -1, 3).mean(axis=1) @ TINT / (TINT @ TINT)
        return np.column_stack([b, -b, np.ones_like(b), np.zeros_like(b)])

    return predict


def test_virtual_visium_covers_the_tissue_and_follows_the_image(slide, tmp_path):
    calls: list[int] = []
    adata = predict_slide(
        slide["path"],
        slide["tiles"],
        tmp_path / "pred.h5ad",
        tmp_path / "map.png",
        sample=SAMPLE,
        predictor=brightness_predictor(calls),
        genes=GENES,
        mpp=1.0,
        patch_size_px=32,
        patch_mpp=2.0,
        method="brightness",
        batch_size=7,
    )
    n = slide["n_tiles"]
    assert n >= 20 and sum(calls) == n and max(calls) <= 7 and len(calls) == -(-n // 7)  # streamed in batches
    back = sc.read_h5ad(tmp_path / "pred.h5ad")
    assert back.n_obs == n and list(back.var_names) == GENES and back.obs_names.is_unique
    tiles = pd.read_parquet(slide["tiles"])
    centres = back.obsm["spatial"]
    np.testing.assert_allclose(centres, tiles[["x", "y"]].to_numpy() + 32.0)
    x0, y0, x1, y1 = TISSUE
    assert ((centres[:, 0] > x0) & (centres[:, 0] < x1) & (centres[:, 1] > y0) & (centres[:, 1] < y1)).all()
    assert {"row", "col", "tissue_fraction"} <= set(back.obs.columns)
    # brightness rises from left to right, and so does the prediction of gene 0
    assert np.corrcoef(centres[:, 0], back.X[:, 0])[0, 1] > 0.95
    assert back.X[:, 0].std() > 0.1
    info = back.uns["comtip_prediction"]
    assert info["mpp"] == 1.0 and info["mpp_source"] == "sample_sheet" and info["tile_size_px"] == 64.0
    assert info["patch_size_px"] == 32 and info["patch_mpp"] == 2.0 and info["scale"] == "log1p_cp10k"
    np.testing.assert_allclose(adata.X, back.X)
    sc.pl.spatial(back, color=GENES[0], library_id=SAMPLE, show=False)
    plt.close("all")
    with Image.open(tmp_path / "map.png") as png:
        pixels = np.asarray(png.convert("RGB"))
    assert pixels.shape[1] > 3 * 200 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50


def test_a_fine_tuned_linear_probe_maps_slide_brightness(slide, tmp_path):
    pairs = [write_sample(tmp_path, f"train{i}", 96, i) for i in range(2)]
    pretrained = save_pretrained(tmp_path / "comtip.pt")
    finetune(
        pretrained,
        pairs,
        [],
        tmp_path / "head.pt",
        tmp_path / "m.tsv",
        FinetuneConfig(epochs=25, batch_size=32, lr=0.05, seed=0),
    )
    predictor = load_finetuned(tmp_path / "head.pt")
    adata = predict_slide(
        slide["path"],
        slide["tiles"],
        tmp_path / "pred.h5ad",
        tmp_path / "map.png",
        sample=SAMPLE,
        predictor=predictor,
        genes=predictor.genes,
        mpp=1.0,
        patch_size_px=32,
        patch_mpp=2.0,
        method="comtip_linear",
        map_genes=["PTPRC", "EPCAM"],
    )
    x = adata.obsm["spatial"][:, 0]
    assert np.corrcoef(x, adata.X[:, GENES.index("EPCAM")])[0, 1] > 0.8  # EPCAM = 2 b + 0.5
    assert np.corrcoef(x, adata.X[:, GENES.index("PTPRC")])[0, 1] < -0.8  # PTPRC = 2 (1 - b)


def test_slide_without_known_mpp_or_with_unknown_map_gene_is_an_error(slide, tmp_path):
    common = dict(
        sample=SAMPLE, predictor=brightness_predictor([]), genes=GENES, patch_size_px=32, patch_mpp=2.0, method="m"
    )
    with pytest.raises(PipelineInputError, match="no µm/px"):
        predict_slide(slide["path"], slide["tiles"], tmp_path / "p.h5ad", tmp_path / "p.png", mpp=None, **common)
    with pytest.raises(ValueError, match="NOPE"):
        predict_slide(
            slide["path"],
            slide["tiles"],
            tmp_path / "p.h5ad",
            tmp_path / "p.png",
            mpp=1.0,
            map_genes=["NOPE"],
            **common,
        )
    assert not (tmp_path / "p.h5ad").exists() and not (tmp_path / "p.png").exists()

"""SpatialData export (comtip.export.spatialdata, rule spatialdata): on a synthetic pyramid whose
every pixel encodes its level-0 position, a spot's circle and the image read back from the zarr
through its transformation land on the same slide pixels; the table holds the counts, the truth
and each method's predictions; an H&E-only slide gets its tiles; bad inputs leave no store."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image, PngImagePlugin

from _helpers.slides import DOWNSAMPLES, HEIGHT, WIDTH, position_image, pyramid, write_generic_tiff
from comtip._core.errors import PipelineInputError
from comtip.export.spatialdata import write_spatialdata
from comtip.io.readers import open_slide
from comtip.predict.writers import write_prediction_h5ad

spatialdata = pytest.importorskip("spatialdata")
from spatialdata.transformations import get_transformation  # noqa: E402

SLIDE_MPP, SPOT_UM = 0.5, 55.0
CENTERS = np.array([[500.0, 400.0], [130.2, 90.7], [870.5, 650.25], [333.3, 222.2]])
BARCODES = ["AAAC-1", "CCGA-1", "GTTA-1", "ACGT-1"]
GENES = ["g1", "g2", "g3", "g4", "g5"]
PANEL = ["g4", "g2", "g5"]
MASK_DOWNSAMPLE = 8.0


def decode(rgb: np.ndarray) -> tuple[int, int]:
    """The level-0 (x, y) that position_image wrote into a pixel."""
    r, g, b = (int(v) for v in rgb)
    return r + 256 * (((b - 3) % 64) // 16), g + 256 * ((b - 3) // 64)


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_generic_tiff(tmp_path_factory.mktemp("slide") / "slide.tif", pyramid(position_image()), SLIDE_MPP)


@pytest.fixture
def inputs(tmp_path: Path) -> dict:
    """spots.h5ad, gene_sentences.npz, tissue_mask.png and two methods' predictions, as the
    ingest, sentences, tiling and prediction rules write them."""
    rng = np.random.default_rng(0)
    counts = rng.poisson(3.0, (len(BARCODES), len(GENES))).astype(np.float32)
    spots = ad.AnnData(
        X=sp.csr_matrix(counts),
        obs=pd.DataFrame({"in_tissue": np.ones(len(BARCODES), bool), "array_row": range(4)}, index=BARCODES),
        var=pd.DataFrame(index=GENES),
        obsm={"spatial": CENTERS.copy()},
        uns={
            "comtip": {
                "sample": "S1",
                "mpp": SLIDE_MPP,
                "spot_diameter_um": SPOT_UM,
                "spot_diameter_px": SPOT_UM / SLIDE_MPP,
                "spot_shape": "circle",
                "slide_dimensions": np.array([WIDTH, HEIGHT]),
            }
        },
    )
    spots.write_h5ad(tmp_path / "spots.h5ad")
    truth = np.log1p(counts[:, [GENES.index(g) for g in PANEL]]).astype(np.float32)
    np.savez(
        tmp_path / "gene_sentences.npz", barcodes=np.array(BARCODES), panel_genes=np.array(PANEL), panel_values=truth
    )
    mask = np.zeros((round(HEIGHT / MASK_DOWNSAMPLE), round(WIDTH / MASK_DOWNSAMPLE)), np.uint8)
    mask[10:60, 20:90] = 255
    meta = PngImagePlugin.PngInfo()
    meta.add_text("downsample_x", repr(WIDTH / mask.shape[1]))
    meta.add_text("downsample_y", repr(HEIGHT / mask.shape[0]))
    Image.fromarray(mask).save(tmp_path / "tissue_mask.png", pnginfo=meta)
    preds = {"mean": rng.normal(size=(4, 3)), "ridge_comtip": rng.normal(size=(4, 2))}
    write_prediction_h5ad(tmp_path / "mean.h5ad", preds["mean"], PANEL, tmp_path / "spots.h5ad", "mean")
    # a method that predicts only part of the panel (its other genes are NaN in the layer)
    write_prediction_h5ad(tmp_path / "ridge.h5ad", preds["ridge_comtip"], ["g5", "g4"], tmp_path / "spots.h5ad", "r")
    return {
        "spots_h5ad": tmp_path / "spots.h5ad",
        "sentences_npz": tmp_path / "gene_sentences.npz",
        "tissue_mask": tmp_path / "tissue_mask.png",
        "predictions": {"mean": tmp_path / "mean.h5ad", "ridge_comtip": tmp_path / "ridge.h5ad"},
        "counts": counts,
        "truth": truth,
        "preds": preds,
        "mask": mask > 0,
    }


def export(tmp_path: Path, slide_path: Path, inputs: dict, **kwargs) -> spatialdata.SpatialData:
    keys = ("spots_h5ad", "sentences_npz", "tissue_mask", "predictions")
    args = {k: inputs[k] for k in keys} | kwargs
    write_spatialdata(tmp_path / "out" / "spatialdata.zarr", sample="S1", slide_path=slide_path, **args)
    return spatialdata.read_zarr(tmp_path / "out" / "spatialdata.zarr")


def to_pixel(element, x: float, y: float) -> tuple[int, int]:
    """Level-0 (x, y) → (column, row) of a raster level, through the zarr's transformation."""
    matrix = get_transformation(element, "global").to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    col, row, _ = np.linalg.inv(matrix) @ np.array([x, y, 1.0])
    return int(np.floor(col)), int(np.floor(row))


def levels_of(image) -> list:
    return [image[k]["image"] for k in sorted(image.keys())] if hasattr(image, "children") else [image]


@pytest.mark.parametrize(
    ("max_px", "kept"),
    [(1000, DOWNSAMPLES), (999, DOWNSAMPLES[1:]), (300, DOWNSAMPLES[2:])],
    ids=["all-levels", "level-0-too-large", "coarsest-only"],
)
def test_a_spots_circle_and_its_image_pixels_are_the_slides_pixels_there(tmp_path, slide_path, inputs, max_px, kept):
    sdata = export(tmp_path, slide_path, inputs, image_max_px=max_px)
    levels = levels_of(sdata.images["he"])
    assert [lv.shape[1:] for lv in levels] == [(-(-HEIGHT // d), -(-WIDTH // d)) for d in kept]
    circles = sdata.shapes["spots"]
    assert list(circles.index) == BARCODES
    np.testing.assert_allclose(circles["radius"], SPOT_UM / SLIDE_MPP / 2)
    with open_slide(slide_path) as slide:
        for i, barcode in enumerate(BARCODES):
            point = circles.geometry.loc[barcode]
            cx, cy, r = point.x, point.y, circles.loc[barcode, "radius"]
            np.testing.assert_allclose([cx, cy], CENTERS[i])
            # the centre and the circle's rightmost and lowest points, at every level kept
            for (x, y), d, level in (
                (p, d, lv) for p in [(cx, cy), (cx + r, cy), (cx, cy + r)] for d, lv in zip(kept, levels)
            ):
                col, row = to_pixel(level, x, y)
                pixel = level.values[:, row, col]
                wx, wy = decode(pixel)
                assert 0 <= x - wx < d and 0 <= y - wy < d, (barcode, d, (x, y), (wx, wy))
                direct = slide.read_region(round(col * d), round(row * d), 1, 1, level=DOWNSAMPLES.index(d))[0, 0]
                np.testing.assert_array_equal(pixel, direct)


def test_a_spots_patch_centre_is_the_zarr_image_under_its_circle(tmp_path, slide_path, inputs):
    """extract_patches at the slide's µm/px copies level-0 pixels: the patch's centre pixel is the
    image element's pixel under the spot's circle centre (up to the patch's half-pixel grid snap)."""
    from comtip.data.patches import extract_patches

    half = 16
    npy, parquet = tmp_path / "spot_patches.npy", tmp_path / "spot_patches.parquet"
    extract_patches(
        inputs["spots_h5ad"], slide_path, npy, parquet, size_px=2 * half, mpp=SLIDE_MPP, threads=1, sample="S1"
    )
    patches, index = np.load(npy), pd.read_parquet(parquet)
    sdata = export(tmp_path, slide_path, inputs)
    image, circles = levels_of(sdata.images["he"])[0], sdata.shapes["spots"]
    for i, barcode in enumerate(index["barcode"]):
        centre = circles.geometry.loc[barcode]
        x, y = round(centre.x - half) + half, round(centre.y - half) + half  # the pixel the patch centres on
        assert abs(x + 0.5 - centre.x) <= 1 and abs(y + 0.5 - centre.y) <= 1
        col, row = to_pixel(image, x + 0.5, y + 0.5)
        np.testing.assert_array_equal(image.values[:, row, col], patches[i, half, half])


def test_a_slide_with_no_level_small_enough_gets_its_thumbnail(tmp_path, slide_path, inputs):
    sdata = export(tmp_path, slide_path, inputs, image_max_px=200)
    (level,) = levels_of(sdata.images["he"])
    assert max(level.shape[1:]) <= 200
    col, row = to_pixel(level, WIDTH - 0.5, HEIGHT - 0.5)
    assert (row, col) == (level.shape[1] - 1, level.shape[2] - 1)


def test_the_table_annotates_the_spots_with_counts_truth_and_every_method(tmp_path, slide_path, inputs):
    sdata = export(tmp_path, slide_path, inputs)
    table = sdata.tables["table"]
    assert table.uns["spatialdata_attrs"]["region"] == "spots"
    assert list(table.obs["instance_id"]) == BARCODES and list(table.var_names) == PANEL
    np.testing.assert_array_equal(table.X.toarray(), inputs["counts"][:, [GENES.index(g) for g in PANEL]])
    assert set(table.layers) == {"log1p_cp10k", "mean", "ridge_comtip"}
    np.testing.assert_allclose(table.layers["log1p_cp10k"], inputs["truth"])
    np.testing.assert_allclose(table.layers["mean"], inputs["preds"]["mean"], rtol=1e-6)
    ridge = table.layers["ridge_comtip"]
    np.testing.assert_allclose(
        ridge[:, [PANEL.index("g5"), PANEL.index("g4")]], inputs["preds"]["ridge_comtip"], rtol=1e-6
    )
    assert np.isnan(ridge[:, PANEL.index("g2")]).all()
    matched = spatialdata.match_table_to_element(sdata, "spots", table_name="table")
    assert list(matched.obs["instance_id"]) == BARCODES
    mask = sdata.labels["tissue_mask"]
    np.testing.assert_array_equal(mask.values > 0, inputs["mask"])
    # mask pixel (20, 10) covers level-0 px [160, 168) x [80, 88): the mask's first tissue pixel
    col, row = to_pixel(mask, 20 * MASK_DOWNSAMPLE + 1, 10 * MASK_DOWNSAMPLE + 1)
    assert (col, row) == (20, 10) and mask.values[row, col] == 1


def test_visium_hd_bins_are_squares_of_the_bin_side(tmp_path, slide_path, inputs):
    spots = ad.read_h5ad(inputs["spots_h5ad"])
    spots.uns["comtip"] |= {"spot_shape": "square", "spot_diameter_um": 8.0, "spot_diameter_px": 16.0}
    spots.write_h5ad(inputs["spots_h5ad"])
    squares = export(tmp_path, slide_path, inputs).shapes["spots"]
    np.testing.assert_allclose(squares.geometry.bounds.to_numpy(), np.column_stack([CENTERS - 8, CENTERS + 8]))


def test_a_spot_diameter_that_contradicts_the_mpp_is_refused(tmp_path, slide_path, inputs):
    spots = ad.read_h5ad(inputs["spots_h5ad"])
    spots.uns["comtip"]["spot_diameter_px"] = 55.0  # 55 µm at 0.5 µm/px is 110 px
    spots.write_h5ad(inputs["spots_h5ad"])
    with pytest.raises(PipelineInputError, match=r"\[sample S1\] .*spots\.h5ad: spot diameter 55.0 µm / 0.5 µm/px"):
        export(tmp_path, slide_path, inputs)
    _no_store_left(tmp_path / "out")


def test_an_he_only_slide_gets_its_tiles_as_squares_with_the_virtual_visium_prediction(tmp_path, slide_path, inputs):
    from comtip.predict.slides import predict_slide

    tiles = pd.DataFrame({"x": [100, 164, 100], "y": [200, 200, 264], "size": 64, "row": [0, 0, 1], "col": [0, 1, 0]})
    tiles["tissue_fraction"] = 1.0
    tiles.to_parquet(tmp_path / "tiles.parquet")
    vv = tmp_path / "virtual_visium.h5ad"
    predict_slide(
        slide_path, tmp_path / "tiles.parquet", vv, tmp_path / "vv.png", sample="P1",
        predictor=lambda batch: batch.reshape(len(batch), -1, 3).mean(1), genes=["r", "g", "b"], mpp=SLIDE_MPP,
        patch_size_px=8, patch_mpp=1.0, method="finetune_linear",
    )  # fmt: skip
    out = tmp_path / "p" / "spatialdata.zarr"
    write_spatialdata(out, sample="P1", slide_path=slide_path, tissue_mask=inputs["tissue_mask"], virtual_visium=vv)
    sdata = spatialdata.read_zarr(out)
    squares = sdata.shapes["tiles"]
    np.testing.assert_allclose(
        squares.geometry.bounds.to_numpy(), np.column_stack([tiles.x, tiles.y, tiles.x + 64, tiles.y + 64])
    )
    table = sdata.tables["table"]
    assert table.uns["spatialdata_attrs"]["region"] == "tiles" and list(table.layers) == ["finetune_linear"]
    np.testing.assert_allclose(table.X, ad.read_h5ad(vv).X)
    assert list(table.obs["instance_id"]) == list(squares.index)


def _no_store_left(folder: Path) -> None:
    assert not folder.exists() or not list(folder.iterdir()), list(folder.iterdir())


def test_predictions_not_aligned_with_the_spots_name_sample_and_file_and_leave_no_store(tmp_path, slide_path, inputs):
    bad = ad.read_h5ad(inputs["predictions"]["mean"])[::-1].copy()
    bad.write_h5ad(tmp_path / "bad.h5ad")
    with pytest.raises(PipelineInputError, match=r"\[sample S1\] .*bad\.h5ad: predicted spots") as err:
        export(tmp_path, slide_path, inputs, predictions={"mean": tmp_path / "bad.h5ad"})
    assert "not the spots" in str(err.value)
    _no_store_left(tmp_path / "out")


def test_a_slide_other_than_the_ingested_one_is_refused(tmp_path, inputs):
    small = write_generic_tiff(tmp_path / "other.tif", pyramid(position_image(600, 400)), SLIDE_MPP)
    with pytest.raises(
        PipelineInputError, match=r"other\.tif: slide is 600 x 400 px, spots.h5ad was ingested on 1000 x 760"
    ):
        export(tmp_path, small, inputs)
    _no_store_left(tmp_path / "out")


def test_a_failed_write_removes_the_temporary_store(tmp_path, slide_path, inputs, monkeypatch):
    import spatialdata as sd

    def broken(self, path, **kwargs):
        Path(path).mkdir()
        (Path(path) / "half").write_text("")
        raise OSError("disk full")

    monkeypatch.setattr(sd.SpatialData, "write", broken)
    with pytest.raises(OSError, match="disk full"):
        export(tmp_path, slide_path, inputs)
    _no_store_left(tmp_path / "out")


def test_a_dry_run_exports_every_sample_with_its_predictions(tmp_path):
    from _helpers.workflow import snakemake, write_tiny_run_folder
    from conftest import dry_run_jobs

    root = write_tiny_run_folder(tmp_path / "run")
    jobs = {
        b.split("sample=")[1].split()[0].rstrip(","): b
        for r, b in dry_run_jobs(snakemake(root, "-n").stdout)
        if r == "spatialdata"
    }
    assert set(jobs) == {"tiny_a", "tiny_v", "tiny_b", "tiny_p"}
    assert "results/predictions/tiny_b/mean.h5ad" in jobs["tiny_b"] and "predictions/" not in jobs["tiny_a"]
    assert "results/predictions/tiny_p/virtual_visium.h5ad" in jobs["tiny_p"]

"""Slide access on small synthetic slides: readers, pixels, levels, padding, µm/px, errors."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from _helpers.slides import DOWNSAMPLES, HEIGHT, WIDTH, position_image, pyramid, write_generic_tiff, write_jpeg_ome_tiff
from comtip._core.errors import PipelineInputError
from comtip.io.readers import open_slide
from comtip.io.slide import RESAMPLE, resolve_mpp
from conftest import shared_data


def write_ome_tiff(path: Path, levels: list[np.ndarray], mpp: float) -> Path:
    """OME-TIFF with the pyramid in SubIFDs: openslide sees level 0 only, tifffile all levels."""
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(
            levels[0], subifds=len(levels) - 1, tile=(128, 128), compression="zlib", photometric="rgb",
            metadata={"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp, "PhysicalSizeXUnit": "µm"},
        )  # fmt: skip
        for level in levels[1:]:
            tw.write(level, subfiletype=1, tile=(128, 128), compression="zlib", photometric="rgb")
    return path


@pytest.fixture(scope="module")
def source() -> np.ndarray:
    return position_image()


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory, source: np.ndarray) -> dict[str, Path]:
    """One file per reader path, all with the same pixels (JPEG aside, which is lossy)."""
    folder = tmp_path_factory.mktemp("slides")
    levels = pyramid(source)
    Image.fromarray(source).save(folder / "plain.png")
    Image.fromarray(source).save(folder / "plain.jpg", quality=95)
    tifffile.imwrite(
        folder / "strips.tif", source, photometric="rgb", resolution=(2e4, 2e4), resolutionunit="CENTIMETER"
    )
    return {
        "generic": write_generic_tiff(folder / "generic.tif", levels, mpp=0.5),
        "ome": write_ome_tiff(folder / "pyramid.ome.tif", levels, mpp=0.25),
        "png": folder / "plain.png",
        "jpeg": folder / "plain.jpg",
        "strips": folder / "strips.tif",
    }


PYRAMIDS = ["generic", "ome"]
ALL_EXACT = ["generic", "ome", "png", "strips"]


@pytest.mark.parametrize(
    ("kind", "reader", "mpp", "n_levels"),
    [
        ("generic", "openslide", 0.5, 3),
        ("ome", "tifffile", 0.25, 3),
        ("png", "pillow", None, 1),
        ("jpeg", "pillow", None, 1),
        ("strips", "pillow", 0.5, 1),  # non-tiled TIFF: resolution tags in cm are trusted
    ],
)
def test_reader_geometry_and_mpp(slides, kind, reader, mpp, n_levels):
    with open_slide(slides[kind]) as slide:
        assert slide.reader == reader
        assert slide.path == slides[kind]
        assert slide.dimensions == (WIDTH, HEIGHT)
        assert len(slide.level_dimensions) == n_levels
        assert slide.level_downsamples == pytest.approx(list(DOWNSAMPLES[:n_levels]))
        assert slide.metadata_mpp == (None if mpp is None else pytest.approx(mpp))


@pytest.mark.parametrize("kind", ALL_EXACT)
@pytest.mark.parametrize(("x", "y", "w", "h"), [(0, 0, 10, 10), (120, 250, 300, 200), (990, 750, 10, 10)])
def test_read_region_level0_matches_source(slides, source, kind, x, y, w, h):
    with open_slide(slides[kind]) as slide:
        region = slide.read_region(x, y, w, h)
    assert region.dtype == np.uint8 and region.shape == (h, w, 3)
    np.testing.assert_array_equal(region, source[y : y + h, x : x + w])


@pytest.mark.parametrize("kind", PYRAMIDS)
@pytest.mark.parametrize("level", [1, 2])
def test_read_region_lower_levels_match_pyramid(slides, source, kind, level):
    expected = pyramid(source)[level]
    d = DOWNSAMPLES[level]
    with open_slide(slides[kind]) as slide:
        region = slide.read_region(40 * d, 30 * d, 150, 140, level=level)
    np.testing.assert_array_equal(region, expected[30:170, 40:190])


@pytest.mark.parametrize("kind", ALL_EXACT)
def test_outside_is_white(slides, source, kind):
    with open_slide(slides[kind]) as slide:
        corner = slide.read_region(-5, -7, 20, 20)
        beyond = slide.read_region(WIDTH - 10, HEIGHT - 4, 30, 30)
        away = slide.read_region(WIDTH + 100, 0, 8, 8)
    np.testing.assert_array_equal(corner[7:, 5:], source[:13, :15])
    assert (corner[:7] == 255).all() and (corner[:, :5] == 255).all()
    np.testing.assert_array_equal(beyond[:4, :10], source[HEIGHT - 4 :, WIDTH - 10 :])
    assert (beyond[4:] == 255).all() and (beyond[:, 10:] == 255).all()
    assert (away == 255).all()


def test_transparent_pixels_become_white(tmp_path, source):
    rgba = np.dstack([source, np.full(source.shape[:2], 255, np.uint8)])
    rgba[:100, :100, 3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    with open_slide(tmp_path / "alpha.png") as slide:
        region = slide.read_region(50, 50, 100, 100)
    assert (region[:50, :50] == 255).all()
    np.testing.assert_array_equal(region[50:, 50:], source[100:150, 100:150])


@pytest.mark.parametrize("kind", PYRAMIDS)
def test_scaled_read_uses_level_of_downsample_4(slides, source, kind):
    level2 = pyramid(source)[2]
    with open_slide(slides[kind]) as slide:
        assert slide.plan_scaled_read(200, 100, 400, 400, 100, 100).level == 2
        patch = slide.read_region_scaled(200, 100, 400, 400, 100, 100)
    np.testing.assert_array_equal(patch, level2[25:125, 50:150])  # aligned: copied, not resampled


@pytest.mark.parametrize("kind", PYRAMIDS)
def test_scaled_read_resamples_from_best_level_like_a_direct_resize(slides, source, kind):
    level1 = pyramid(source)[1]
    x, y, side, out = 301.3, 207.9, 240.0, 80  # downsample 3: level 1 (2), then shrink by 1.5
    expected = Image.fromarray(level1).resize((out, out), RESAMPLE, box=(x / 2, y / 2, (x + side) / 2, (y + side) / 2))
    with open_slide(slides[kind]) as slide:
        assert slide.plan_scaled_read(x, y, side, side, out, out).level == 1
        patch = slide.read_region_scaled(x, y, side, side, out, out)
    assert patch.shape == (out, out, 3)
    assert np.abs(patch.astype(int) - np.asarray(expected, dtype=int)).max() <= 1


@pytest.mark.parametrize("kind", ALL_EXACT)
def test_unscaled_box_is_aligned_to_nearest_pixel(slides, source, kind):
    with open_slide(slides[kind]) as slide:
        patch = slide.read_region_scaled(100.4, 49.6, 64, 64, 64, 64)
    np.testing.assert_array_equal(patch, source[50:114, 100:164])


def test_best_level_tolerates_scanner_rounding(slides):
    with open_slide(slides["generic"]) as slide:
        assert slide.best_level(3.999) == 2
        assert slide.best_level(3.9) == 1
        assert slide.best_level(0.5) == 0
        assert slide.best_level(100) == 2


@pytest.mark.parametrize("kind", ["generic", "ome", "png"])
def test_thumbnail_size_factors_and_content(slides, source, kind, monkeypatch):
    monkeypatch.setattr("comtip.io.slide.THUMBNAIL_BAND_BYTES", 50_000)  # many bands: seams would show
    with open_slide(slides[kind]) as slide:
        image, (sx, sy) = slide.thumbnail(10)
    assert image.shape == (76, 100, 3) and (sx, sy) == (10.0, 10.0)
    levels = pyramid(source)
    level = 2 if kind != "png" else 0
    expected = np.asarray(Image.fromarray(levels[level]).resize((100, 76), RESAMPLE))
    assert np.abs(image.astype(int) - expected.astype(int)).max() <= 1


@pytest.mark.parametrize("kind", PYRAMIDS)
def test_concurrent_reads_are_correct(slides, source, kind):
    rng = np.random.default_rng(0)
    boxes = [(int(rng.integers(0, WIDTH - 64)), int(rng.integers(0, HEIGHT - 64))) for _ in range(200)]
    barrier = threading.Barrier(4)

    def read(box: tuple[int, int]) -> bool:
        if box == boxes[0]:
            barrier.wait(timeout=10)
        x, y = box
        return np.array_equal(slide.read_region(x, y, 64, 64), source[y : y + 64, x : x + 64])

    with open_slide(slides[kind]) as slide, ThreadPoolExecutor(4) as pool:
        results = list(pool.map(read, boxes[:1] * 4 + boxes[1:]))
    assert all(results)


def test_missing_file_names_it(tmp_path):
    with pytest.raises(PipelineInputError, match="not found") as err:
        open_slide(tmp_path / "absent.svs", sample="S1")
    assert str(tmp_path / "absent.svs") in str(err.value) and "[sample S1]" in str(err.value)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_unreadable_file_names_each_reader_and_its_reason(tmp_path):
    bad = tmp_path / "notes.tif"
    bad.write_bytes(b"II*\0" + b"garbage" * 10)
    with pytest.raises(PipelineInputError) as err:
        open_slide(bad, sample="S1")
    message = str(err.value)
    assert str(bad) in message and "[sample S1]" in message
    for reader in ("openslide:", "tifffile:", "pillow:"):
        assert reader in message


def test_pillow_limit_is_restored(slides):
    limit = Image.MAX_IMAGE_PIXELS
    open_slide(slides["png"]).close()
    assert Image.MAX_IMAGE_PIXELS == limit


def test_resolve_mpp_order_and_sources():
    args = {"spot_diameter_px": 110.0, "spot_diameter_um": 55.0}
    assert resolve_mpp(sheet_mpp=0.3, slide_mpp=0.25, **args) == (0.3, "sample_sheet")  # unchecked
    assert resolve_mpp(sheet_mpp=None, slide_mpp=0.52, **args) == (0.52, "slide_metadata")  # 4 % apart
    assert resolve_mpp(sheet_mpp=None, slide_mpp=None, **args) == (0.5, "spot_geometry")


def test_resolve_mpp_geometry_is_the_pitch_when_known():
    # diameter says 0.5 µm/px, the pitch 0.55: the pitch wins (Space Ranger's diameter convention varies)
    args = {"spot_diameter_px": 110.0, "spot_diameter_um": 55.0, "spot_pitch_px": 100 / 0.55, "spot_pitch_um": 100.0}
    assert resolve_mpp(sheet_mpp=None, slide_mpp=None, **args) == (pytest.approx(0.55), "spot_geometry")
    # a legacy ST sheet left at Visium's pitch: the diameter is 0.5 of the pitch, the sheet says 1.0
    st = {"spot_diameter_px": 145.0, "spot_diameter_um": 100.0, "spot_pitch_px": 290.0, "spot_pitch_um": 100.0}
    with pytest.raises(PipelineInputError, match=r"\[sample S1\].*0\.50 of their pitch.*set spot_pitch_um right"):
        resolve_mpp(sheet_mpp=None, slide_mpp=None, sample="S1", **st)
    assert resolve_mpp(sheet_mpp=None, slide_mpp=None, **{**st, "spot_pitch_um": 200.0})[0] == pytest.approx(200 / 290)
    assert resolve_mpp(sheet_mpp=None, slide_mpp=0.7, prefer="slide_metadata", **st) == (0.7, "slide_metadata")


def test_resolve_mpp_refuses_metadata_and_geometry_that_disagree():
    """The CytAssist case: the slide's µm/px is not that of the image whose pixels the spots are in."""
    args = {"spot_diameter_px": 110.0, "spot_diameter_um": 55.0, "sample": "S1", "path": "slide.tif"}
    with pytest.raises(
        PipelineInputError, match=r"\[sample S1\].*0\.65 µm/px.*0\.5 µm/px.*30% apart.*CytAssist"
    ) as err:
        resolve_mpp(sheet_mpp=None, slide_mpp=0.65, **args)
    assert "mpp_source" in str(err.value) and "slide.tif" in str(err.value)
    assert resolve_mpp(sheet_mpp=None, slide_mpp=0.65, tolerance=0.35, **args) == (0.65, "slide_metadata")
    assert resolve_mpp(sheet_mpp=None, slide_mpp=0.65, prefer="slide_metadata", **args) == (0.65, "slide_metadata")
    assert resolve_mpp(sheet_mpp=None, slide_mpp=0.65, prefer="spot_geometry", **args) == (0.5, "spot_geometry")
    with pytest.raises(PipelineInputError, match="mpp_source is slide_metadata but the slide has no"):
        resolve_mpp(sheet_mpp=None, slide_mpp=None, prefer="slide_metadata", **args)
    with pytest.raises(PipelineInputError, match="mpp_source must be one of"):
        resolve_mpp(sheet_mpp=None, slide_mpp=0.5, prefer="metadata", **args)


def test_spot_pitch_from_the_grid_fit_and_from_nearest_neighbours():
    from comtip.data.ingest import spot_pitch_px

    rng = np.random.default_rng(0)
    # Visium: hexagonal, array_col even/odd with the row; 100 µm pitch at 0.5 µm/px = 200 px
    rows, cols = np.meshgrid(np.arange(20), np.arange(0, 40), indexing="ij")
    keep = (rows + cols) % 2 == 0
    row, col = rows[keep], cols[keep]
    xy = np.stack([col * 100.0, row * 200.0 * np.sqrt(3) / 2], axis=1)
    assert spot_pitch_px(xy, col, row) == pytest.approx(200.0)
    assert spot_pitch_px(xy) == pytest.approx(200.0)
    # legacy ST: square grid, spot centres detected one by one (jitter biases nearest neighbours low)
    row, col = (g.ravel() for g in np.meshgrid(np.arange(15), np.arange(15), indexing="ij"))
    xy = np.stack([col * 290.0, row * 290.0], axis=1) + rng.normal(0, 15, (len(row), 2))
    assert spot_pitch_px(xy, col, row) == pytest.approx(290.0, rel=0.01)
    assert spot_pitch_px(xy) < 280.0
    assert spot_pitch_px(xy[:2], col[:2], row[:2]) is None


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "0.5", True])
def test_resolve_mpp_rejects_bad_values(bad):
    with pytest.raises(PipelineInputError, match="sample sheet mpp") as err:
        resolve_mpp(sheet_mpp=bad, slide_mpp=0.25, spot_diameter_px=1, spot_diameter_um=1, sample="S1", path="x.tif")
    assert "[sample S1]" in str(err.value)


def test_resolve_mpp_without_any_source():
    with pytest.raises(PipelineInputError, match="no µm/px"):
        resolve_mpp(sheet_mpp=None, slide_mpp=None, spot_diameter_px=150.0, spot_diameter_um=None, sample="S1")
    with pytest.raises(PipelineInputError, match="spot_diameter_px"):
        resolve_mpp(sheet_mpp=None, slide_mpp=None, spot_diameter_px=0.0, spot_diameter_um=55.0)


@pytest.mark.realdata
def test_her2st_jpeg_opens_with_pillow_without_mpp():
    (jpeg,) = shared_data("her2st", "C2", "outs", "image").glob("*.jpg")
    with open_slide(jpeg, sample="C2") as slide:
        assert slide.reader == "pillow"
        assert slide.metadata_mpp is None
        assert slide.level_downsamples == [1.0]
        width, height = slide.dimensions
        assert 9000 < width < 9600 and 9600 < height < 10200
        region = slide.read_region(width // 2, height // 2, 64, 64)
        assert region.shape == (64, 64, 3) and region.std() > 0


def test_jpeg_ome_tiff_opens_with_its_pyramid_and_ome_mpp(tmp_path, source):
    """With imagecodecs (a dependency), tifffile decodes the JPEG tiles: all levels and the OME
    µm/px, not OpenSlide's level 0 without µm/px."""
    path = write_jpeg_ome_tiff(tmp_path / "jpeg.ome.tif", pyramid(source), mpp=0.25)
    with open_slide(path) as slide:
        assert slide.reader == "tifffile"
        assert len(slide.level_dimensions) == 3 and slide.metadata_mpp == pytest.approx(0.25)
        region = slide.read_region(0, 0, 64, 64)
    assert np.abs(region.astype(int) - source[:64, :64]).mean() < 8  # JPEG is lossy, not wrong


def test_a_reader_refusing_for_its_codec_is_a_warning_naming_the_fallback(tmp_path, source, monkeypatch, caplog):
    """Without the codec the file falls back to OpenSlide (level 0, no µm/px): logged, not silent."""
    import logging

    import tifffile as tf

    path = write_jpeg_ome_tiff(tmp_path / "jpeg.ome.tif", pyramid(source), mpp=0.25)

    def no_jpeg(*args, **kwargs):
        raise tf.TiffFileError("imagecodecs not installed (simulated)")

    monkeypatch.setattr(tf.TiffPage, "decode", property(lambda self: no_jpeg))
    with caplog.at_level(logging.WARNING, logger="comtip.io.readers"), open_slide(path, sample="S9") as slide:
        assert slide.reader == "openslide" and len(slide.level_dimensions) == 1
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "[sample S9]" in warning and "cannot decode tiles" in warning and "imagecodecs not installed" in warning
    assert "opened with openslide instead (1 level(s), µm/px unknown)" in warning

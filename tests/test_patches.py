"""Spot patch extraction on a synthetic pyramid: pixels, order, index, edges, errors, atomicity."""

from __future__ import annotations

import json
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from _helpers.slides import position_image, pyramid, write_generic_tiff
from comtip._core.errors import PipelineInputError
from comtip.data.patches import INDEX_COLUMNS, extract_patches, patch_geometry, read_boxes_raw, spatial_order
from comtip.io.readers import open_slide

SLIDE_MPP = 0.5
# 32 px at 1 µm/px = a 64 px box on a 0.5 µm/px slide, read from level 1 (downsample 2).
SIZE_PX, PATCH_MPP = 32, 1.0
# Rows in a deliberately non-spatial order; the last spot's box crosses the left edge.
CENTERS = np.array([[500.0, 400.0], [100.2, 80.7], [900.0, 700.0], [333.3, 222.2], [20.0, 300.0]])
BARCODES = ["AAAC-1", "ZZZT-1", "CCGA-1", "GTTA-1", "ACGT-1"]


def write_spots(path: Path, centers: np.ndarray, barcodes: list[str], uns: dict | None = None) -> Path:
    """A small spots.h5ad as ingest writes it: counts, obsm["spatial"], uns["comtip"]."""
    adata = anndata.AnnData(
        X=sp.csr_matrix(np.ones((len(barcodes), 3), np.float32)),
        obs=pd.DataFrame({"in_tissue": np.ones(len(barcodes), int)}, index=barcodes),
        var=pd.DataFrame(index=["g1", "g2", "g3"]),
        obsm={"spatial": centers},
        uns={"comtip": {"mpp": SLIDE_MPP, "sample": "S1"}} if uns is None else uns,
    )
    adata.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def source() -> np.ndarray:
    return position_image()


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory: pytest.TempPathFactory, source: np.ndarray) -> Path:
    return write_generic_tiff(tmp_path_factory.mktemp("slide") / "slide.tif", pyramid(source), SLIDE_MPP)


@pytest.fixture
def spots(tmp_path: Path) -> Path:
    return write_spots(tmp_path / "spots.h5ad", CENTERS, BARCODES)


def run(spots: Path, slide_path: Path, out: Path, **kwargs) -> tuple[np.ndarray, pd.DataFrame]:
    settings = {"size_px": SIZE_PX, "mpp": PATCH_MPP, "threads": 2, "sample": "S1", **kwargs}
    extract_patches(spots, slide_path, out / "spot_patches.npy", out / "spot_patches.parquet", **settings)
    return np.load(out / "spot_patches.npy", mmap_mode="r"), pd.read_parquet(out / "spot_patches.parquet")


def test_patches_follow_h5ad_order_and_hold_the_boxes_pixels(spots, slide_path, source, tmp_path):
    patches, index = run(spots, slide_path, tmp_path)
    assert patches.dtype == np.uint8 and patches.shape == (len(BARCODES), SIZE_PX, SIZE_PX, 3)
    assert index["barcode"].tolist() == BARCODES
    assert index["patch_index"].tolist() == list(range(len(BARCODES)))
    level1 = np.pad(pyramid(source)[1], ((50, 50), (50, 50), (0, 0)), constant_values=255)
    for i, (x, y) in enumerate(CENTERS):
        # the 64 px level-0 box is 32 px of level 1, aligned to the nearest level-1 pixel
        lx, ly = round((x - 32) / 2) + 50, round((y - 32) / 2) + 50
        np.testing.assert_array_equal(patches[i], level1[ly : ly + SIZE_PX, lx : lx + SIZE_PX])


def test_index_centres_bounds_and_edge_flag(spots, slide_path, tmp_path):
    _, index = run(spots, slide_path, tmp_path)
    assert list(index.columns) == INDEX_COLUMNS
    np.testing.assert_allclose(index[["x_center", "y_center"]], CENTERS)
    np.testing.assert_allclose((index["x0"] + index["x1"]) / 2, CENTERS[:, 0])
    np.testing.assert_allclose((index["y0"] + index["y1"]) / 2, CENTERS[:, 1])
    np.testing.assert_allclose(index["x1"] - index["x0"], SIZE_PX * PATCH_MPP / SLIDE_MPP)
    assert index["crosses_edge"].tolist() == [False, False, False, False, True]
    settings = json.loads(pq.read_schema(tmp_path / "spot_patches.parquet").metadata[b"comtip"])
    assert settings["size_px"] == SIZE_PX and settings["slide_mpp"] == SLIDE_MPP
    assert settings["slide_reader"] == "openslide"


def test_edge_patch_is_padded_white(spots, slide_path, tmp_path):
    patches, _ = run(spots, slide_path, tmp_path)
    edge = patches[-1]  # box x from -12 to 52 level-0 px: 6 level-1 columns outside
    assert (edge[:, :6] == 255).all()
    assert not (edge[:, 6:] == 255).all()


def test_threads_and_chunks_do_not_change_the_output(spots, slide_path, tmp_path):
    one, _ = run(spots, slide_path, tmp_path / "a", threads=1, chunk_size=256)
    many, _ = run(spots, slide_path, tmp_path / "b", threads=3, chunk_size=2)
    np.testing.assert_array_equal(one, many)


def test_resampled_patches_match_read_region_scaled(tmp_path, slide_path):
    spots = write_spots(tmp_path / "spots.h5ad", CENTERS, BARCODES)
    patches, index = run(spots, slide_path, tmp_path, size_px=24, mpp=0.9)  # box 43.2 px
    with open_slide(slide_path) as slide:
        for i, row in index.iterrows():
            expected = slide.read_region_scaled(row.x0, row.y0, row.x1 - row.x0, row.y1 - row.y0, 24, 24)
            np.testing.assert_array_equal(patches[i], expected)


def test_patch_geometry_boxes():
    geometry = patch_geometry(CENTERS, size_px=224, mpp=0.5, slide_mpp=0.25, slide_dimensions=(1000, 760))
    np.testing.assert_allclose(geometry["x1"] - geometry["x0"], 448.0)
    assert geometry["crosses_edge"].tolist() == [False, True, True, True, True]
    geometry = patch_geometry(CENTERS, size_px=10, mpp=0.5, slide_mpp=0.5, slide_dimensions=(1000, 760))
    assert not geometry["crosses_edge"].any()


def test_spatial_order_is_a_block_wise_permutation():
    rng = np.random.default_rng(0)
    centers = rng.uniform(0, 4000, (500, 2))
    order = spatial_order(centers, block_px=1000)
    assert sorted(order) == list(range(500))
    blocks = np.floor(centers[order] / 1000).astype(int)
    changes = np.any(np.diff(blocks, axis=0) != 0, axis=1).sum()
    assert changes == len({tuple(b) for b in blocks}) - 1  # each block visited once


def test_raw_ceiling_reads_the_same_regions(spots, slide_path):
    with open_slide(slide_path) as slide:
        index = patch_geometry(
            CENTERS, size_px=SIZE_PX, mpp=PATCH_MPP, slide_mpp=SLIDE_MPP, slide_dimensions=slide.dimensions
        )
        pixels = read_boxes_raw(slide, index, SIZE_PX, SIZE_PX * PATCH_MPP / SLIDE_MPP, threads=2)
    assert pixels == len(CENTERS) * SIZE_PX * SIZE_PX


def assert_no_outputs(folder: Path) -> None:
    assert sorted(p.name for p in folder.iterdir() if p.suffix in (".npy", ".parquet")) == []


def test_spot_outside_slide_is_an_error_and_writes_nothing(tmp_path, slide_path):
    spots = write_spots(tmp_path / "spots.h5ad", np.vstack([CENTERS, [[1500.0, 10.0]]]), [*BARCODES, "OUT-1"])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(PipelineInputError, match="outside the slide") as err:
        run(spots, slide_path, out)
    assert "[sample S1]" in str(err.value) and str(spots) in str(err.value) and "OUT-1" in str(err.value)
    assert_no_outputs(out)


def test_failure_while_writing_leaves_nothing(spots, slide_path, tmp_path, monkeypatch):
    def broken(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("comtip.data.patches._pwrite_all", broken)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(OSError, match="disk full"):
        run(spots, slide_path, out)
    assert_no_outputs(out)


@pytest.mark.parametrize(
    ("uns", "centers", "message"),
    [
        ({"comtip": {"sample": "S1"}}, CENTERS, r'uns\["comtip"\]\["mpp"\] is missing'),
        ({}, CENTERS, r'uns\["comtip"\]\["mpp"\] is missing'),
        ({"comtip": {"mpp": -0.5}}, CENTERS, "positive"),
        (None, CENTERS[:0], "no spots"),
    ],
)
def test_bad_spots_file_is_an_error(tmp_path, slide_path, uns, centers, message):
    spots = write_spots(tmp_path / "spots.h5ad", centers, BARCODES[: len(centers)], uns)
    with pytest.raises(PipelineInputError, match=message) as err:
        run(spots, slide_path, tmp_path)
    assert str(spots) in str(err.value) and "[sample S1]" in str(err.value)


def test_missing_spatial_is_an_error(tmp_path, slide_path):
    adata = anndata.AnnData(obs=pd.DataFrame(index=BARCODES), uns={"comtip": {"mpp": SLIDE_MPP}})
    adata.write_h5ad(tmp_path / "spots.h5ad")
    with pytest.raises(PipelineInputError, match=r'obsm\["spatial"\] is missing'):
        run(tmp_path / "spots.h5ad", slide_path, tmp_path)


def test_missing_spots_file_is_an_error(tmp_path, slide_path):
    with pytest.raises(PipelineInputError, match="spots file not found"):
        run(tmp_path / "absent.h5ad", slide_path, tmp_path)


def test_a_slide_far_coarser_than_the_patches_is_refused(spots, slide_path, tmp_path):
    """SLIDE_MPP 0.5 with patches at 0.1 µm/px is a 5x upsampling: no histology, one clear error."""
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(PipelineInputError, match=r"\[sample S1\].*0\.5 µm/px.*0\.1 µm/px.*5\.0x upsampling.*CytAssist"):
        run(spots, slide_path, out, mpp=0.1)
    assert not list(out.iterdir())
    patches, _ = run(spots, slide_path, out, mpp=0.1, max_upsample=6.0)  # the limit is a setting
    assert len(patches) == len(BARCODES)


# -- band extraction: each needed tile read once, patches identical to per-patch reads -----------


def write_jpeg_tiff(path: Path, levels: list[np.ndarray]) -> Path:
    """A JPEG-tiled (Q90, 128 px tiles) pyramid as consecutive pages, as scanners write them."""
    import tifffile

    with tifffile.TiffWriter(path) as tw:
        for i, level in enumerate(levels):
            ppcm = 1e4 / (SLIDE_MPP * 2**i)
            tw.write(
                level, tile=(128, 128), compression="jpeg", compressionargs={"level": 90}, photometric="rgb",
                resolution=(ppcm, ppcm), resolutionunit="CENTIMETER", subfiletype=0 if i == 0 else 1,
            )  # fmt: skip
    return path


@pytest.fixture(scope="module")
def jpeg_tiff(tmp_path_factory: pytest.TempPathFactory, source: np.ndarray) -> Path:
    return write_jpeg_tiff(tmp_path_factory.mktemp("jpeg") / "slide.tif", pyramid(source))


@pytest.fixture(scope="module")
def png_path(tmp_path_factory: pytest.TempPathFactory, source: np.ndarray) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("png") / "slide.png"
    Image.fromarray(source).save(path)
    return path


def random_centers(n: int, seed: int = 0) -> np.ndarray:
    """Spots anywhere on the 1000 x 760 slide, corners included (boxes cross every edge)."""
    rng = np.random.default_rng(seed)
    corners = np.array([[0.0, 0.0], [999.9, 759.9], [3.3, 758.0], [997.0, 1.5]])
    return np.vstack([corners, rng.uniform([0, 0], [1000, 760], (n, 2))])


def open_with(reader: str, path: Path):
    from comtip.io import readers

    return {"openslide": readers.OpenSlideSlide, "tifffile": readers.TiffFileSlide, "pillow": readers.PillowSlide}[
        reader
    ](path)


def band_patches(slide, centers: np.ndarray, size_px: int, mpp: float, **kwargs):
    """Patches (by index) cut band by band, the band pass's stats and the plans."""
    from comtip.data.patch_bands import plan_patches, write_by_bands

    index = patch_geometry(centers, size_px=size_px, mpp=mpp, slide_mpp=SLIDE_MPP, slide_dimensions=slide.dimensions)
    side = size_px * mpp / SLIDE_MPP
    plans = plan_patches(slide, index["x0"].to_numpy(), index["y0"].to_numpy(), side, size_px)
    out: dict[int, np.ndarray] = {}
    stats = write_by_bands(slide, plans, size_px, out.__setitem__, **{"threads": 2, **kwargs})
    return out, stats, index, plans


@pytest.mark.parametrize(
    ("size_px", "mpp"),
    [(32, 1.0), (40, 0.5), (24, 0.9)],
    ids=["aligned level 1", "aligned level 0", "resampled"],
)
@pytest.mark.parametrize(
    ("slide_file", "reader"),
    [("slide_path", "openslide"), ("jpeg_tiff", "tifffile"), ("jpeg_tiff", "openslide"), ("png_path", "pillow")],
    ids=["zlib-openslide", "jpeg-tifffile", "jpeg-openslide", "png-pillow"],
)
@pytest.mark.parametrize("band_bytes", [400_000, 2**26], ids=["one tile row per band", "one band"])
def test_band_patches_equal_per_patch_reads(request, slide_file, reader, size_px, mpp, band_bytes):
    centers = random_centers(80)
    with open_with(reader, request.getfixturevalue(slide_file)) as slide:
        patches, stats, index, _ = band_patches(slide, centers, size_px, mpp, band_bytes=band_bytes, chunk_size=7)
        assert sorted(patches) == list(range(len(centers)))
        assert index["crosses_edge"].sum() >= 4
        for i, row in index.iterrows():
            expected = slide.read_region_scaled(row.x0, row.y0, row.x1 - row.x0, row.y1 - row.y0, size_px, size_px)
            np.testing.assert_array_equal(patches[i], expected, err_msg=f"patch {i}")
    if band_bytes == 400_000:  # a band of 1 or 2 tile rows: several bands, tiles carried over
        assert stats.band_rows <= 2 and stats.bands > 1


def distinct_tiles(plans, slide, tile: int) -> set[tuple[int, int]]:
    """The level tiles that the plans' regions overlap (counted independently of the band code)."""
    level = plans[0].level
    lw, lh = slide.level_dimensions[level]
    d = slide.level_downsamples[level]
    tiles = set()
    for p in plans:
        x, y = round(p.x / d), round(p.y / d)
        for ty in range(max(y, 0) // tile, (min(y + p.h, lh) - 1) // tile + 1):
            for tx in range(max(x, 0) // tile, (min(x + p.w, lw) - 1) // tile + 1):
                tiles.add((ty, tx))
    return tiles


def test_each_needed_tile_is_decoded_once_and_the_band_bounds_memory(jpeg_tiff, monkeypatch):
    """With the reader's tile cache cut to one tile, per-patch reads decode shared tiles again and
    again; the band pass decodes exactly the distinct tiles that the patches need, and holds at
    most a band plus the rows a patch spans."""
    from comtip.io import readers

    decoded: list[tuple[int, int]] = []
    original = readers.TiffFileSlide._decode_tile

    def counting(self, level: int, index: int) -> np.ndarray:
        decoded.append((level, index))
        return original(self, level, index)

    monkeypatch.setattr(readers, "TILE_CACHE_BYTES", 1)
    monkeypatch.setattr(readers.TiffFileSlide, "_decode_tile", counting)
    centers = random_centers(20)[4:]  # sparse: most tiles of the slide are needed by no patch
    with readers.TiffFileSlide(jpeg_tiff) as slide:
        decoded.clear()  # the reader decodes one tile per level at open
        _, stats, _, plans = band_patches(slide, centers, 40, 0.5, band_bytes=400_000)
        needed = distinct_tiles(plans, slide, 128)
        assert len(decoded) == len(set(decoded)) == len(needed) == stats.tiles_read
        assert len(needed) < 48  # of 8 x 6 tiles of level 0
        tile_row_bytes = 8 * 128 * 128 * 3  # 8 tiles across level 0
        assert stats.max_held_bytes <= (stats.band_rows + 1 + 40 // 128 + 1) * tile_row_bytes
        decoded.clear()
        for p in plans:
            slide.read_region(p.x, p.y, p.w, p.h, p.level)
        assert len(decoded) > len(needed)  # what the band pass saves


def test_tifffile_tile_decoder_gives_the_level_pixels_of_each_tile_edges_cut(jpeg_tiff):
    """Band reads hold the codec's tile arrays as they come: each is the level's pixels under the
    tile, cut at the level's edge (TIFF edge tiles are stored padded), read-only."""
    from comtip.io import readers

    with readers.TiffFileSlide(jpeg_tiff) as slide:
        for level in (0, 1):
            decode = slide.tile_decoder(level)
            (lw, lh), d = slide.level_dimensions[level], slide.level_downsamples[level]
            for row, col in [(0, 0), (0, (lw - 1) // 128), ((lh - 1) // 128, 0), ((lh - 1) // 128, (lw - 1) // 128)]:
                tile = decode(row, col)
                w, h = min(128, lw - col * 128), min(128, lh - row * 128)
                assert tile.shape == (h, w, 3) and not tile.flags.writeable
                x, y = round(col * 128 * d), round(row * 128 * d)
                np.testing.assert_array_equal(tile, slide.read_region(x, y, w, h, level))


def test_openslide_band_reads_decode_through_tifffile_where_its_pixels_are_openslides(jpeg_tiff, slide_path):
    """openslide's cost grows with the pixels it returns, tifffile's with the tiles it decodes: a
    TIFF that both read identically is read band by band through tifffile, with openslide's
    pixels (compared here with openslide's own per-patch reads)."""
    centers = random_centers(30)
    for path in (jpeg_tiff, slide_path):  # JPEG and zlib tiles
        with open_with("openslide", path) as slide:
            level = 0
            assert slide.band_source(level).reader == "tifffile"
            patches, stats, index, _ = band_patches(slide, centers, 40, 0.5)
            assert stats.decoder == "tifffile"
            for i, row in index.iterrows():
                expected = slide.read_region_scaled(row.x0, row.y0, row.x1 - row.x0, row.y1 - row.y0, 40, 40)
                np.testing.assert_array_equal(patches[i], expected, err_msg=f"{path.name} patch {i}")


def test_openslide_band_reads_stay_on_openslide_where_tifffile_decodes_differently(jpeg_tiff, monkeypatch):
    """One pixel of difference in the comparison region keeps band reads on openslide."""
    from comtip.io import readers

    original = readers.TiffFileSlide._read

    def off_by_one(self, x, y, w, h, level):
        pixels = original(self, x, y, w, h, level).copy()
        pixels[h // 2, w // 2, 0] ^= 1
        return pixels

    monkeypatch.setattr(readers.TiffFileSlide, "_read", off_by_one)
    with open_with("openslide", jpeg_tiff) as slide:
        assert slide.band_source(0) is slide
        patches, stats, index, _ = band_patches(slide, random_centers(10), 40, 0.5)
        assert stats.decoder == "openslide"
        row = index.iloc[5]
        expected = slide.read_region_scaled(row.x0, row.y0, row.x1 - row.x0, row.y1 - row.y0, 40, 40)
        np.testing.assert_array_equal(patches[5], expected)


def test_openslide_band_reads_stay_on_openslide_where_tifffile_cannot_open_the_file(slide_path, monkeypatch):
    from comtip.io import readers

    def refuse(self, path):
        raise readers._Refused("no codec")

    monkeypatch.setattr(readers.TiffFileSlide, "__init__", refuse)
    with open_with("openslide", slide_path) as slide:
        assert slide.band_source(0) is slide
        assert band_patches(slide, random_centers(5), 40, 0.5)[1].decoder == "openslide"


def test_random_row_order_gives_each_spot_the_same_patch(slide_path, tmp_path):
    centers, barcodes = random_centers(40, seed=1), [f"S{i:03d}-1" for i in range(44)]
    perm = np.random.default_rng(2).permutation(len(barcodes))
    sorted_spots = write_spots(tmp_path / "a.h5ad", centers, barcodes)
    shuffled = write_spots(tmp_path / "b.h5ad", centers[perm], [barcodes[i] for i in perm])
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first, _ = run(sorted_spots, slide_path, tmp_path / "a", size_px=24, mpp=0.9)
    second, index = run(shuffled, slide_path, tmp_path / "b", size_px=24, mpp=0.9)
    assert index["barcode"].tolist() == [barcodes[i] for i in perm]
    np.testing.assert_array_equal(second, np.asarray(first)[perm])


def test_levels_without_a_chunk_grid_fall_back_to_per_patch_reads(spots, slide_path, tmp_path, monkeypatch):
    (tmp_path / "bands").mkdir(), (tmp_path / "per_patch").mkdir()
    bands, _ = run(spots, slide_path, tmp_path / "bands", size_px=24, mpp=0.9)
    monkeypatch.setattr("comtip.io.readers.OpenSlideSlide.band_grid", lambda self, level: None)
    called = []
    monkeypatch.setattr("comtip.data.patches.write_by_bands", lambda *a, **k: called.append(1))
    per_patch, _ = run(spots, slide_path, tmp_path / "per_patch", size_px=24, mpp=0.9)
    assert not called
    np.testing.assert_array_equal(bands, per_patch)

"""Ingest on small synthetic Space Ranger folders, including every bad input it must refuse."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp
from PIL import Image

from comtip._core.errors import PipelineInputError
from comtip.data.ingest import ingest_sample
from comtip.io.spaceranger import read_spaceranger

GENES = ["ACTB", "GAPDH", "MT-CO1", "KRT19", "KRT19"]  # duplicate symbol on purpose


def write_outs(
    root: Path,
    *,
    n_side: int = 4,
    pitch: float = 40.0,
    v1_positions: bool = True,
    extra_matrix_barcode: bool = False,
    drop_matrix_barcode: bool = False,
) -> Path:
    """A Space Ranger outs/ with an mtx matrix: n_side² spots, the last row outside the tissue."""
    outs = root / "outs"
    (outs / "spatial").mkdir(parents=True)
    rows, cols = np.meshgrid(np.arange(n_side), np.arange(n_side), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    barcodes = [f"BC{r:02d}{c:02d}-1" for r, c in zip(rows, cols)]
    in_tissue = (rows < n_side - 1).astype(int)
    y, x = 30.0 + rows * pitch, 30.0 + cols * pitch
    lines = [f"{b},{t},{r},{c},{yy},{xx}" for b, t, r, c, yy, xx in zip(barcodes, in_tissue, rows, cols, y, x)]
    if v1_positions:
        (outs / "spatial" / "tissue_positions_list.csv").write_text("\n".join(lines) + "\n")
    else:
        header = "barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres\n"
        (outs / "spatial" / "tissue_positions.csv").write_text(header + "\n".join(lines) + "\n")
    (outs / "spatial" / "scalefactors_json.json").write_text(
        json.dumps({"spot_diameter_fullres": 22.0, "tissue_hires_scalef": 0.5, "tissue_lowres_scalef": 0.1})
    )
    matrix_bcs = [b for b, t in zip(barcodes, in_tissue) if t]
    if drop_matrix_barcode:
        matrix_bcs = matrix_bcs[1:]
    if extra_matrix_barcode:
        matrix_bcs.append("STRANGER-1")
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 20, size=(len(GENES), len(matrix_bcs)))
    mtx = outs / "filtered_feature_bc_matrix"
    mtx.mkdir()
    with gzip.open(mtx / "matrix.mtx.gz", "wb") as fh:
        scipy.io.mmwrite(fh, sp.coo_matrix(counts))
    with gzip.open(mtx / "barcodes.tsv.gz", "wt") as fh:
        fh.write("\n".join(matrix_bcs) + "\n")
    with gzip.open(mtx / "features.tsv.gz", "wt") as fh:
        fh.write("".join(f"ENSG{i:05d}\t{g}\tGene Expression\n" for i, g in enumerate(GENES)))
    return outs


def write_slide(path: Path, size: int = 200) -> Path:
    image = np.full((size, size, 3), 240, np.uint8)
    image[20:150, 20:150] = (200, 90, 160)
    Image.fromarray(image).save(path)
    return path


@pytest.fixture
def outs(tmp_path: Path) -> Path:
    return write_outs(tmp_path)


@pytest.fixture
def slide(tmp_path: Path) -> Path:
    return write_slide(tmp_path / "slide.png")


def test_in_tissue_spots_with_positions_and_unique_genes(outs):
    adata = read_spaceranger(outs, sample="s1")
    assert adata.n_obs == 12  # 3 in-tissue rows of 4
    assert list(adata.var_names) == ["ACTB", "GAPDH", "MT-CO1", "KRT19", "KRT19-1"]
    row = adata.obs.loc["BC0102-1"]
    assert (row["array_row"], row["array_col"]) == (1, 2)
    np.testing.assert_allclose(adata.obsm["spatial"][adata.obs_names.get_loc("BC0102-1")], [30 + 2 * 40, 30 + 40])
    assert adata.var.loc["MT-CO1", "mt"]
    assert np.allclose(adata.obs["total_counts"], np.asarray(adata.X.sum(1)).ravel())


def test_v2_positions_with_header_give_the_same_result(tmp_path, outs):
    v2 = write_outs(tmp_path / "v2", v1_positions=False)
    a, b = read_spaceranger(outs, sample="a"), read_spaceranger(v2, sample="b")
    np.testing.assert_array_equal(a.obsm["spatial"], b.obsm["spatial"])
    assert list(a.obs_names) == list(b.obs_names)


def test_ingest_writes_h5ad_with_mpp_from_spot_geometry(tmp_path, outs, slide):
    out = tmp_path / "results" / "spots.h5ad"
    ingest_sample(outs, slide, out, sample="s1", spot_diameter_um=55.0)
    import anndata as ad

    adata = ad.read_h5ad(out)
    assert adata.uns["comtip"]["mpp"] == pytest.approx(55.0 / 22.0)
    assert adata.uns["comtip"]["mpp_source"] == "spot_geometry"
    assert list(adata.uns["comtip"]["slide_dimensions"]) == [200, 200]


def test_sample_sheet_mpp_wins(tmp_path, outs, slide):
    adata = ingest_sample(outs, slide, tmp_path / "s.h5ad", sample="s1", mpp=0.25)
    assert adata.uns["comtip"]["mpp"] == 0.25
    assert adata.uns["comtip"]["mpp_source"] == "sample_sheet"


def _expect_error(match: str, path_part: str, fn, *args, **kwargs):
    with pytest.raises(PipelineInputError, match=match) as err:
        fn(*args, **kwargs)
    assert "[sample s1]" in str(err.value)
    assert path_part in str(err.value)


def test_missing_outs_folder(tmp_path):
    _expect_error("does not exist", "nowhere", read_spaceranger, tmp_path / "nowhere", sample="s1")


def test_missing_positions(outs):
    (outs / "spatial" / "tissue_positions_list.csv").unlink()
    _expect_error("tissue positions file is missing", "tissue_positions.csv", read_spaceranger, outs, sample="s1")


def test_missing_scalefactors(outs):
    (outs / "spatial" / "scalefactors_json.json").unlink()
    _expect_error("scale factors file is missing", "scalefactors_json.json", read_spaceranger, outs, sample="s1")


def test_missing_matrix(outs):
    shutil.rmtree(outs / "filtered_feature_bc_matrix")
    _expect_error("no count matrix", "filtered_feature_bc_matrix.h5", read_spaceranger, outs, sample="s1")


def test_matrix_barcode_without_position(tmp_path):
    outs = write_outs(tmp_path, extra_matrix_barcode=True)
    _expect_error(
        "1 matrix barcodes have no row.*STRANGER-1", "filtered_feature_bc_matrix", read_spaceranger, outs, sample="s1"
    )


def test_in_tissue_position_without_counts(tmp_path):
    outs = write_outs(tmp_path, drop_matrix_barcode=True)
    _expect_error(
        "1 in-tissue barcodes .* missing from the count matrix.*BC0000-1",
        "filtered_feature_bc_matrix",
        read_spaceranger,
        outs,
        sample="s1",
    )


def test_malformed_positions(outs):
    (outs / "spatial" / "tissue_positions_list.csv").write_text("BC,1,0,0\n")
    _expect_error("expected 6 columns", "tissue_positions_list.csv", read_spaceranger, outs, sample="s1")


def test_spots_outside_the_slide(tmp_path, outs):
    small = write_slide(tmp_path / "small.png", size=60)
    _expect_error("lie outside the slide", "small.png", ingest_sample, outs, small, tmp_path / "x.h5ad", sample="s1")
    assert not (tmp_path / "x.h5ad").exists()


def test_unreadable_slide_names_file_and_readers(tmp_path, outs):
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"not a slide at all")
    with pytest.raises(PipelineInputError) as err:
        ingest_sample(outs, bad, tmp_path / "x.h5ad", sample="s1")
    message = str(err.value)
    assert "[sample s1]" in message and "broken.svs" in message and "openslide" in message
    assert not (tmp_path / "x.h5ad").exists()


def test_invalid_spot_diameter_is_refused(tmp_path, outs, slide):
    factors = outs / "spatial" / "scalefactors_json.json"
    factors.write_text(json.dumps({"spot_diameter_fullres": 0}))
    _expect_error(
        "spot_diameter_fullres", "scalefactors_json.json", ingest_sample, outs, slide, tmp_path / "x.h5ad", sample="s1"
    )


def test_slide_metadata_that_disagrees_with_the_spot_geometry_stops_ingest(tmp_path, outs):
    """A slide whose µm/px metadata (3.5) is 40 % off the spots' geometry (2.5: 100 µm pitch over
    40 px) is not the image the spots were registered to: one error naming both, no output;
    the sheet's mpp_source accepts either."""
    import tifffile

    image = np.full((200, 200, 3), 240, np.uint8)
    image[20:150, 20:150] = (200, 90, 160)
    slide = tmp_path / "slide.tif"
    tifffile.imwrite(slide, image, resolution=(1e4 / 3.5, 1e4 / 3.5), resolutionunit="CENTIMETER")
    out = tmp_path / "s.h5ad"
    _expect_error(
        r"3\.5 µm/px.*2\.5 µm/px.*spot pitch 40\.0 px = 100 µm",
        "slide.tif",
        ingest_sample,
        outs,
        slide,
        out,
        sample="s1",
    )
    assert not out.exists()
    adata = ingest_sample(outs, slide, out, sample="s1", mpp_source="slide_metadata")
    assert (adata.uns["comtip"]["mpp"], adata.uns["comtip"]["mpp_source"]) == (pytest.approx(3.5), "slide_metadata")
    adata = ingest_sample(outs, slide, out, sample="s1", mpp_source="spot_geometry")
    assert (adata.uns["comtip"]["mpp"], adata.uns["comtip"]["mpp_source"]) == (pytest.approx(2.5), "spot_geometry")
    assert adata.uns["comtip"]["slide_metadata_mpp"] == pytest.approx(3.5)
    assert adata.uns["comtip"]["spot_pitch_px"] == pytest.approx(40.0)


def test_the_cytassist_camera_image_as_the_slide_is_refused(tmp_path, outs):
    slide = write_slide(tmp_path / "cytassist_image.tiff")
    _expect_error(
        "CytAssist's camera image.*--image",
        "cytassist_image.tiff",
        ingest_sample,
        outs,
        slide,
        tmp_path / "s.h5ad",
        sample="s1",
    )

"""Visium HD input: the simulated binned_outputs/ against 10x's format, reading at 8 and 16 µm,
pseudo-spots on a hand-built toy and on the simulated run, and the errors for broken inputs."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
from scipy.spatial import cKDTree

from comtip._core.errors import ConfigError, PipelineInputError
from comtip.config import load_sample_sheet, validate_config
from comtip.data.ingest import ingest_sample
from comtip.data.pseudospots import aggregate_bins, hex_cells
from comtip.demo.visium_hd import simulate_visium_hd
from comtip.io.layout import spaceranger_files
from comtip.io.visium_hd import read_hd_bins
from conftest import CONFIG_SCHEMA, SAMPLES_SCHEMA

MPP = 0.5  # the simulator's default µm/px
HD_SCALEFACTOR_KEYS = {
    "tissue_hires_scalef",
    "tissue_lowres_scalef",
    "fiducial_diameter_fullres",
    "spot_diameter_fullres",
    "regist_target_img_scalef",
    "microns_per_pixel",
    "bin_size_um",
}


@pytest.fixture(scope="module")
def hd(tmp_path_factory) -> dict:
    return simulate_visium_hd(tmp_path_factory.mktemp("hd") / "hd1", "hd1", seed=3)


def _bin_dir(hd: dict, size: int) -> Path:
    return Path(hd["outs"]) / "binned_outputs" / f"square_{size:03d}um"


def _positions(hd: dict, size: int) -> pd.DataFrame:
    return pq.read_table(_bin_dir(hd, size) / "spatial" / "tissue_positions.parquet").to_pandas()


# -- the fixture is 10x's format ------------------------------------------------------------------


@pytest.mark.parametrize("size", [8, 16])
def test_simulated_bins_follow_10x_format(hd, size):
    folder = _bin_dir(hd, size)
    schema = pq.read_schema(folder / "spatial" / "tissue_positions.parquet")
    assert schema.names == [
        "barcode",
        "in_tissue",
        "array_row",
        "array_col",
        "pxl_row_in_fullres",
        "pxl_col_in_fullres",
    ]
    assert [str(t) for t in schema.types] == ["string", "int32", "int32", "int32", "double", "double"]
    positions = _positions(hd, size)
    assert positions["barcode"].str.fullmatch(rf"s_{size:03d}um_\d{{5}}_\d{{5}}-1").all()
    assert set(positions["in_tissue"]) == {0, 1}
    factors = json.loads((folder / "spatial" / "scalefactors_json.json").read_text())
    assert set(factors) == HD_SCALEFACTOR_KEYS
    assert factors["bin_size_um"] == size and factors["microns_per_pixel"] == MPP
    assert factors["spot_diameter_fullres"] == pytest.approx(size / MPP)
    for name, n_barcodes in (
        ("filtered_feature_bc_matrix.h5", int(positions["in_tissue"].sum())),
        ("raw_feature_bc_matrix.h5", len(positions)),
    ):
        with h5py.File(folder / name, "r") as f:
            assert {"filetype", "version", "software_version", "library_ids", "chemistry_description"} <= set(f.attrs)
            assert f.attrs["filetype"] == "matrix" and "Visium HD" in f.attrs["chemistry_description"]
            assert set(f["matrix"]) == {"barcodes", "data", "indices", "indptr", "shape", "features"}
            assert set(f["matrix/features"]) == {"id", "name", "feature_type", "genome", "_all_tag_keys"}
            assert f["matrix/shape"][1] == n_barcodes == len(f["matrix/barcodes"])
    assert (folder / "spatial" / "tissue_lowres_image.png").is_file()
    assert hd["bins"][size]["n_in_tissue"] == int(positions["in_tissue"].sum())


def test_16um_bins_are_2x2_sums_of_8um_bins(hd):
    assert hd["bins"][16]["total_counts"] == hd["bins"][8]["total_counts"] > 0
    p8, p16 = _positions(hd, 8), _positions(hd, 16)
    assert len(p8) == 4 * len(p16)
    p8["parent"] = [f"s_016um_{r // 2:05d}_{c // 2:05d}-1" for r, c in zip(p8["array_row"], p8["array_col"])]
    mean = p8.groupby("parent")[["pxl_row_in_fullres", "pxl_col_in_fullres"]].mean()
    p16 = p16.set_index("barcode").loc[mean.index]
    np.testing.assert_allclose(p16[["pxl_row_in_fullres", "pxl_col_in_fullres"]], mean, atol=1e-9)


# -- reading --------------------------------------------------------------------------------------


def test_layout_points_at_the_bin_folder(hd):
    files = spaceranger_files(hd["outs"], 8)
    assert files["positions"] == _bin_dir(hd, 8) / "spatial" / "tissue_positions.parquet"
    assert files["matrix_h5"] == _bin_dir(hd, 8) / "filtered_feature_bc_matrix.h5"
    assert spaceranger_files(hd["outs"])["scalefactors"].parent.parent.name == "square_016um"


@pytest.mark.parametrize("size", [8, 16])
def test_ingest_reads_every_in_tissue_bin_at_its_place(hd, size, tmp_path):
    out = tmp_path / "spots.h5ad"
    ingest_sample(hd["outs"], hd["slide"], out, sample="hd1", bin_size_um=size, min_counts=0)
    spots = ad.read_h5ad(out)
    positions = _positions(hd, size).set_index("barcode")
    inside = positions[positions["in_tissue"] == 1]
    assert spots.n_obs == len(inside) == hd["bins"][size]["n_in_tissue"]
    assert set(spots.obs_names) == set(inside.index)
    # the simulator's bins: centre of (row, col) at ((col + 0.5) * size, (row + 0.5) * size) µm
    expected = np.column_stack([spots.obs["array_col"] + 0.5, spots.obs["array_row"] + 0.5]) * size / MPP
    np.testing.assert_allclose(spots.obsm["spatial"], expected, atol=1e-9)
    assert spots.X.sum() == hd["bins"][size]["total_counts"]
    info = spots.uns["comtip"]
    assert (info["assay"], info["spot_shape"], info["bin_size_um"]) == ("visium_hd", "square", size)
    assert info["spot_diameter_um"] == size and info["spot_diameter_px"] == pytest.approx(size / MPP)
    assert info["spot_pitch_px"] == pytest.approx(size / MPP) and info["mpp"] == pytest.approx(MPP)
    assert np.isnan(info["hd_pseudospot_um"])


# -- pseudo-spots ---------------------------------------------------------------------------------


def _toy(n_out_of_tissue: int) -> tuple[ad.AnnData, pd.DataFrame, np.ndarray]:
    """Bins 1 px apart around the hexagonal grid's centre (row 2, col 4) and one anchor bin at
    (0, 0), mpp 1: with pitch 10 the grid starts at (-10, -10), so that centre is at
    (10, 10·√3 − 10); a 5 µm disc around it holds the 21 bins with dx² + dy² ≤ 6.25."""
    centre = np.array([10.0, 10 * math.sqrt(3) - 10])
    dx, dy = (a.ravel() for a in np.meshgrid(np.arange(-3, 4), np.arange(-3, 4)))
    xy = np.vstack([[0.0, 0.0], centre + np.column_stack([dx, dy])])
    in_disc = np.r_[False, dx**2 + dy**2 <= 6.25]
    in_tissue = np.ones(len(xy), bool)
    in_tissue[np.flatnonzero(in_disc)[:n_out_of_tissue]] = False
    names = [f"b{i}" for i in range(len(xy))]
    positions = pd.DataFrame(
        {"in_tissue": in_tissue, "pxl_col_in_fullres": xy[:, 0], "pxl_row_in_fullres": xy[:, 1]}, index=names
    )
    counts = np.column_stack([np.ones(len(xy)), np.arange(len(xy))])[in_tissue]  # filtered matrix
    bins = ad.AnnData(X=sp.csr_matrix(counts.astype(np.float32)), var=pd.DataFrame(index=["A", "B"]))
    bins.obs_names = np.array(names)[in_tissue]
    bins.obsm["spatial"] = xy[in_tissue]
    return bins, positions, in_disc


@pytest.mark.parametrize(("n_out", "kept"), [(0, True), (10, True), (11, False)])
def test_pseudospot_sums_its_disc_and_needs_a_tissue_majority(n_out, kept):
    bins, positions, in_disc = _toy(n_out)
    assert in_disc.sum() == 21
    spots = aggregate_bins(bins, positions, mpp=1.0, diameter_um=5.0, pitch_um=10.0)
    assert spots.n_obs == int(kept)
    if kept:
        summed = in_disc & positions["in_tissue"].to_numpy()
        assert spots.obs["n_bins"].iloc[0] == 21 - n_out and spots.obs["n_bins_disc"].iloc[0] == 21
        np.testing.assert_array_equal(spots.X.toarray()[0], [summed.sum(), np.flatnonzero(summed).sum()])
        np.testing.assert_allclose(spots.obsm["spatial"][0], [10.0, 10 * math.sqrt(3) - 10])
        assert (spots.obs["array_row"].iloc[0], spots.obs["array_col"].iloc[0]) == (2, 4)


def test_hex_cells_finds_the_nearest_centre_like_a_brute_force_search():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 300, (4000, 2))
    row, col, inside = hex_cells(xy, np.array([-20.0, -20.0]), 37.0, 15.0)
    r, c = (a.ravel() for a in np.meshgrid(np.arange(-1, 15), np.arange(-1, 22), indexing="ij"))
    r, c = r[(r + c) % 2 == 0], c[(r + c) % 2 == 0]
    centres = np.column_stack([-20 + c * 18.5, -20 + r * 37 * math.sqrt(3) / 2])
    distance, nearest = cKDTree(centres).query(xy)
    np.testing.assert_array_equal(inside, distance <= 15.0)
    np.testing.assert_array_equal(row[inside], r[nearest][inside])
    np.testing.assert_array_equal(col[inside], c[nearest][inside])


@pytest.mark.parametrize("size", [8, 16])
def test_ingest_pseudospots_conserve_the_counts_of_their_discs(hd, size, tmp_path):
    out = tmp_path / "spots.h5ad"
    ingest_sample(hd["outs"], hd["slide"], out, sample="hd1", bin_size_um=size, hd_pseudospot_um=55.0, min_counts=0)
    spots = ad.read_h5ad(out)
    bins, positions, _ = read_hd_bins(hd["outs"], sample="hd1", bin_size_um=size)
    assert spots.n_obs > 10 and spots.uns["comtip"]["spot_shape"] == "circle"
    assert spots.uns["comtip"]["spot_pitch_um"] == pytest.approx(100.0)
    # every in-tissue bin whose centre lies within 27.5 µm of a pseudo-spot centre, and no other
    distance, nearest = cKDTree(spots.obsm["spatial"]).query(bins.obsm["spatial"])
    inside = distance <= 27.5 / MPP
    member = sp.csr_matrix(
        (np.ones(inside.sum()), (nearest[inside], np.flatnonzero(inside))), (spots.n_obs, bins.n_obs)
    )
    np.testing.assert_array_equal(spots.X.toarray(), (member @ bins.X).toarray())
    assert spots.X.sum() == bins.X[inside].sum()
    np.testing.assert_array_equal(spots.obs["n_bins"], np.bincount(nearest[inside], minlength=spots.n_obs))
    assert (2 * spots.obs["n_bins"] > spots.obs["n_bins_disc"]).all()
    pitch = np.sort(cKDTree(spots.obsm["spatial"]).query(spots.obsm["spatial"], k=2)[0][:, 1])[0]
    assert pitch == pytest.approx(100.0 / MPP)


# -- broken inputs --------------------------------------------------------------------------------


def _copy(hd: dict, tmp_path: Path) -> Path:
    outs = tmp_path / "outs"
    shutil.copytree(hd["outs"], outs)
    return outs


def test_broken_positions_give_one_error_naming_sample_file_and_columns(hd, tmp_path):
    outs = _copy(hd, tmp_path)
    path = outs / "binned_outputs" / "square_016um" / "spatial" / "tissue_positions.parquet"
    table = pq.read_table(path).drop(["array_col"])
    table = table.set_column(
        table.schema.get_field_index("pxl_row_in_fullres"),
        "pxl_row_in_fullres",
        pa.array([str(v) for v in table.column("pxl_row_in_fullres").to_pylist()]),
    )
    pq.write_table(table, path)
    results = tmp_path / "results"
    results.mkdir()
    with pytest.raises(PipelineInputError) as err:
        ingest_sample(outs, hd["slide"], results / "spots.h5ad", sample="hd1", bin_size_um=16)
    message = str(err.value)
    assert "[sample hd1]" in message and str(path) in message
    assert "'array_col' is missing" in message and "'pxl_row_in_fullres' must be a float" in message
    assert list(results.iterdir()) == []


def test_scalefactors_that_do_not_match_the_bins_are_refused(hd, tmp_path):
    outs = _copy(hd, tmp_path)
    path = outs / "binned_outputs" / "square_008um" / "spatial" / "scalefactors_json.json"
    factors = json.loads(path.read_text())
    path.write_text(json.dumps({**factors, "microns_per_pixel": 2 * MPP}))
    with pytest.raises(PipelineInputError, match=r"\[sample hd1\] .*scalefactors_json.json: .*not the 8 µm"):
        ingest_sample(outs, hd["slide"], tmp_path / "spots.h5ad", sample="hd1", bin_size_um=8)
    path.write_text(json.dumps({**factors, "bin_size_um": 16}))
    with pytest.raises(PipelineInputError, match="scale factors say bin_size_um 16"):
        ingest_sample(outs, hd["slide"], tmp_path / "spots.h5ad", sample="hd1", bin_size_um=8)


def test_a_missing_bin_size_a_bin_size_for_visium_or_a_bin_folder_as_outs_is_refused(hd, tmp_path):
    with pytest.raises(PipelineInputError, match=r"square_002um: this Visium HD run has no 2 µm bins"):
        ingest_sample(hd["outs"], hd["slide"], tmp_path / "a.h5ad", sample="hd1", bin_size_um=2)
    visium = tmp_path / "visium_outs"
    visium.mkdir()
    with pytest.raises(PipelineInputError, match=r"\[sample v\] .*visium_outs: the sample sheet sets bin_size_um 8"):
        ingest_sample(visium, hd["slide"], tmp_path / "b.h5ad", sample="v", bin_size_um=8)
    with pytest.raises(PipelineInputError, match=r"square_016um: this is one bin folder of a Visium HD run"):
        ingest_sample(_bin_dir(hd, 16), hd["slide"], tmp_path / "c.h5ad", sample="hd1")
    assert not any((tmp_path / name).exists() for name in ("a.h5ad", "b.h5ad", "c.h5ad"))


# -- sheet and config -----------------------------------------------------------------------------

HEADER = "sample\tspaceranger_dir\tslide\tsplit\tbin_size_um\n"


def _load(tmp_path: Path, value: str) -> pd.DataFrame:
    (tmp_path / "outs").mkdir(exist_ok=True)
    (tmp_path / "slide.tif").write_bytes(b"x")
    sheet = tmp_path / "samples.tsv"
    sheet.write_text(HEADER + f"h\touts\tslide.tif\ttrain\t{value}\n")
    return load_sample_sheet(sheet, SAMPLES_SCHEMA, run_dir=tmp_path)


@pytest.mark.parametrize("value", ["2", "8", "16", "8.0"])
def test_sheet_accepts_hd_bin_sizes(tmp_path, value):
    assert _load(tmp_path, value).loc["h", "bin_size_um"] == int(float(value))


@pytest.mark.parametrize("value", ["4", "8.5", "fine"])
def test_sheet_refuses_other_bin_sizes_naming_sample_and_column(tmp_path, value):
    with pytest.raises(ConfigError, match=r"sample 'h'.*column 'bin_size_um'"):
        _load(tmp_path, value)


def test_pseudospot_config_defaults_and_checks():
    ingest = validate_config({"samples": "s.tsv"}, CONFIG_SCHEMA)["ingest"]
    assert ingest["hd_pseudospot_um"] is None and ingest["hd_pseudospot_pitch_um"] is None
    assert validate_config({"samples": "s.tsv", "ingest": {"hd_pseudospot_um": 55}}, CONFIG_SCHEMA)
    for ingest, needle in (
        ({"hd_pseudospot_um": 55, "hd_pseudospot_pitch_um": 50}, "hd_pseudospot_pitch_um': 50 is smaller"),
        ({"hd_pseudospot_pitch_um": 100}, "hd_pseudospot_pitch_um': set, but"),
        ({"hd_pseudospot_um": 0}, "ingest.hd_pseudospot_um"),
    ):
        with pytest.raises(ConfigError, match=needle):
            validate_config({"samples": "s.tsv", "ingest": ingest}, CONFIG_SCHEMA)

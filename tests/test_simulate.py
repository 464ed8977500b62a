"""comtip.demo: the synthetic Visium samples must read like real Space Ranger output and
carry an image -> expression signal that models can learn (and evaluations can check)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import anndata as ad
import numpy as np
import openslide
import pandas as pd
import pytest
import scanpy as sc
from PIL import Image
from scipy.stats import spearmanr

from comtip._core.errors import PipelineInputError
from comtip.demo import SimulationParams, main, render, simulate_sample

# scanpy warns about the deliberately duplicated gene symbol on every read.
pytestmark = pytest.mark.filterwarnings("ignore:Variable names are not unique")

SMALL = SimulationParams(tissue_mm=1.0, mpp=1.0, n_genes=50, region_scale_um=100.0)
FILES = (
    "outs/filtered_feature_bc_matrix.h5",
    "outs/spatial/tissue_positions.csv",
    "outs/spatial/scalefactors_json.json",
    "outs/spatial/tissue_hires_image.png",
    "outs/spatial/tissue_lowres_image.png",
    "slide.tif",
    "truth.h5ad",
)


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> dict:
    return simulate_sample(tmp_path_factory.mktemp("sim") / "s1", "s1", 7, SMALL)


@pytest.fixture(scope="module")
def counts(sample) -> ad.AnnData:
    return sc.read_10x_h5(sample["matrix_h5"])


@pytest.fixture(scope="module")
def truth(sample) -> ad.AnnData:
    return ad.read_h5ad(sample["truth"])


@pytest.fixture(scope="module")
def positions(sample) -> pd.DataFrame:
    return pd.read_csv(sample["tissue_positions"])


@pytest.fixture(scope="module")
def level0(sample) -> np.ndarray:
    with openslide.OpenSlide(sample["slide"]) as slide:
        return np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))


def _disk_features(image: np.ndarray, xy_px: np.ndarray, radius: int) -> np.ndarray:
    """Per spot: mean R, G, B and the share of dark (nucleus) pixels in the box around it."""
    rows = []
    for x, y in np.rint(xy_px).astype(int):
        patch = image[y - radius : y + radius, x - radius : x + radius].reshape(-1, 3).astype(float)
        rows.append([*patch.mean(axis=0), 255 * (patch.mean(axis=1) < 130).mean()])
    return np.array(rows)


def _saturation(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(float)
    return (rgb.max(axis=-1) - rgb.min(axis=-1)) / np.maximum(rgb.max(axis=-1), 1)


def test_writes_the_space_ranger_layout_and_reports_counts(sample, positions, counts):
    root = Path(sample["slide"]).parent
    for name in FILES:
        assert (root / name).is_file(), name
    assert not list(root.rglob(".*tmp-*")), "no temporary files left behind"
    assert sample["n_spots_total"] == len(positions)
    assert sample["n_in_tissue"] == counts.n_obs == positions["in_tissue"].sum() > 20
    assert sample["n_genes"] == counts.n_vars == SMALL.n_genes


def test_scanpy_reads_the_matrix_with_integer_counts(counts):
    assert counts.X.shape == (counts.n_obs, SMALL.n_genes)
    values = counts.X.data
    assert np.all(values > 0) and np.array_equal(values, np.round(values))
    assert counts.var["feature_types"].eq("Gene Expression").all()
    assert counts.var["gene_ids"].is_unique


def test_exactly_one_gene_symbol_is_duplicated_with_distinct_ids(counts, truth):
    duplicated = counts.var_names[counts.var_names.duplicated(keep=False)]
    assert len(duplicated) == 2 and duplicated[0] == duplicated[1]
    ids = counts.var.loc[counts.var_names.duplicated(keep=False), "gene_ids"]
    assert ids.nunique() == 2
    assert truth.var_names.is_unique  # the truth uses the make-unique names ("X", "X-1")
    assert f"{duplicated[0]}-1" in truth.var_names


def test_positions_cover_the_grid_and_list_matrix_barcodes(positions, counts, sample):
    assert list(positions.columns) == [
        "barcode",
        "in_tissue",
        "array_row",
        "array_col",
        "pxl_row_in_fullres",
        "pxl_col_in_fullres",
    ]
    assert positions["barcode"].is_unique
    assert positions["barcode"].str.fullmatch(r"[ACGT]{16}-1").all()
    assert set(positions["in_tissue"]) == {0, 1}
    in_tissue = positions.loc[positions["in_tissue"] == 1, "barcode"]
    assert sorted(in_tissue) == sorted(counts.obs_names)
    width, height = sample["slide_dimensions"]
    assert positions["pxl_col_in_fullres"].between(0, width).all()
    assert positions["pxl_row_in_fullres"].between(0, height).all()


def test_grid_is_hexagonal_with_columns_along_x(positions):
    """Two columns apart on one row = one pitch along x; one row apart = pitch*sqrt(3)/2 along y."""
    pitch_px = SMALL.spot_pitch_um / SMALL.mpp
    assert ((positions["array_row"] + positions["array_col"]) % 2 == 0).all()
    grid = positions.set_index(["array_row", "array_col"])
    row, col = grid.index[0]
    here = grid.loc[(row, col)]
    right = grid.loc[(row, col + 2)] if (row, col + 2) in grid.index else grid.loc[(row, col - 2)]
    step = abs(right["pxl_col_in_fullres"] - here["pxl_col_in_fullres"])
    assert step == pytest.approx(pitch_px, abs=0.01)
    assert right["pxl_row_in_fullres"] == pytest.approx(here["pxl_row_in_fullres"], abs=0.01)
    rows = grid.groupby(level="array_row")["pxl_row_in_fullres"].mean()
    assert np.diff(rows.to_numpy()) == pytest.approx(pitch_px * np.sqrt(3) / 2, abs=0.01)


def test_openslide_opens_the_pyramid_and_recovers_mpp(sample):
    with openslide.OpenSlide(sample["slide"]) as slide:
        props = slide.properties
        assert props["openslide.vendor"] == "generic-tiff"
        assert slide.level_count > 1
        assert slide.dimensions == tuple(sample["slide_dimensions"])
        assert max(slide.level_dimensions[-1]) <= 1024 < max(slide.level_dimensions[-2])
        assert slide.level_downsamples[1] == pytest.approx(2.0, rel=1e-3)
        assert float(props["openslide.mpp-x"]) == pytest.approx(SMALL.mpp)
        assert props["tiff.ResolutionUnit"] == "centimeter"
        assert 1e4 / float(props["tiff.XResolution"]) == pytest.approx(SMALL.mpp)
        assert int(props["openslide.level[0].tile-width"]) == 256


def test_scalefactors_match_the_downsampled_images(sample):
    factors = json.loads(Path(sample["scalefactors"]).read_text())
    width, height = sample["slide_dimensions"]
    assert factors["spot_diameter_fullres"] == pytest.approx(SMALL.spot_diameter_um / SMALL.mpp)
    assert factors["fiducial_diameter_fullres"] > factors["spot_diameter_fullres"]
    for key, name, max_side in (
        ("tissue_hires_scalef", "hires_image", 2000),
        ("tissue_lowres_scalef", "lowres_image", 600),
    ):
        with Image.open(sample[name]) as image:
            assert image.mode == "RGB"
            assert image.size == (round(width * factors[key]), round(height * factors[key]))
            assert max(image.size) <= max_side


def test_tissue_is_visible_on_the_slide_and_in_the_hires_image(sample, positions, level0):
    inside = positions["in_tissue"] == 1
    xy = positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy()
    saturation = _saturation(_disk_features(level0, xy, 10)[:, :3])
    assert saturation[inside].min() > 0.04  # centre on tissue: at least half the box is tissue
    assert np.median(saturation[inside]) > 0.15 > 0.03 > np.median(saturation[~inside])
    assert np.median(_saturation(level0[:20, :20])) < 0.05  # slide corner: near-white glass

    factor = json.loads(Path(sample["scalefactors"]).read_text())["tissue_hires_scalef"]
    hires = np.asarray(Image.open(sample["hires_image"]))
    cols, rows = np.rint(xy * factor).astype(int).T
    cols, rows = cols.clip(0, hires.shape[1] - 1), rows.clip(0, hires.shape[0] - 1)
    hires_saturation = _saturation(hires[rows, cols])
    assert hires_saturation[inside].mean() > 3 * hires_saturation[~inside].mean()


def test_cell_types_look_different(truth, positions, level0):
    """Nearest-centroid on (mean colour, dark-pixel share) recovers the type of pure spots, and
    the dark-pixel share tracks the true nuclei density."""
    xy = positions.set_index("barcode").loc[truth.obs_names, ["pxl_col_in_fullres", "pxl_row_in_fullres"]]
    radius = int(SMALL.spot_diameter_um / SMALL.mpp / 2 / np.sqrt(2))  # box inside the disk
    features = _disk_features(level0, xy.to_numpy(), radius)
    assert spearmanr(features[:, 3], truth.obs["nuclei_per_mm2"])[0] > 0.8

    fractions = truth.obsm["cell_type_fractions"]
    pure = fractions.max(axis=1) >= 0.9
    labels = fractions.argmax(axis=1)[pure]
    present = [t for t in np.unique(labels) if (labels == t).sum() >= 3]
    assert len(present) >= 2
    keep = np.isin(labels, present)
    labels, pure_features = labels[keep], features[pure][keep]
    z = (pure_features - pure_features.mean(axis=0)) / pure_features.std(axis=0)
    centroids = np.array([z[labels == t].mean(axis=0) for t in present])
    nearest = np.argmin(((z[:, None] - centroids[None]) ** 2).sum(axis=2), axis=1)
    assert (np.array(present)[nearest] == labels).mean() > 0.75  # chance: 1 / len(present)


def test_marker_counts_follow_cell_type_fractions(truth, counts):
    counts = counts[truth.obs_names]
    fractions = truth.obsm["cell_type_fractions"]
    checked = 0
    for t, name in enumerate(truth.uns["cell_types"]):
        if fractions[:, t].std() < 0.15:
            continue  # type (nearly) absent from this small tissue
        markers = np.flatnonzero(truth.var["marker_of"].to_numpy() == name)
        assert len(markers) == SMALL.n_markers_per_type
        marker_counts = np.asarray(counts.X[:, markers].sum(axis=1)).ravel()
        assert spearmanr(marker_counts, fractions[:, t])[0] > 0.5, name
        checked += 1
    assert checked >= 2


def test_truth_matches_the_matrix(truth, counts):
    assert list(truth.obs_names) == list(counts.obs_names)
    assert list(truth.var["gene_ids"]) == list(counts.var["gene_ids"])
    fractions = truth.obsm["cell_type_fractions"]
    assert fractions.shape == (truth.n_obs, SMALL.n_cell_types)
    assert np.allclose(fractions.sum(axis=1), 1.0, atol=1e-5)
    assert np.all(truth.X > 0)
    assert truth.X.sum(axis=1).mean() == pytest.approx(SMALL.mean_counts, rel=1e-4)
    observed = np.asarray(counts.X.sum(axis=1)).ravel()
    assert spearmanr(observed, truth.X.sum(axis=1))[0] > 0.9
    names = list(truth.uns["cell_types"])
    assert set(truth.obs["dominant_cell_type"]) <= set(names)
    assert {"nuclei_count", "nuclei_per_mm2", "density_z"} <= set(truth.obs.columns)


def test_same_seed_is_byte_identical_and_other_seeds_or_names_differ(sample, tmp_path):
    again = simulate_sample(tmp_path / "again", "s1", 7, SMALL)
    for key in ("matrix_h5", "tissue_positions", "slide", "hires_image", "scalefactors"):
        assert Path(again[key]).read_bytes() == Path(sample[key]).read_bytes(), key

    def in_tissue(result: dict) -> pd.Series:
        return pd.read_csv(result["tissue_positions"]).set_index("barcode")["in_tissue"]

    other_seed = simulate_sample(tmp_path / "seed", "s1", 8, SMALL)
    other_name = simulate_sample(tmp_path / "name", "s2", 7, SMALL)
    for other in (other_seed, other_name):
        assert Path(other["slide"]).read_bytes() != Path(sample["slide"]).read_bytes()
        assert not in_tissue(other).equals(in_tissue(sample))
        # Genes and programs are cohort-wide: the same in every sample.
        assert list(sc.read_10x_h5(other["matrix_h5"]).var["gene_ids"]) == list(
            sc.read_10x_h5(sample["matrix_h5"]).var["gene_ids"]
        )


def test_a_failed_slide_write_leaves_no_slide(tmp_path, monkeypatch):
    def broken_band(self, index, y0, y1):
        raise RuntimeError("killed")

    monkeypatch.setattr(render._Renderer, "band", broken_band)
    with pytest.raises(RuntimeError, match="killed"):
        simulate_sample(tmp_path / "x", "x", 1, SMALL)
    assert not [p for p in (tmp_path / "x").rglob("*") if p.is_file()]


@pytest.mark.parametrize(
    "changes",
    [{"tissue_mm": 0.0}, {"mpp": -1.0}, {"n_genes": 10}, {"spot_diameter_um": 120.0}],
)
def test_bad_parameters_are_input_errors_naming_the_sample(tmp_path, changes):
    params = dataclasses.replace(SMALL, **changes)
    with pytest.raises(PipelineInputError, match=r"\[sample bad\]"):
        simulate_sample(tmp_path, "bad", 1, params)


def test_cli_writes_a_sample(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["--out", str(out), "--sample", "cli", "--seed", "3"]
    assert main([*argv, "--tissue-mm", "0.8", "--mpp", "2", "--n-genes", "40"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_genes"] == 40 and summary["mpp"] == 2.0
    for name in FILES:
        assert (out / name).is_file(), name
    assert main([*argv, "--n-genes", "5"]) == 2
    assert "[sample cli]" in capsys.readouterr().err

"""Ingest on real Space Ranger output from ../shared/data (skipped when it is absent)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from comtip.data.ingest import ingest_sample
from comtip.io.spaceranger import read_spaceranger
from conftest import shared_data

pytestmark = pytest.mark.realdata


def test_spaceranger3_cytassist_folder():
    outs = shared_data("visium_cytassist_mouse_placenta", "outs")
    adata = read_spaceranger(outs, sample="placenta")
    positions = pd.read_csv(outs / "spatial" / "tissue_positions.csv").set_index("barcode")
    in_tissue = positions[positions["in_tissue"] == 1]
    assert adata.n_obs == len(in_tissue) == 2898
    assert adata.n_vars == 19465
    assert adata.var_names.is_unique
    row = in_tissue.loc[adata.obs_names[0]]
    np.testing.assert_allclose(adata.obsm["spatial"][0], [row["pxl_col_in_fullres"], row["pxl_row_in_fullres"]])
    assert adata.obs["in_tissue"].all()
    assert (adata.obs["total_counts"] > 0).all()
    assert adata.uns["spatial"]["placenta"]["images"]["lowres"].shape[2] == 3


def test_mtx_only_folder_with_v1_positions():
    outs = shared_data("dynamicst_breast_dcis", "outs")
    adata = read_spaceranger(outs, sample="dcis")
    assert adata.n_obs == 2172
    assert adata.n_vars == 36601
    assert adata.var_names.is_unique
    positions = pd.read_csv(outs / "spatial" / "tissue_positions_list.csv", header=None, index_col=0)
    np.testing.assert_allclose(adata.obsm["spatial"][:, 0], positions.loc[adata.obs_names, 5].to_numpy())
    np.testing.assert_allclose(adata.obsm["spatial"][:, 1], positions.loc[adata.obs_names, 4].to_numpy())


@pytest.mark.parametrize("section", ["C2", "C3", "C4", "C5"])
def test_her2st_jpeg_sections_take_mpp_from_spot_geometry(tmp_path, section):
    outs = shared_data("her2st", section, "outs")
    slide = next((outs / "image").glob("*.jpg"))
    adata = ingest_sample(
        outs, slide, tmp_path / "spots.h5ad", sample=section, spot_diameter_um=100.0, spot_pitch_um=200.0
    )
    info = adata.uns["comtip"]
    assert info["mpp_source"] == "spot_geometry"
    # her2st's own record (an extra key real Space Ranger does not write) agrees within 1 %: the
    # geometry is the spot pitch measured in the registered positions (200 µm on ST arrays)
    import json

    recorded = json.loads((outs / "spatial" / "scalefactors_json.json").read_text())["microns_per_pixel"]
    assert info["mpp"] == pytest.approx(recorded, rel=0.01)
    assert info["spot_pitch_px"] == pytest.approx(200.0 / recorded, rel=0.01)
    assert 150 <= adata.n_obs <= 200
    assert adata.n_vars > 10000
    assert (tmp_path / "spots.h5ad").exists()


def test_her2st_sheet_left_at_visiums_pitch_is_refused(tmp_path):
    """Legacy ST spots are 100 µm at a 200 µm pitch: a sheet that sets the diameter but leaves the
    pitch at Visium's 100 µm would halve µm/px; the diameter/pitch check names the column."""
    from comtip._core.errors import PipelineInputError

    outs = shared_data("her2st", "C2", "outs")
    slide = next((outs / "image").glob("*.jpg"))
    with pytest.raises(PipelineInputError, match=r"\[sample C2\].*set spot_pitch_um right"):
        ingest_sample(outs, slide, tmp_path / "spots.h5ad", sample="C2", spot_diameter_um=100.0)
    assert not (tmp_path / "spots.h5ad").exists()


def test_spaceranger3_spot_diameter_is_not_55_um_of_the_pitch():
    """Real Space Ranger 3.0 output: spot_diameter_fullres is 0.70 of the spot pitch in the
    positions (Visium: 55 µm spots at 100 µm), so µm/px from the diameter alone would be 27 %
    off; the pitch is what the geometry uses (and within the diameter/pitch check's factor)."""
    import json

    from comtip.data.ingest import spot_pitch_px
    from comtip.io.slide import DIAMETER_PITCH_FACTOR

    outs = shared_data("visium_cytassist_mouse_placenta", "outs")
    adata = read_spaceranger(outs, sample="placenta")
    diameter = json.loads((outs / "spatial" / "scalefactors_json.json").read_text())["spot_diameter_fullres"]
    ratio = diameter / spot_pitch_px(adata.obsm["spatial"])
    assert ratio == pytest.approx(0.70, abs=0.01)
    assert ratio / 0.55 < DIAMETER_PITCH_FACTOR

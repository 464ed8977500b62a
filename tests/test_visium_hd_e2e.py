"""The per-slide and gene stages of the workflow on one simulated Visium HD sample (8 µm bins
summed into 55 µm pseudo-spots): sheet column bin_size_um and config ingest.hd_pseudospot_um
reach ingest through the rule, and tiling, patches and gene sentences take its spots as they
take Visium's. Apart from the tiny cohort's run: model stages are the same for any spots."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml

from _helpers.workflow import snakemake, write_run_folder
from comtip.demo.visium_hd import simulate_visium_hd

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def hd_run(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("hd_run")
    hd = simulate_visium_hd(root / "data" / "hd", "hd", seed=5)
    write_run_folder(root, [])
    config_path = root / "config" / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["ingest"] = {"hd_pseudospot_um": 55.0}
    config["genes"] = {**config.get("genes", {}), "n_genes": 20}
    config_path.write_text(yaml.safe_dump(config))
    (root / "config" / "samples.tsv").write_text(
        "sample\tspaceranger_dir\tslide\tsplit\tbin_size_um\nhd\t../data/hd/outs\t../data/hd/slide.tif\ttrain\t8\n"
    )
    targets = [f"results/hd/{name}" for name in ("spots.h5ad", "thumbnail.png", "spot_patches.npy")]
    snakemake(root, *targets, "results/hd/gene_sentences.npz")
    return root, hd


def test_hd_sample_runs_through_ingest_patches_and_sentences(hd_run):
    root, hd = hd_run
    spots = ad.read_h5ad(root / "results" / "hd" / "spots.h5ad")
    info = spots.uns["comtip"]
    assert (info["assay"], info["bin_size_um"], info["spot_shape"]) == ("visium_hd", 8, "circle")
    assert info["hd_pseudospot_um"] == 55.0 and info["spot_pitch_um"] == pytest.approx(100.0)
    assert 10 < spots.n_obs < hd["bins"][8]["n_in_tissue"] / 20
    assert spots.obs_names.str.startswith("ps_").all()
    patches = np.load(root / "results" / "hd" / "spot_patches.npy", mmap_mode="r")
    index = pd.read_parquet(root / "results" / "hd" / "spot_patches.parquet")
    assert patches.shape == (spots.n_obs, 224, 224, 3)
    assert list(index["barcode"]) == list(spots.obs_names)
    np.testing.assert_allclose(index[["x_center", "y_center"]], spots.obsm["spatial"])
    with np.load(root / "results" / "hd" / "gene_sentences.npz") as sentences:
        assert len(sentences["panel_values"]) == spots.n_obs

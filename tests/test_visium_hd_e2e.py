"""A simulated Visium HD sample (8 µm bins summed into 55 µm pseudo-spots) through the whole
workflow, from Space Ranger's ``binned_outputs/`` to evaluated predictions: the tiny cohort's run
(conftest's session fixture) is copied and the HD sample joins it as a second test slide.

The sheet column bin_size_um and config ingest.hd_pseudospot_um reach ingest through the rule;
tiling, patches, gene sentences, the encoders' embeddings and the predictions take its spots as
they take Visium's; the tiny cohort's own jobs do not rerun (the HD settings are passed to HD
samples only)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml

from _helpers.workflow import snakemake
from comtip.demo.visium_hd import HD_PARAMS, simulate_visium_hd
from comtip.evaluation.run import run_evaluation

pytestmark = pytest.mark.e2e

HD = "tiny_hd"
METHODS = ("ridge_comtip", "finetune_linear", "zeroshot")


@pytest.fixture(scope="module")
def hd_run(tiny_run, tmp_path_factory) -> tuple[Path, dict, str]:
    root = tmp_path_factory.mktemp("hd_run") / "run"
    shutil.copytree(tiny_run, root, symlinks=True)  # copy2: modification times kept
    config_path = root / "config" / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    # the tiny cohort's gene names: the demo's symbols for its number of genes
    params = dataclasses.replace(HD_PARAMS, n_genes=config["demo"]["params"]["n_genes"])
    hd = simulate_visium_hd(root / "data" / "hd", HD, seed=5, params=params)
    config["ingest"] = {**config.get("ingest", {}), "hd_pseudospot_um": 55.0}
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))  # reordered params would rerun jobs
    sheet = pd.read_csv(root / "config" / "samples.tsv", sep="\t", dtype=str, keep_default_na=False)
    sheet["bin_size_um"] = ""
    row = {c: "" for c in sheet.columns} | {
        "sample": HD, "spaceranger_dir": "../data/hd/outs", "slide": "../data/hd/slide.tif", "split": "test",
        "batch": "hd", "patient": HD, "bin_size_um": "8",
    }  # fmt: skip
    pd.concat([sheet, pd.DataFrame([row])]).to_csv(root / "config" / "samples.tsv", sep="\t", index=False)
    result = snakemake(root, *(f"results/predictions/{HD}/{m}.h5ad" for m in METHODS))
    return root, hd, result.stdout + result.stderr


def test_hd_sample_runs_through_ingest_patches_and_sentences(hd_run):
    root, hd, _ = hd_run
    spots = ad.read_h5ad(root / "results" / HD / "spots.h5ad")
    info = spots.uns["comtip"]
    assert (info["assay"], info["bin_size_um"], info["spot_shape"]) == ("visium_hd", 8, "circle")
    assert info["hd_pseudospot_um"] == 55.0 and info["spot_pitch_um"] == pytest.approx(100.0)
    assert 10 < spots.n_obs < hd["bins"][8]["n_in_tissue"] / 20
    assert spots.obs_names.str.startswith("ps_").all()
    patches = np.load(root / "results" / HD / "spot_patches.npy", mmap_mode="r")
    index = pd.read_parquet(root / "results" / HD / "spot_patches.parquet")
    assert patches.shape == (spots.n_obs, 224, 224, 3)
    assert list(index["barcode"]) == list(spots.obs_names)
    np.testing.assert_allclose(index[["x_center", "y_center"]], spots.obsm["spatial"])
    with np.load(root / "results" / HD / "gene_sentences.npz") as sentences:
        assert len(sentences["panel_values"]) == spots.n_obs


def test_hd_test_slide_is_predicted_and_evaluated_without_rerunning_the_cohort(hd_run, tiny_run):
    root, _, log = hd_run
    for rule in ("ingest", "extract_patches", "build_gene_sentences", "embed_spots", "predict_baseline",
                 "predict_finetuned"):  # fmt: skip
        assert f"rule {rule}:" in log, f"{rule} did not run for the HD sample"
    for rule in ("simulate_demo_sample", "pretrain", "select_genes", "finetune"):
        assert f"rule {rule}:" not in log, f"{rule} reran for a new test slide"
    assert log.count("rule ingest:") == 1, "the Visium samples' ingest reran"  # HD settings reach HD samples only
    spots = ad.read_h5ad(root / "results" / HD / "spots.h5ad")
    predictions = {(HD, m): root / "results" / "predictions" / HD / f"{m}.h5ad" for m in METHODS}
    for path in predictions.values():
        pred = ad.read_h5ad(path)
        assert list(pred.obs_names) == list(spots.obs_names) and np.isfinite(pred.X).all()
    out = root / "hd_eval"
    out.mkdir()
    summary = run_evaluation(
        {HD: root / "results" / HD / "gene_sentences.npz"},
        predictions,
        root / "results" / "genes" / "gene_panel.tsv",
        out / "metrics.tsv",
        out / "summary.tsv",
    )
    assert set(summary["method"]) == set(METHODS)
    assert summary.loc[summary["gene_set"] == "all", "n_genes"].min() > 0

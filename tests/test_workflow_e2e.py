"""The Snakemake workflow end to end on a tiny synthetic cohort (the checked-in test config
.test/config/), asserting on content."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from _helpers.workflow import PREDICT_SAMPLE, SAMPLES, snakemake, write_run_folder
from comtip.data.tiling import read_mask
from comtip.io.readers import open_slide

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def demo_run(tiny_run) -> Path:
    """The whole DAG run once locally (conftest's session fixture, shared with the SLURM and
    rerun tests that compare their outputs with it)."""
    return tiny_run


@pytest.mark.parametrize("sample", list(SAMPLES))
def test_spots_match_the_simulated_space_ranger_output(demo_run, sample):
    spots = ad.read_h5ad(demo_run / "results" / sample / "spots.h5ad")
    positions = pd.read_csv(
        demo_run / "resources" / "demo" / sample / "outs" / "spatial" / "tissue_positions.csv", index_col="barcode"
    )
    in_tissue = positions[positions["in_tissue"] == 1]
    assert set(spots.obs_names) == set(in_tissue.index)
    xy = in_tissue.loc[spots.obs_names, ["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy()
    np.testing.assert_allclose(spots.obsm["spatial"], xy)
    assert spots.uns["comtip"]["mpp"] == pytest.approx(0.5)
    assert spots.uns["comtip"]["mpp_source"] == "slide_metadata"
    assert spots.var_names.is_unique


@pytest.mark.parametrize("sample", list(SAMPLES))
def test_patches_are_centred_on_spots_and_equal_direct_reads(demo_run, sample):
    results = demo_run / "results" / sample
    spots = ad.read_h5ad(results / "spots.h5ad")
    patches = np.load(results / "spot_patches.npy", mmap_mode="r")
    index = pd.read_parquet(results / "spot_patches.parquet")
    assert patches.shape == (spots.n_obs, 224, 224, 3) and patches.dtype == np.uint8
    assert list(index["barcode"]) == list(spots.obs_names)
    np.testing.assert_allclose(index[["x_center", "y_center"]].to_numpy(), spots.obsm["spatial"])
    side = 224 * 0.5 / spots.uns["comtip"]["mpp"]
    np.testing.assert_allclose(index["x1"] - index["x0"], side)
    with open_slide(demo_run / "resources" / "demo" / sample / "slide.tif") as slide:
        for i in np.linspace(0, spots.n_obs - 1, 5).astype(int):
            row = index.iloc[i]
            direct = slide.read_region_scaled(row["x0"], row["y0"], side, side, 224, 224)
            np.testing.assert_array_equal(patches[i], direct)


@pytest.mark.parametrize("sample", list(SAMPLES))
def test_tissue_mask_covers_the_simulated_tissue(demo_run, sample):
    results = demo_run / "results" / sample
    mask, (sx, sy) = read_mask(results / "tissue_mask.png")
    positions = pd.read_csv(demo_run / "resources" / "demo" / sample / "outs" / "spatial" / "tissue_positions.csv")
    col = np.clip((positions["pxl_col_in_fullres"] / sx).astype(int), 0, mask.shape[1] - 1)
    row = np.clip((positions["pxl_row_in_fullres"] / sy).astype(int), 0, mask.shape[0] - 1)
    on_mask = mask[row, col]
    inside = positions["in_tissue"].to_numpy() == 1
    assert on_mask[inside].mean() > 0.9, "in-tissue spots should lie on the tissue mask"
    assert on_mask[~inside].mean() < 0.1, "spots off the tissue should lie off the mask"
    tiles = pd.read_parquet(results / "tiles.parquet")
    assert len(tiles) > 0 and (tiles["tissue_fraction"] >= 0.1).all()


@pytest.mark.parametrize("sample", list(SAMPLES))
def test_gene_sentences_align_with_spots_and_hide_heldout_genes(demo_run, sample):
    results = demo_run / "results"
    spots = ad.read_h5ad(results / sample / "spots.h5ad")
    panel = pd.read_csv(results / "genes" / "gene_panel.tsv", sep="\t")
    sentences = np.load(results / sample / "gene_sentences.npz")
    assert list(sentences["barcodes"]) == list(spots.obs_names)
    assert list(sentences["vocabulary"]) == list(panel.loc[~panel["heldout"], "gene"])
    assert panel["heldout"].sum() == round(0.2 * len(panel))
    lengths = (~sentences["pad"]).sum(axis=1)
    assert lengths.min() >= 1 and lengths.max() <= 128
    tokens = sentences["values"][~sentences["pad"]]
    assert np.isfinite(tokens).all() and (tokens > 0).all()
    # sorted by value, descending, padding (written as -1 here) at the end
    assert (np.diff(np.where(sentences["pad"], -1.0, sentences["values"]), axis=1) <= 0).all()


def test_gene_selection_sees_training_samples_only(demo_run):
    result = snakemake(demo_run, "-n", "--forcerun", "select_genes")
    text = result.stdout + result.stderr
    block = text[text.index("rule select_genes:") :]
    inputs = block.splitlines()[1]
    assert "results/tiny_a/spots.h5ad" in inputs and "tiny_b" not in inputs


def _summary(demo_run) -> pd.DataFrame:
    return pd.read_csv(demo_run / "results" / "evaluation" / "summary.tsv", sep="\t").set_index(["method", "gene_set"])


def test_every_method_predicts_every_test_spot(demo_run):
    spots = ad.read_h5ad(demo_run / "results" / "tiny_b" / "spots.h5ad")
    panel = pd.read_csv(demo_run / "results" / "genes" / "gene_panel.tsv", sep="\t")
    methods = (
        "mean",
        "ridge_comtip",
        "ridge_random",
        "retrieval_mean_comtip",
        "bleep",
        "mclstexp",
        "zeroshot",
        "ridge_comtip_no_mfm",
        "zeroshot_comtip_no_mfm",
        "finetune_linear",
    )
    for method in methods:
        pred = ad.read_h5ad(demo_run / "results" / "predictions" / "tiny_b" / f"{method}.h5ad")
        assert list(pred.obs_names) == list(spots.obs_names), method
        assert list(pred.var_names) == list(panel["gene"]), method
        np.testing.assert_allclose(pred.obsm["spatial"], spots.obsm["spatial"])
        assert np.isfinite(pred.X).all(), method
    metrics = pd.read_csv(demo_run / "results" / "evaluation" / "metrics.tsv", sep="\t")
    assert len(metrics) == len(methods) * len(panel)  # one test slide x the methods x panel genes
    assert set(metrics["sample"]) == {"tiny_b"} and set(metrics["method"]) == set(methods)
    # the ablation's methods (own pretraining, own checkpoint) have their rows too
    for method in ("ridge_comtip_no_mfm", "zeroshot_comtip_no_mfm"):
        assert (metrics["method"] == method).sum() == len(panel), method
        assert np.isfinite(metrics.loc[metrics["method"] == method, "mse"]).all(), method
    checkpoints = demo_run / "results" / "models" / "pretrain"
    assert {p.name for p in checkpoints.glob("*.pt")} >= {"comtip.pt", "comtip_no_mfm.pt"}


def test_bleep_is_trained_as_itself_with_pretrainings_budget_and_predicts_otherwise(demo_run):
    """Method bleep: its own model (train_bleep), trained for as many optimiser steps as CoMTIP's
    pretraining on the same training spots, its own embeddings of every sample (embed_bleep), and
    predictions unlike those of BLEEP's rule on CoMTIP's embeddings (retrieval_mean_comtip)."""
    import torch

    results = demo_run / "results"
    bleep = torch.load(results / "models" / "bleep" / "bleep.pt", weights_only=True)
    comtip = torch.load(results / "models" / "pretrain" / "comtip.pt", weights_only=True)
    encoder = yaml.safe_load((demo_run / "config" / "config.yaml").read_text())["bleep"]["image_encoder"]
    assert bleep["kind"] == "bleep" and bleep["bleep_config"]["image_encoder"] == encoder
    assert bleep["step"] == comtip["step"] and bleep["data"] == comtip["data"]  # same spots, same steps
    assert bleep["train_config"]["batch_size"] == comtip["train_config"]["batch_size"]
    assert bleep["image_size"] == comtip["model_config"]["image_size"]
    curve = pd.read_csv(results / "models" / "bleep" / "bleep.metrics.tsv", sep="\t")
    assert curve["step"].iloc[-1] == bleep["step"] and np.isfinite(curve["loss"]).all()
    assert curve["loss"].tail(10).mean() < curve["loss"].head(10).mean()
    sentences = np.load(results / "tiny_b" / "gene_sentences.npz")
    emb = np.load(results / "embeddings" / "bleep" / "tiny_b.npz")
    assert list(emb["barcodes"]) == list(sentences["barcodes"]) and emb["image_embeddings"].shape[1] == 256
    reference = np.load(results / "embeddings" / "bleep" / "training" / "reference.npz")
    assert list(reference["sample"]) == ["tiny_a"] * len(np.load(results / "tiny_a" / "gene_sentences.npz")["barcodes"])
    pred = ad.read_h5ad(results / "predictions" / "tiny_b" / "bleep.h5ad").X
    other = ad.read_h5ad(results / "predictions" / "tiny_b" / "retrieval_mean_comtip.h5ad").X
    assert np.abs(pred - other).max() > 1e-2
    metrics = pd.read_csv(results / "evaluation" / "metrics.tsv", sep="\t")
    rows = metrics[metrics["method"] == "bleep"]
    assert len(rows) == len(sentences["panel_genes"]) and np.isfinite(rows["mse"]).all()


def test_training_cost_lists_every_trained_model_with_its_budget(demo_run):
    """evaluation/training_cost.tsv: one row per model the tiny config's methods train, steps and
    spots from the checkpoints, time from the jobs' benchmark files; mclSTExp's max_steps override
    shows as a different budget."""
    import torch

    results = demo_run / "results"
    table = pd.read_csv(results / "evaluation" / "training_cost.tsv", sep="\t").set_index("model")
    assert list(table.index) == ["comtip", "comtip_no_mfm", "bleep", "mclstexp", "finetune_linear"]
    comtip = torch.load(results / "models" / "pretrain" / "comtip.pt", weights_only=True)
    assert table.loc["comtip", "steps"] == comtip["step"]
    assert table.loc["comtip", "training_spots"] == sum(comtip["data"]["spots"])
    assert (table["wall_s"] > 0).all() and (table["parameters"] > 0).all()
    assert table.loc["comtip_no_mfm", "same_budget_as_comtip"] == "yes"
    assert table.loc["bleep", "same_budget_as_comtip"] == "yes"
    assert table.loc["mclstexp", "same_budget_as_comtip"].startswith("no: ")
    assert f"steps 4 vs {comtip['step']}" in table.loc["mclstexp", "same_budget_as_comtip"]
    assert "zeroshot" in table.loc["comtip", "methods"].split(",")


def test_the_ridge_probe_is_fitted_once_per_encoder_and_is_hests_probe(demo_run):
    """Rule fit_ridge: one probe per encoder from the training samples (here tiny_a), the one the
    ridge_* predictions apply; equal to the in-memory HEST fit run to convergence."""
    from comtip.predict.baselines import fit_hest_ridge

    results = demo_run / "results"
    panel = pd.read_csv(results / "genes" / "gene_panel.tsv", sep="\t")
    sentences = np.load(results / "tiny_a" / "gene_sentences.npz")
    for encoder in ("comtip", "random"):
        probe = np.load(results / "models" / "ridge" / f"{encoder}.npz")
        assert list(probe["panel_genes"]) == list(panel["gene"]) and list(probe["samples"]) == ["tiny_a"]
        assert int(probe["n_train"]) == len(sentences["barcodes"]) and int(probe["pca_dim"]) == 256
        reference = fit_hest_ridge(
            np.load(results / "embeddings" / encoder / "tiny_a.npz")["features"],
            sentences["panel_values"],
            pca_dim=256,
            fit_intercept=True,
            lsqr_tol=1e-12,
        )
        pred = ad.read_h5ad(results / "predictions" / "tiny_b" / f"ridge_{encoder}.h5ad").X
        expected = reference.predict(np.load(results / "embeddings" / encoder / "tiny_b.npz")["features"])
        np.testing.assert_allclose(pred, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert not (results / "embeddings" / "random" / "training").exists()  # no stacked random reference any more


def test_finetuned_model_beats_the_mean_baseline(demo_run):
    summary = _summary(demo_run)
    mean_mse = summary.loc[("mean", "all"), "mse_mean"]
    assert summary.loc[("finetune_linear", "all"), "mse_mean"] < 0.85 * mean_mse
    assert summary.loc[("finetune_linear", "all"), "pearson_mean"] > 0.2
    assert summary.loc[("ridge_comtip", "all"), "pearson_mean"] > 0.2


def test_zero_shot_correlates_positively_with_truth(demo_run):
    """Zero-shot (no fine-tuning, one-gene prompts) on the test slide. Measured 0.127 on all 60
    panel genes; with cut sentences drawn from the spot's expressed genes only
    (pretrain.subsample_genes: expressed, the default before) it was 0.02-0.05, and the same
    architecture untrained (random init, 3 seeds) scores -0.02 to 0.05 (docs/model.md, "Which
    genes a cut sentence keeps")."""
    summary = _summary(demo_run)
    assert summary.loc[("zeroshot", "all"), "pearson_mean"] > 0.08


def test_pretrained_checkpoint_retrieves_training_pairs_far_above_chance(demo_run):
    """The pipeline's own retrieval table (issue 3, "done means"): on all training spots a
    spot's own sentence ranks far above the chance median. A random encoder sits at chance."""
    table = pd.read_csv(demo_run / "results" / "models" / "pretrain" / "comtip.retrieval.tsv", sep="\t")
    assert set(table["spots"]) == {"tiny_a"}  # one training sample: no "all" row
    row = table[table["k"] == 5].iloc[0]
    # measured: median rank 35 of 164 (chance 81.5), top-5 3.4x chance; the simulator's own
    # latent values reach 14 (benchmarks/bench_retrieval.py's oracle, test_bench_scripts.py)
    assert row["median_rank"] < 0.6 * row["chance_median_rank"], table
    assert row["fold_over_chance"] > 2, table


def test_pretraining_beats_a_random_encoder_of_the_same_architecture(demo_run):
    summary = _summary(demo_run)
    for gene_set in ("all", "top50_heg"):
        assert (
            summary.loc[("ridge_comtip", gene_set), "pearson_mean"]
            > summary.loc[("ridge_random", gene_set), "pearson_mean"] + 0.1
        )


def test_paired_table_compares_the_ridge_probe_with_every_other_method(demo_run):
    """results/evaluation/paired.tsv: ridge_comtip (auto) minus every other method, both Pearson
    kinds per gene set, consistent with summary.tsv; the pretrained-vs-random gap of the test
    above is positive with its interval (one test slide: genes resampled)."""
    paired = pd.read_csv(demo_run / "results" / "evaluation" / "paired.tsv", sep="\t")
    summary = _summary(demo_run)
    methods = {m for m, _ in summary.index} - {"ridge_comtip"}
    assert set(paired["reference"]) == {"ridge_comtip"} and set(paired["method"]) == methods
    assert set(paired["pearson"]) == {"per_slide", "pooled"}
    row = paired.set_index(["method", "gene_set", "pearson"]).loc[("ridge_random", "all", "per_slide")]
    assert row["reference_value"] == pytest.approx(summary.loc[("ridge_comtip", "all"), "pearson_mean"], abs=1e-6)
    assert row["method_value"] == pytest.approx(summary.loc[("ridge_random", "all"), "pearson_mean"], abs=1e-6)
    assert 0 < row["ci_low"] < row["difference"] < row["ci_high"]
    assert row["resampled"].startswith("genes")


def test_report_figures_and_html_report(demo_run):
    evaluation = demo_run / "results" / "evaluation"
    for name in ("summary_pearson.png", "training_curves.png", "maps/tiny_b.png"):
        with Image.open(evaluation / name) as im:
            assert im.size[0] > 200 and im.size[1] > 200
    snakemake(demo_run, "--report", "report.html")
    html = (demo_run / "report.html").read_text(errors="replace")
    assert "summary_pearson.png" in html and "thumbnail.png" in html


def test_batch_mixing_scores_the_expression_and_every_encoder_of_the_methods(demo_run):
    """One row per representation (the expression, then the encoders the test config's methods
    read, in registry order) x label (the slide; the sheet's patient, which varies; not its batch,
    "demo" everywhere), on the training and test slides' spots."""
    results = demo_run / "results"
    table = pd.read_csv(results / "evaluation" / "batch_mixing.tsv", sep="\t")
    representations = ["expression", "comtip", "random", "comtip_no_mfm", "bleep", "mclstexp"]
    assert list(table["representation"]) == [r for r in representations for _ in ("sample", "patient")]
    assert list(table["label"]) == ["sample", "patient"] * len(representations)
    n_spots = sum(min(500, len(np.load(results / s / "gene_sentences.npz")["barcodes"])) for s in ("tiny_a", "tiny_b"))
    assert (table["n_spots"] == n_spots).all() and (table["n_groups"] == 2).all()
    assert table["ilisi_median"].between(1, 2).all() and table["ilisi_permuted"].between(1, 2).all()
    assert table["silhouette"].between(-1, 1).all()
    expression = table[table["representation"] == "expression"]
    assert (expression["ilisi_norm_vs_expression"] == 0).all()
    np.testing.assert_allclose(
        table["ilisi_norm_vs_expression"],
        table["ilisi_norm"] - np.repeat(expression["ilisi_norm"].to_numpy()[None], len(representations), 0).ravel(),
        atol=1e-5,  # the table's 6 significant digits
    )
    with Image.open(results / "evaluation" / "batch_mixing.png") as im:
        assert im.size[0] > 200 and im.size[1] > 200


def test_virtual_visium_for_an_he_only_slide_covers_the_tissue(demo_run):
    results = demo_run / "results"
    virtual = ad.read_h5ad(results / "predictions" / PREDICT_SAMPLE / "virtual_visium.h5ad")
    panel = pd.read_csv(results / "genes" / "gene_panel.tsv", sep="\t")
    assert list(virtual.var_names) == list(panel["gene"])
    assert not (results / PREDICT_SAMPLE / "spots.h5ad").exists()
    mask, (sx, sy) = read_mask(results / PREDICT_SAMPLE / "tissue_mask.png")
    tiles = pd.read_parquet(results / PREDICT_SAMPLE / "tiles.parquet")
    np.testing.assert_allclose(virtual.obsm["spatial"], tiles[["x", "y"]].to_numpy() + tiles[["size"]].to_numpy() / 2)
    covered = np.zeros_like(mask)
    for x, y, size in tiles[["x", "y", "size"]].to_numpy():
        covered[int(y / sy) : int(np.ceil((y + size) / sy)), int(x / sx) : int(np.ceil((x + size) / sx))] = True
    # the tiles cover the tissue (all but the rim thinner than a tile) and little else
    assert (covered & mask).sum() > 0.8 * mask.sum()
    assert (covered & ~mask).sum() < 0.5 * (covered & mask).sum()
    assert np.isfinite(virtual.X).all() and np.asarray(virtual.X).std(axis=0).max() > 0


def test_every_sample_is_exported_as_spatialdata_in_slide_pixels(demo_run):
    """results/{sample}/spatialdata.zarr: the slide's levels (level 0 included: the tiny slides are
    under export.image_max_px), spot circles at obsm["spatial"] over the same pixels as the slide,
    the table with the counts and, on the test slide, every method's predictions."""
    spatialdata = pytest.importorskip("spatialdata")
    from spatialdata.transformations import get_transformation

    results = demo_run / "results"
    methods = list(yaml.safe_load((demo_run / "config" / "config.yaml").read_text())["evaluate"]["methods"])
    for sample, split in [*SAMPLES.items(), (PREDICT_SAMPLE, "predict")]:
        sdata = spatialdata.read_zarr(results / sample / "spatialdata.zarr")
        image = sdata.images["he"]["scale0"]["image"]
        matrix = get_transformation(image, "global").to_affine_matrix(("x", "y"), ("x", "y"))
        np.testing.assert_allclose(matrix, np.eye(3))  # level 0, in full-resolution px
        table = sdata.tables["table"]
        if split == "predict":
            virtual = ad.read_h5ad(results / "predictions" / sample / "virtual_visium.h5ad")
            assert len(sdata.shapes["tiles"]) == virtual.n_obs and list(table.layers) == ["finetune_linear"]
            np.testing.assert_allclose(table.X, virtual.X)
            continue
        spots = ad.read_h5ad(results / sample / "spots.h5ad")
        circles = sdata.shapes["spots"]
        assert list(circles.index) == list(spots.obs_names)
        np.testing.assert_allclose(np.column_stack([circles.geometry.x, circles.geometry.y]), spots.obsm["spatial"])
        uns = spots.uns["comtip"]
        np.testing.assert_allclose(circles["radius"], uns["spot_diameter_um"] / uns["mpp"] / 2)
        with open_slide(uns["slide_path"]) as slide:
            assert image.shape[1:] == slide.dimensions[::-1]
            for x, y in spots.obsm["spatial"][:: max(1, spots.n_obs // 10)]:
                direct = slide.read_region(int(x), int(y), 1, 1)[0, 0]
                np.testing.assert_array_equal(image.values[:, int(y), int(x)], direct)
        expected = {"log1p_cp10k", *methods} if split == "test" else {"log1p_cp10k"}
        assert set(table.layers) == expected, sample
        np.testing.assert_array_equal(table.X.toarray(), spots[:, list(table.var_names)].X.toarray())
        for method in expected - {"log1p_cp10k"}:
            pred = ad.read_h5ad(results / "predictions" / sample / f"{method}.h5ad")
            np.testing.assert_allclose(table.layers[method], pred.X, rtol=1e-6)
    metrics = pd.read_csv(results / "evaluation" / "metrics.tsv", sep="\t")
    learned = metrics[metrics["method"] != "mean"]
    assert np.isfinite(learned["morans_i_true"]).all() and learned["morans_i_true"].mean() > 0.1
    assert metrics.loc[metrics["method"] == "mean", "morans_i_pred"].isna().all()  # one value everywhere


def test_rerun_has_nothing_to_do(demo_run):
    result = snakemake(demo_run, "-n")
    assert "Nothing to be done" in result.stdout + result.stderr


def test_missing_input_fails_before_any_job_naming_sample_and_path(tmp_path):
    root = write_run_folder(tmp_path / "bad", ["real1\t../nowhere/outs\t../nowhere/slide.svs\ttrain\t\t\t\t"])
    result = snakemake(root, check=False)
    assert result.returncode != 0
    text = result.stdout + result.stderr
    assert "sample 'real1'" in text and str(root / "nowhere" / "outs") in text
    assert not (root / "results").exists()


def test_bad_config_value_fails_naming_the_key(tmp_path):
    root = write_run_folder(tmp_path / "badcfg", [])
    cfg = yaml.safe_load((root / "config" / "config.yaml").read_text())
    cfg["patches"] = {"size_px": 0}
    (root / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    result = snakemake(root, check=False)
    assert result.returncode != 0
    assert "config key 'patches.size_px'" in result.stdout + result.stderr

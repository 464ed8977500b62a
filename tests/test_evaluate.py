"""Per-gene metrics against hand-computed values and scipy, NaN for undefined correlations, the long
table, gene sets from training statistics, and the summaries."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import pearsonr, spearmanr

from comtip.evaluation.metrics import evaluate_predictions, gene_metrics, gene_sets_from_panel, summarise


def test_gene_metrics_hand_computed():
    truth = np.array([[1.0, 0.0], [2.0, 1.0], [3.0, 0.0]])
    pred = np.array([[2.0, 5.0], [4.0, 5.0], [6.0, 5.0]])  # gene A: 2 × truth; gene B: constant
    table = gene_metrics(truth, pred, ["A", "B"]).set_index("gene")
    assert table.loc["A", "pearson"] == pytest.approx(1.0)
    assert table.loc["A", "spearman"] == pytest.approx(1.0)
    assert table.loc["A", "mse"] == pytest.approx((1 + 4 + 9) / 3)  # errors 1, 2, 3
    assert table.loc["A", "mae"] == pytest.approx(2.0)
    assert math.isnan(table.loc["B", "pearson"]) and math.isnan(table.loc["B", "spearman"])
    assert table.loc["B", "mse"] == pytest.approx((25 + 16 + 25) / 3)
    assert table.loc["B", "mae"] == pytest.approx((5 + 4 + 5) / 3)
    assert (table["n_spots"] == 3).all()


def test_gene_metrics_constant_truth_is_nan_not_zero():
    truth = np.array([[0.0], [0.0], [0.0]])
    table = gene_metrics(truth, np.array([[0.1], [0.5], [0.2]]), ["Z"])
    assert table["pearson"].isna().all() and table["spearman"].isna().all()


def test_gene_metrics_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, size=(30, 5)).astype(float)  # many ties
    pred = truth + rng.normal(0, 1.5, size=truth.shape)
    table = gene_metrics(truth, pred, list("abcde"))
    for g in range(5):
        assert table["pearson"][g] == pytest.approx(pearsonr(truth[:, g], pred[:, g])[0], abs=1e-12)
        assert table["spearman"][g] == pytest.approx(spearmanr(truth[:, g], pred[:, g])[0], abs=1e-12)
        assert table["mse"][g] == pytest.approx(np.mean((truth[:, g] - pred[:, g]) ** 2))


def test_gene_metrics_rejects_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        gene_metrics(np.zeros((3, 2)), np.zeros((3, 3)), ["a", "b"])
    with pytest.raises(ValueError, match="gene names"):
        gene_metrics(np.zeros((3, 2)), np.zeros((3, 2)), ["a"])
    with pytest.raises(ValueError, match="finite"):
        gene_metrics(np.zeros((3, 1)), np.array([[0.0], [np.nan], [1.0]]), ["a"])


def _toy_metrics() -> tuple[pd.DataFrame, dict, dict]:
    truth = {
        "s1": np.array([[1.0, 0.0, 2.0], [2.0, 1.0, 2.0], [3.0, 0.0, 2.0], [4.0, 1.0, 2.0]]),
        "s2": np.array([[1.0, 3.0, 0.0], [0.0, 1.0, 1.0], [2.0, 2.0, 0.0], [1.0, 0.0, 2.0]]),
    }
    rng = np.random.default_rng(1)
    preds = {(s, m): t + rng.normal(0, 0.7, t.shape) for s, t in truth.items() for m in ("ridge", "bleep")}
    preds[("s1", "mean")] = np.tile(truth["s1"].mean(axis=0), (4, 1))
    preds[("s2", "mean")] = np.tile(truth["s2"].mean(axis=0), (4, 1))
    return evaluate_predictions(truth, preds, ["A", "B", "C"]), truth, preds


def test_evaluate_predictions_long_table():
    metrics, truth, preds = _toy_metrics()
    assert len(metrics) == 2 * 3 * 3  # samples × methods × genes
    assert list(metrics.columns[:3]) == ["sample", "method", "gene"]
    row = metrics[(metrics["sample"] == "s2") & (metrics["method"] == "ridge") & (metrics["gene"] == "B")].iloc[0]
    assert row["pearson"] == pytest.approx(pearsonr(truth["s2"][:, 1], preds[("s2", "ridge")][:, 1])[0])
    with pytest.raises(KeyError, match="without truth"):
        evaluate_predictions(truth, {("s3", "ridge"): truth["s1"]}, ["A", "B", "C"])
    with pytest.raises(ValueError, match="sample 's1', method 'x'"):
        evaluate_predictions(truth, {("s1", "x"): truth["s1"][:, :2]}, ["A", "B", "C"])


def test_summarise_hand_computed():
    metrics = pd.DataFrame(
        {
            "sample": ["s1", "s1", "s1", "s2", "s2", "s2"],
            "method": ["m"] * 6,
            "gene": ["A", "B", "C"] * 2,
            "pearson": [0.2, 0.4, np.nan, 0.6, np.nan, np.nan],
            "spearman": [0.1, 0.3, np.nan, 0.5, np.nan, np.nan],
            "mse": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            "mae": [0.5, 0.5, 0.5, 1.0, 1.0, 1.0],
        }
    )
    out = summarise(metrics, {"all": ["A", "B", "C"], "AB": ["A", "B"]}).set_index("gene_set")
    full = out.loc["all"]
    # per slide: s1 mean(0.2, 0.4) = 0.3, s2 mean(0.6) = 0.6 → over slides 0.45
    assert full["pearson_mean"] == pytest.approx(0.45)
    assert full["pearson_std_slides"] == pytest.approx(0.15)
    assert full["pearson_median"] == pytest.approx(0.45)
    assert full["spearman_mean"] == pytest.approx((0.2 + 0.5) / 2)
    assert full["mse_mean"] == pytest.approx((2.0 + 5.0) / 2)
    assert full["mae_mean"] == pytest.approx(0.75)
    assert (full["n_pearson_used"], full["n_pearson_nan"], full["n_genes"], full["n_slides"]) == (3, 3, 3, 2)
    ab = out.loc["AB"]
    assert ab["mse_mean"] == pytest.approx((1.5 + 4.5) / 2)
    assert (ab["n_pearson_used"], ab["n_pearson_nan"]) == (3, 1)
    with pytest.raises(KeyError, match="not in the metrics"):
        summarise(metrics, {"typo": ["A", "Q"]})


def test_summarise_all_nan_method_reports_nan_pearson():
    metrics, _, _ = _toy_metrics()
    out = summarise(metrics, {"all": ["A", "B", "C"]}).set_index("method")
    assert math.isnan(out.loc["mean", "pearson_mean"])  # a constant prediction has no correlation
    assert out.loc["mean", "n_pearson_used"] == 0 and out.loc["mean", "n_pearson_nan"] == 6
    assert np.isfinite(out.loc["mean", "mse_mean"])
    assert set(out.index) == {"bleep", "mean", "ridge"}


def test_gene_sets_from_panel_use_training_ranks():
    panel = pd.DataFrame(
        {
            "gene": ["G1", "G2", "G3", "G4"],
            "rank": [1, 2, 3, 4],
            "mean": [0.1, 5.0, 2.0, 1.0],
            "mean_rank": [40, 1, 2, 3],
            "dispersion_rank": [1, 30, 20, 2],
            "heldout": [False, True, False, False],
        }
    )
    sets = gene_sets_from_panel(panel, n_top=2)
    assert sets == {
        "all": ["G1", "G2", "G3", "G4"],
        "top2_heg": ["G2", "G3"],
        "top2_hvg": ["G1", "G4"],
        "heldout": ["G2"],
    }
    assert "heldout" not in gene_sets_from_panel(panel.assign(heldout=False), n_top=2)
    assert gene_sets_from_panel(panel, n_top=50)["top50_heg"] == ["G2", "G3", "G4", "G1"]


def test_run_evaluation_writes_the_pooled_pearson_and_the_paired_table(tmp_path):
    import anndata as ad

    from comtip.evaluation.run import run_evaluation

    rng = np.random.default_rng(0)
    genes = [f"g{i}" for i in range(6)]
    panel = pd.DataFrame({"gene": genes, "mean_rank": range(6), "dispersion_rank": range(6), "heldout": False})
    panel.to_csv(tmp_path / "panel.tsv", sep="\t", index=False)
    truth, preds = {}, {}
    for sample, offset in (("s1", 0.0), ("s2", 2.0)):
        values = rng.normal(size=(40, 6)) + offset
        np.savez(tmp_path / f"{sample}.npz", panel_genes=np.array(genes), panel_values=values)
        truth[sample] = tmp_path / f"{sample}.npz"
        for method, noise in (("ridge_comtip", 0.3), ("ridge_random", 3.0)):
            pred = ad.AnnData(values + noise * rng.normal(size=values.shape))
            pred.var_names = genes
            preds[(sample, method)] = tmp_path / f"{sample}.{method}.h5ad"
            pred.write_h5ad(preds[(sample, method)])
    out = [tmp_path / name for name in ("metrics.tsv", "summary.tsv", "paired.tsv")]
    summary = run_evaluation(truth, preds, tmp_path / "panel.tsv", *out, reference="ridge_comtip", n_boot=200)
    row = summary.set_index(["method", "gene_set"]).loc[("ridge_comtip", "all")]
    # pooled over slides whose means differ by 2: higher than within each slide
    assert row["pearson_pooled_mean"] > row["pearson_mean"] > 0.8
    paired = pd.read_csv(out[2], sep="\t")
    assert set(paired["method"]) == {"ridge_random"} and set(paired["pearson"]) == {"per_slide", "pooled"}
    assert (paired["ci_low"] > 0).all()
    run_evaluation(truth, preds, tmp_path / "panel.tsv", *out, reference=None)
    assert pd.read_csv(out[2], sep="\t").empty  # header only: no CoMTIP method among the evaluated

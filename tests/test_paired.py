"""Paired differences CoMTIP − X with bootstrap intervals (comtip.evaluation.paired)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from comtip._core.errors import ConfigError
from comtip.evaluation.paired import (
    paired_differences,
    paired_reference,
    pooled_pearson,
    sufficient_stats,
)


def test_pooled_pearson_from_summed_slide_statistics_equals_pearson_of_the_concatenated_spots():
    rng = np.random.default_rng(0)
    slides = [(rng.normal(size=(n, 4)) + 3, rng.normal(size=(n, 4)) + 3) for n in (5, 11, 8)]
    stats = np.sum([sufficient_stats(t, p) for t, p in slides], axis=0)
    t = np.concatenate([t for t, _ in slides])
    p = np.concatenate([p for _, p in slides])
    expected = [np.corrcoef(t[:, g], p[:, g])[0, 1] for g in range(4)]
    assert pooled_pearson(stats) == pytest.approx(expected, abs=1e-12)


def test_pooled_pearson_is_nan_for_a_constant_prediction():
    t = np.arange(10.0)[:, None]
    assert np.isnan(pooled_pearson(sufficient_stats(t, np.full_like(t, 2.5))))[0]


def test_reference_auto_picks_the_ridge_probe_and_a_missing_one_is_a_config_error():
    assert paired_reference("auto", ["mean", "zeroshot", "ridge_comtip"]) == "ridge_comtip"
    assert paired_reference("auto", ["mean", "zeroshot"]) == "zeroshot"
    assert paired_reference("auto", ["mean", "ridge_random"]) is None
    assert paired_reference(None, ["ridge_comtip"]) is None
    with pytest.raises(ConfigError, match="finetune_full.*not in evaluate.methods"):
        paired_reference("finetune_full", ["mean", "ridge_comtip"])


def _two_methods(n_slides: int, gap: float, seed: int = 0):
    """Per-slide Pearson of a reference better than the other by ``gap`` on average, and the
    sufficient statistics of predictions that make the pooled Pearson differ the same way."""
    rng = np.random.default_rng(seed)
    genes = [f"g{i}" for i in range(30)]
    stats = {"ref": [], "other": []}
    for _ in range(n_slides):
        truth = rng.normal(size=(60, len(genes)))
        noise = rng.normal(size=truth.shape)
        stats["ref"].append(sufficient_stats(truth, truth + (1.0 - gap) * noise))
        stats["other"].append(sufficient_stats(truth, truth + noise))
    stats = {m: np.stack(v) for m, v in stats.items()}
    per_slide = {m: np.stack([pooled_pearson(s) for s in v]) for m, v in stats.items()}
    return per_slide, stats, genes


def test_a_clearly_better_reference_has_an_interval_above_zero_and_an_equal_one_contains_it():
    per_slide, stats, genes = _two_methods(5, gap=0.6)
    table = paired_differences(per_slide, stats, genes, {"all": genes}, "ref", n_boot=300, seed=1)
    assert set(table["pearson"]) == {"per_slide", "pooled"} and (table["method"] == "other").all()
    for row in table.itertuples():
        assert row.difference == pytest.approx(row.reference_value - row.method_value, abs=1e-9)
        assert 0 < row.ci_low <= row.difference <= row.ci_high
        assert row.p_not_better == 0.0 and row.resampled == "slides+genes"
    same, same_stats, _ = _two_methods(5, gap=0.0)
    same_stats["ref"] = same_stats["other"].copy()
    same["ref"] = same["other"].copy()
    same["ref"][:, ::2] += 0.05  # better on half the genes, worse on the others
    same["ref"][:, 1::2] -= 0.05
    table = paired_differences(same, same_stats, genes, {"all": genes}, "ref", n_boot=300, seed=1)
    row = table[table.pearson == "per_slide"].iloc[0]
    assert row.ci_low < 0 < row.ci_high


def test_the_interval_is_seeded_and_one_test_slide_resamples_genes_only():
    per_slide, stats, genes = _two_methods(1, gap=0.3)
    sets = {"all": genes, "few": genes[:5]}
    first = paired_differences(per_slide, stats, genes, sets, "ref", n_boot=200, seed=4)
    again = paired_differences(per_slide, stats, genes, sets, "ref", n_boot=200, seed=4)
    pd.testing.assert_frame_equal(first, again)
    assert (first["resampled"] == "genes (one test slide)").all()
    assert first.set_index(["gene_set", "pearson"]).loc[("few", "per_slide"), "n_genes"] == 5
    # with one slide the two Pearsons are the same numbers
    kinds = first.set_index(["gene_set", "pearson"])["difference"]
    assert kinds.loc[("all", "per_slide")] == pytest.approx(kinds.loc[("all", "pooled")], abs=1e-9)


def test_fold_pooled_differences_weigh_folds_equally_and_resample_folds_and_genes():
    """Two folds; fold A ran two seeds, fold B one; each run its own genes. The point estimate is
    the mean over folds of the mean over the fold's runs of the mean gene difference, by hand."""
    from comtip.evaluation.paired import fold_paired_differences

    def run(fold, genes, ref, other, heldout):
        pearson = {"comtip": pd.Series(ref, index=genes), "x": pd.Series(other, index=genes)}
        return fold, pearson, {"all": genes, "heldout": heldout}

    runs = [
        run("A", ["g1", "g2"], [0.5, 0.3], [0.1, 0.1], ["g1"]),  # differences 0.4, 0.2 -> 0.3
        run("A", ["g1", "g2"], [0.2, 0.2], [0.1, 0.1], ["g2"]),  # 0.1, 0.1 -> 0.1; fold A: 0.2
        run("B", ["g3", "g4", "g5"], [0.0, 0.1, np.nan], [0.1, 0.2, 0.3], ["g3"]),  # -0.1, -0.1, nan -> -0.1
    ]
    table = fold_paired_differences(runs, "comtip", n_boot=500, seed=1).set_index("gene_set")
    assert list(table["method"]) == ["x", "x"]
    row = table.loc["all"]
    assert row["difference"] == pytest.approx((0.2 + -0.1) / 2)
    assert row["reference_value"] == pytest.approx(((0.4 + 0.2) / 2 + 0.05) / 2)
    assert row["method_value"] == pytest.approx((0.1 + 0.2) / 2)  # g5 counts here: only the reference lacks it
    assert (row["n_folds"], row["n_runs"], row["folds_better"]) == (2, 3, 1)
    # fold draws AA / AB / BA / BB: the interval spans B's -0.1 to A's genes' best (0.3)
    assert -0.1 - 1e-9 <= row["ci_low"] < row["difference"] < row["ci_high"] <= 0.3 + 1e-9
    assert 0.2 < row["p_not_better"] < 0.8
    held = table.loc["heldout"]  # A: (0.4 + 0.1) / 2 = 0.25; B: -0.1
    assert held["difference"] == pytest.approx((0.25 - 0.1) / 2)
    one_sided = fold_paired_differences(runs[:2], "comtip", n_boot=200).set_index("gene_set").loc["all"]
    assert one_sided["p_not_better"] == 0 and one_sided["ci_low"] > 0

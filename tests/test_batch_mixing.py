"""Batch-mixing scores (comtip.evaluation.batch_mixing) on hand-checkable cases, and the rule's
table and figure (comtip.evaluation.batch_mixing_run) on small synthetic files."""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from comtip._core.errors import PipelineInputError
from comtip.evaluation import batch_mixing as bm
from comtip.evaluation.batch_mixing_run import mixing_run


def _slides(n_slides: int = 3, per: int = 150, dim: int = 8, shift: float = 0.0, seed: int = 0):
    """Spots of ``n_slides`` slides from one Gaussian, each slide moved by ``shift`` along its own axis."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_slides * per, dim))
    labels = np.repeat([f"s{i}" for i in range(n_slides)], per)
    if shift:
        x[:, :n_slides] += shift * np.repeat(np.eye(dim)[:n_slides, :n_slides], per, axis=0)
    return x, labels


def test_perfectly_mixed_slides_score_one_and_fully_separated_slides_score_zero():
    mixed = bm.mixing_scores(*_slides(), perplexity=15)
    apart = bm.mixing_scores(*_slides(shift=100.0), perplexity=15)
    assert mixed["ilisi_norm"] == pytest.approx(1.0, abs=0.1)
    assert 2.2 < mixed["ilisi_median"] < 3.0 and 2.2 < mixed["ilisi_permuted"] < 3.0  # 3 slides at most
    assert apart["ilisi_median"] == pytest.approx(1.0) and apart["ilisi_norm"] == pytest.approx(0.0, abs=1e-6)
    assert apart["ilisi_permuted"] == pytest.approx(mixed["ilisi_permuted"], abs=0.2)  # labels shuffled: mixed
    assert mixed["kbet_acceptance"] > 0.8 and apart["kbet_acceptance"] == 0.0
    assert abs(mixed["silhouette"]) < 0.05 and apart["silhouette"] > 0.9
    assert mixed["n_spots"] == 450 and mixed["n_groups"] == 3


def test_ilisi_norm_does_not_saturate_when_slides_outnumber_the_perplexity():
    """40 slides, perplexity 10: a perfectly mixed embedding's iLISI stays far below 40 (scib's
    (iLISI − 1) / (L − 1) would read about 0.2), the permuted normalisation reads about 1."""
    scores = bm.mixing_scores(*_slides(n_slides=40, per=30, dim=4), perplexity=10)
    assert scores["ilisi_median"] < 12
    assert (scores["ilisi_median"] - 1) / 39 < 0.3
    assert scores["ilisi_norm"] == pytest.approx(1.0, abs=0.15)
    assert math.isnan(scores["kbet_acceptance"])  # 30 neighbours x 1/40 < 5: the test is invalid


def test_the_scores_are_seeded():
    x, labels = _slides(n_slides=2, per=300)
    a = bm.mixing_scores(x, labels, seed=3, silhouette_spots=100)
    assert a == bm.mixing_scores(x, labels, seed=3, silhouette_spots=100)


@pytest.mark.parametrize("perplexity", [2.5, 10, 30])
def test_perplexity_bisection_hits_the_target_entropy(perplexity):
    rng = np.random.default_rng(1)
    distances = np.sort(rng.gamma(2.0, 1.0, size=(50, 90)), axis=1)
    w = bm.perplexity_weights(distances, perplexity)
    np.testing.assert_allclose(w.sum(axis=1), 1.0)
    entropy = -(w * np.log(np.where(w > 0, w, 1))).sum(axis=1)
    np.testing.assert_allclose(entropy, math.log(perplexity), atol=1e-4)
    assert (np.diff(w, axis=1) <= 1e-12).all()  # nearer neighbours weigh more


def test_uniform_kernel_and_a_perplexity_above_the_neighbours_give_equal_weights():
    distances = np.array([[1.0, 2.0, 3.0, 4.0]])
    np.testing.assert_allclose(bm.perplexity_weights(distances, 2, kernel="uniform"), [[0.5, 0.5, 0, 0]])
    np.testing.assert_allclose(bm.perplexity_weights(distances, 4), [[0.25] * 4])
    with pytest.raises(ValueError, match="kernel"):
        bm.perplexity_weights(distances, 2, kernel="cosine")


def test_inverse_simpson_by_hand():
    weights = np.array([[0.5, 0.5, 0, 0], [0.25] * 4, [0.25] * 4])
    labels = np.array([[0, 1, 0, 0], [0, 0, 1, 2], [1, 1, 1, 1]])
    # 1 / (0.5² + 0.5²) = 2; 1 / (0.5² + 0.25² + 0.25²) = 8/3; one label = 1
    np.testing.assert_allclose(bm.inverse_simpson(weights, labels), [2.0, 8 / 3, 1.0])


def test_kbet_accepts_the_global_mix_rejects_one_label_and_is_nan_when_the_test_is_invalid():
    even = np.array([[0] * 5 + [1] * 5])
    one = np.array([[0] * 10])
    assert bm.kbet_acceptance(even, np.array([0.5, 0.5])) == 1.0
    # χ² = 2 × (10 − 5)² / 5 = 10 > 3.84 (df 1, α 0.05)
    assert bm.kbet_acceptance(one, np.array([0.5, 0.5])) == 0.0
    assert bm.kbet_acceptance(np.vstack([even, one]), np.array([0.5, 0.5])) == 0.5
    # expected count 10 × 0.4 = 4 < 5: invalid, NaN rather than a number
    assert math.isnan(bm.kbet_acceptance(even, np.array([0.6, 0.4])))
    assert math.isnan(bm.kbet_acceptance(one, np.array([1.0])))  # one label: nothing to test


def test_chi2_tail_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 5, 30, 199):
        for x in (0.1, 1.0, 7.0, 40.0, 250.0):
            assert bm.chi2_sf(x, df) == pytest.approx(stats.chi2.sf(x, df), rel=1e-8, abs=1e-14)
        assert bm.chi2_critical(0.05, df) == pytest.approx(stats.chi2.ppf(0.95, df), rel=1e-9)


def test_silhouette_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(2)
    x = rng.normal(size=(61, 5))
    labels = np.array(["a"] * 30 + ["b"] * 20 + ["c"] * 10 + ["alone"])  # a cluster of one scores 0
    x[:30] += 1.5
    assert bm.silhouette(x, labels, block=7) == pytest.approx(metrics.silhouette_score(x, labels), rel=1e-10)
    assert math.isnan(bm.silhouette(x, np.zeros(61)))


def test_knn_in_blocks_is_exact_and_excludes_self():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 3))
    dist, idx = bm.knn(x, 5, block=6)
    full = np.linalg.norm(x[:, None] - x[None], axis=2)
    np.fill_diagonal(full, np.inf)
    np.testing.assert_array_equal(idx, np.argsort(full, axis=1)[:, :5])
    np.testing.assert_allclose(dist, np.sort(full, axis=1)[:, :5])
    assert not (idx == np.arange(40)[:, None]).any()
    with pytest.raises(ValueError):
        bm.knn(x, 40)


@pytest.mark.parametrize("shape", [(30, 8), (6, 20)])
def test_pca_is_the_centred_svd_capped_by_rank(shape):
    rng = np.random.default_rng(4)
    x = rng.normal(size=shape)
    scores = bm.pca(x, 50)
    rank = min(shape[0] - 1, shape[1])
    assert scores.shape == (shape[0], rank)
    u, s, _ = np.linalg.svd(x - x.mean(axis=0), full_matrices=False)
    np.testing.assert_allclose(np.abs(scores), np.abs(u[:, :rank] * s[:rank]), atol=1e-8)
    assert bm.pca(x, 2).shape == (shape[0], 2)


def _sheet(**columns) -> pd.DataFrame:
    sheet = pd.DataFrame({"sample": ["a", "b", "c"], **columns})
    return sheet.set_index("sample", drop=False)


def test_labels_are_the_slide_and_the_sheet_columns_that_vary():
    sheet = _sheet(batch=["x", "x", "x"], patient=["p1", "p1", "p2"])
    assert bm.sample_labels(sheet, ["a", "b", "c"]) == {
        "sample": {"a": "a", "b": "b", "c": "c"},
        "patient": {"a": "p1", "b": "p1", "c": "p2"},
    }
    assert list(bm.sample_labels(sheet, ["a", "b"])) == ["sample"]  # one patient among these
    assert list(bm.sample_labels(_sheet(), ["a", "c"])) == ["sample"]  # no optional column
    assert list(bm.sample_labels(_sheet(batch=[np.nan] * 3), ["a", "c"])) == ["sample"]  # all blank


def test_a_partially_blank_label_column_names_the_column_and_the_samples():
    sheet = _sheet(batch=["x", np.nan, ""], patient=["p1", "p2", "p3"])
    with pytest.raises(PipelineInputError, match=r"column 'batch' is blank for b, c") as err:
        bm.sample_labels(sheet, ["a", "b", "c"], sheet_path="config/samples.tsv")
    assert "samples.tsv" in str(err.value)
    assert list(bm.sample_labels(sheet, ["a"])) == ["sample"]  # the blanks are not among these


def test_subsampling_is_seeded_per_sample():
    rows = bm.subsample_rows({"a": 1000, "b": 300, "c": 800}, seed=0, limit=500)
    assert len(rows["a"]) == 500 and (np.diff(rows["a"]) > 0).all() and rows["a"].max() < 1000
    np.testing.assert_array_equal(rows["b"], np.arange(300))  # fewer than the limit: every spot
    more = bm.subsample_rows({"a": 1000, "b": 300, "c": 800, "d": 900}, seed=0, limit=500)
    for s in "abc":
        np.testing.assert_array_equal(more[s], rows[s])  # adding a sample changes no other's spots
    assert not np.array_equal(bm.subsample_rows({"a": 1000}, seed=1, limit=500)["a"], rows["a"])
    assert not np.array_equal(rows["a"], rows["c"][: len(rows["a"])])


def _write_inputs(tmp_path, n_spots=(400, 250, 500)):
    """Three slides: expression from one distribution; encoder ``mixed`` likewise, encoder
    ``apart`` with each slide far from the others."""
    rng = np.random.default_rng(5)
    sentences, embeddings = {}, {"mixed": {}, "apart": {}}
    for i, n in enumerate(n_spots):
        sample = f"s{i}"
        barcodes = np.array([f"{sample}-{j}" for j in range(n)])
        sentences[sample] = tmp_path / f"{sample}_sentences.npz"
        np.savez(sentences[sample], barcodes=barcodes, panel_values=np.log1p(rng.poisson(3, size=(n, 12))))
        for name, shift in (("mixed", 0.0), ("apart", 50.0)):
            emb = rng.normal(size=(n, 6)).astype(np.float32)
            emb[:, i] += shift
            embeddings[name][sample] = tmp_path / f"{name}_{sample}.npz"
            np.savez(embeddings[name][sample], barcodes=barcodes, image_embeddings=emb, features=emb)
    return sentences, embeddings


def test_mixing_run_writes_the_table_and_figure_and_warns_for_an_encoder_that_separates_slides(tmp_path, caplog):
    sentences, embeddings = _write_inputs(tmp_path)
    labels = {"sample": {s: s for s in sentences}, "patient": {"s0": "p1", "s1": "p1", "s2": "p2"}}
    out_tsv, out_png = tmp_path / "out" / "batch_mixing.tsv", tmp_path / "out" / "batch_mixing.png"
    with caplog.at_level(logging.WARNING, logger="comtip"):
        mixing_run(sentences, embeddings, labels, out_tsv, out_png, spots_per_slide=300, pca_dim=5)
    table = pd.read_csv(out_tsv, sep="\t")
    assert list(table.columns) == list(bm.COLUMNS)
    assert list(table["representation"]) == ["expression"] * 2 + ["mixed"] * 2 + ["apart"] * 2
    assert list(table["label"]) == ["sample", "patient"] * 3
    assert (table["n_spots"] == 300 + 250 + 300).all()  # at most 300 per slide
    assert list(table["n_groups"]) == [3, 2] * 3
    by = table.set_index(["representation", "label"])
    assert by.loc[("expression", "sample"), "ilisi_norm"] == pytest.approx(1.0, abs=0.1)
    assert by.loc[("apart", "sample"), "ilisi_norm"] == pytest.approx(0.0, abs=0.01)
    assert by.loc[("apart", "sample"), "ilisi_norm_vs_expression"] < -0.8
    assert abs(by.loc[("mixed", "sample"), "ilisi_norm_vs_expression"]) < 0.2
    assert by.loc[("expression", "sample"), "ilisi_norm_vs_expression"] == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("encoder apart separates slides (label sample)" in w for w in warnings), warnings
    assert not any("encoder mixed" in w or "encoder expression" in w for w in warnings), warnings
    with Image.open(out_png) as im:
        assert im.size[0] > 200 and im.size[1] > 200
    assert sorted(p.name for p in out_tsv.parent.iterdir()) == ["batch_mixing.png", "batch_mixing.tsv"]  # no temp left


def test_mixing_run_refuses_embeddings_whose_rows_are_not_the_samples_spots(tmp_path):
    sentences, embeddings = _write_inputs(tmp_path)
    with np.load(embeddings["mixed"]["s1"]) as npz:
        arrays = dict(npz)
    np.savez(embeddings["mixed"]["s1"], **{**arrays, "barcodes": arrays["barcodes"][::-1]})
    with pytest.raises(PipelineInputError, match=r"\[sample s1\].*not the sample's spots"):
        mixing_run(sentences, embeddings, {"sample": {s: s for s in sentences}}, tmp_path / "t.tsv", tmp_path / "f.png")
    assert not (tmp_path / "t.tsv").exists()

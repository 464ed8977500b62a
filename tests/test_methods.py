"""The comparison methods as the predict_baseline rule runs them (``predict_with_method``): each
method reads the right arrays and options and equals a direct call of its baseline function."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml

from comtip._core.errors import ConfigError, PipelineInputError
from comtip.predict.baselines import bleep_retrieval, mclstexp_retrieval, spatial_neighbour_mean
from comtip.predict.methods import PredictionContext, predict_with_method
from comtip.predict.registry import BASELINE_METHODS
from conftest import CONFIG_SCHEMA, REPO

GENES = [f"G{i}" for i in range(6)]
D = 8  # embedding width


def _barcodes(sample: str, n: int) -> np.ndarray:
    return np.array([f"{sample}_{i:03d}" for i in range(n)])


def _write_sample(root, sample: str, n: int, rng: np.random.Generator, grid_cols: int = 5) -> dict:
    """gene_sentences.npz (panel values only), embeddings npz and spots.h5ad of one sample; the
    spots lie on a square grid of pitch 200 px, like legacy ST."""
    barcodes = _barcodes(sample, n)
    values = rng.gamma(1.0, 1.0, (n, len(GENES))).astype(np.float32)
    emb = {
        key: rng.normal(size=(n, D)).astype(np.float32)
        for key in ("features", "image_embeddings", "sentence_embeddings")
    }
    paths = {
        "sentences": root / f"{sample}_sentences.npz",
        "embeddings": root / f"{sample}_emb.npz",
        "spots": root / f"{sample}_spots.h5ad",
    }
    np.savez(paths["sentences"], barcodes=barcodes, panel_genes=np.array(GENES), panel_values=values)
    np.savez(paths["embeddings"], barcodes=barcodes, **emb)
    spots = ad.AnnData(X=np.zeros((n, 1), np.float32), obs=pd.DataFrame(index=barcodes))
    idx = np.arange(n)
    spots.obsm["spatial"] = np.stack([1000 + 200.0 * (idx % grid_cols), 500 + 200.0 * (idx // grid_cols)], axis=1)
    spots.write_h5ad(paths["spots"])
    return {**paths, "values": values, **emb, "xy": spots.obsm["spatial"]}


@pytest.fixture
def cohort(tmp_path):
    rng = np.random.default_rng(3)
    train = [_write_sample(tmp_path, s, n, rng) for s, n in (("a", 23), ("b", 17))]
    test = _write_sample(tmp_path, "t", 20, rng)
    return tmp_path, train, test


def _predict(method, cohort, **options):
    root, train, test = cohort
    ctx = PredictionContext(
        spots_h5ad=test["spots"],
        test_sentences=test["sentences"],
        train_value_files=[t["sentences"] for t in train],
        train_embedding_files=[t["embeddings"] for t in train],
        test_embedding=test["embeddings"],
        settings=options,
    )
    return predict_with_method(method, ctx, root / f"{method}.h5ad")


def _reference(train, key):
    return np.concatenate([t[key] for t in train])


def test_retrieval_weighted_is_mclstexp_retrieval_of_sentences_queried_with_images(cohort):
    root, train, test = cohort
    pred = _predict("retrieval_weighted_comtip", cohort, retrieval_weighted_k=7, retrieval_mean_k=3)
    values = _reference(train, "values")
    expected = mclstexp_retrieval(_reference(train, "sentence_embeddings"), values, test["image_embeddings"], k=7)
    np.testing.assert_allclose(pred, expected, rtol=1e-12)
    # what a mis-wiring would give instead: another k, BLEEP's plain mean, the wrong side as reference or query
    for wrong in (
        mclstexp_retrieval(_reference(train, "sentence_embeddings"), values, test["image_embeddings"], k=3),
        bleep_retrieval(_reference(train, "sentence_embeddings"), values, test["image_embeddings"], k=7),
        mclstexp_retrieval(_reference(train, "image_embeddings"), values, test["image_embeddings"], k=7),
        mclstexp_retrieval(_reference(train, "sentence_embeddings"), values, test["sentence_embeddings"], k=7),
    ):
        assert np.abs(pred - wrong).max() > 1e-3
    written = ad.read_h5ad(root / "retrieval_weighted_comtip.h5ad")
    np.testing.assert_allclose(written.X, pred.astype(np.float32))
    assert list(written.obs_names) == list(_barcodes("t", 20)) and list(written.var_names) == GENES
    assert written.uns["comtip_prediction"]["method"] == "retrieval_weighted_comtip"


def test_retrieval_weighted_default_k_is_mclstexps_200(cohort):
    root, train, test = cohort
    with pytest.raises(ConfigError, match=r"evaluate\.retrieval_weighted_k' = 200.*\(40\)"):
        _predict("retrieval_weighted_comtip", cohort)  # 40 training spots < 200


def test_retrieval_mean_is_bleep_average_with_its_own_k(cohort):
    root, train, test = cohort
    pred = _predict("retrieval_mean_comtip", cohort, retrieval_mean_k=5, bleep_k=9, retrieval_weighted_k=9)
    expected = bleep_retrieval(
        _reference(train, "sentence_embeddings"), _reference(train, "values"), test["image_embeddings"], k=5
    )
    np.testing.assert_allclose(pred, expected, rtol=1e-12)


def test_bleep_is_bleeps_average_of_its_expression_embeddings_with_bleep_k(cohort):
    """Method bleep reads its own encoder's files (the registry names embeddings/bleep/); given
    them, it is BLEEP's prediction: top-bleep_k by cosine of expression to image embedding."""
    root, train, test = cohort
    pred = _predict("bleep", cohort, bleep_k=4, retrieval_mean_k=9)
    expected = bleep_retrieval(
        _reference(train, "sentence_embeddings"), _reference(train, "values"), test["image_embeddings"], k=4
    )
    np.testing.assert_allclose(pred, expected, rtol=1e-12)
    assert np.abs(pred - _predict("bleep", cohort, bleep_k=9)).max() > 1e-3
    with pytest.raises(ConfigError, match=r"evaluate\.bleep_k' = 50.*\(40\)"):
        _predict("bleep", cohort)  # BLEEP's default 50 > 40 training spots


def test_smoothed_query_averages_the_test_image_embedding_with_its_grid_neighbours(cohort):
    root, train, test = cohort
    pred = _predict("retrieval_weighted_comtip", cohort, retrieval_weighted_k=7, retrieval_weighted_smooth_query=True)
    ref, values = _reference(train, "sentence_embeddings"), _reference(train, "values")
    smoothed = spatial_neighbour_mean(test["image_embeddings"], test["xy"])
    np.testing.assert_allclose(pred, mclstexp_retrieval(ref, values, smoothed, k=7), rtol=1e-12)
    assert np.abs(pred - mclstexp_retrieval(ref, values, test["image_embeddings"], k=7)).max() > 1e-3
    # spot 6 (row 1, col 1 of the 5-wide grid) has 8 neighbours: rows 0-2 x cols 0-2
    query = test["image_embeddings"].astype(np.float64)
    unit = query / np.linalg.norm(query, axis=1, keepdims=True)
    block = unit[[0, 1, 2, 5, 6, 7, 10, 11, 12]].sum(axis=0)
    np.testing.assert_allclose(smoothed[6], block / np.linalg.norm(block), rtol=1e-10)


def test_test_embeddings_of_other_spots_are_refused(cohort):
    root, train, test = cohort
    data = dict(np.load(test["embeddings"]))
    data["barcodes"] = data["barcodes"][::-1]
    np.savez(test["embeddings"], **data)
    with pytest.raises(PipelineInputError, match="not the test sample's spots"):
        _predict("retrieval_weighted_comtip", cohort, retrieval_weighted_k=7)
    assert not (root / "retrieval_weighted_comtip.h5ad").exists()


def test_every_configurable_baseline_is_a_method_the_rule_runs():
    schema = yaml.safe_load(CONFIG_SCHEMA.read_text())["properties"]["evaluate"]["properties"]
    enum = set(schema["methods"]["items"]["enum"])
    assert {m for m in enum if not m.startswith("finetune_")} == set(BASELINE_METHODS)
    assert schema["retrieval_weighted_k"]["default"] == 200 and schema["bleep_k"]["default"] == 50
    shipped = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["evaluate"]
    assert "retrieval_weighted_comtip" in shipped["methods"] and shipped["retrieval_weighted_k"] == 200


def test_the_stacked_reference_is_read_in_place_with_the_per_sample_results(cohort):
    """What the workflow passes: one stacked file of each (rules training_values / training_embeddings),
    read through Rows (preadv, nothing loaded), predicting what the per-sample files predict."""
    from comtip._core.rows import Rows
    from comtip.predict.reference import EMBEDDING_KEYS, VALUE_KEYS, stack_training

    root, train, test = cohort
    names = ["a", "b"]
    stack_training([t["sentences"] for t in train], names, VALUE_KEYS, root / "values.npz")
    stack_training([t["embeddings"] for t in train], names, EMBEDDING_KEYS, root / "reference.npz")
    settings = {"bleep_k": 5, "retrieval_mean_k": 6, "retrieval_weighted_k": 40}
    for method in ("mean", "retrieval_mean_comtip", "retrieval_weighted_comtip", "bleep"):
        ctx = PredictionContext(
            spots_h5ad=test["spots"],
            test_sentences=test["sentences"],
            train_value_files=[root / "values.npz"],
            train_embedding_files=[root / "reference.npz"],
            test_embedding=test["embeddings"],
            settings=settings,
        )
        assert isinstance(ctx.train_values, Rows) and isinstance(ctx.train_values._array, np.memmap)
        assert ctx.retrieval_k("retrieval_weighted_k") == 40
        stacked = predict_with_method(method, ctx, root / f"{method}_stacked.h5ad")
        np.testing.assert_array_equal(stacked, _predict(method, cohort, **settings))
    too_many = PredictionContext(
        spots_h5ad=test["spots"],
        test_sentences=test["sentences"],
        train_value_files=[root / "values.npz"],
        settings={"bleep_k": 41},
    )
    with pytest.raises(ConfigError, match=r"\(40\)"):
        too_many.retrieval_k("bleep_k")


def test_baseline_methods_module_does_not_import_torch():
    """Only the zero-shot method runs a model: importing the methods (every predict_baseline job
    does) must not pull in torch, ~0.9 GB of each job's RSS."""
    import subprocess
    import sys

    code = "import sys, comtip.predict.methods; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

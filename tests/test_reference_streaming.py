"""The training reference at cohort scale: the stacked file written one sample at a time equals
the old in-memory concatenation, and the methods that read it (mean, BLEEP / mclSTExp retrieval,
the zero-shot grid and prior) read it in blocks with the results of the old in-memory code."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from comtip._core.errors import PipelineInputError
from comtip._core.rows import Rows, open_rows
from comtip.predict.baselines import bleep_retrieval, mclstexp_retrieval, mean_baseline
from comtip.predict.neighbours import top_k, unit_rows
from comtip.predict.reference import EMBEDDING_KEYS, VALUE_KEYS, stack_training
from comtip.predict.zeroshot import quantile_value_grid, value_prior, zero_shot_grid_and_prior


@pytest.fixture
def small_blocks(monkeypatch):
    """Chunks, reference blocks, query blocks and gene blocks of a few rows, so every loop runs many times."""
    monkeypatch.setattr("comtip._core.rows.CHUNK_BYTES", 1000)
    monkeypatch.setattr("comtip.predict.neighbours.SIMILARITY_BYTES", 8 * 64 * 53)
    monkeypatch.setattr("comtip.predict.neighbours.RETRIEVAL_BLOCK", 17)
    monkeypatch.setattr("comtip.predict.zeroshot.COLUMN_BYTES", 8 * 3000)


def _old_stack(files, samples, keys):
    """What stack_training wrote before it streamed: np.concatenate of every sample's arrays."""
    parts = {key: [np.load(f)[key] for f in files] for key in (*keys, "barcodes")}
    arrays = {key: np.concatenate(value, axis=0) for key, value in parts.items()}
    arrays["sample"] = np.concatenate([np.full(len(np.load(f)["barcodes"]), s) for f, s in zip(files, samples)])
    if "panel_genes" in np.load(files[0]):
        arrays["panel_genes"] = np.load(files[0])["panel_genes"]
    return arrays


def test_streamed_stack_equals_the_concatenation_and_is_stored_uncompressed(tmp_path):
    rng = np.random.default_rng(0)
    genes = np.array([f"GENE{g}" for g in range(11)])
    sentences, embeddings, samples = [], [], ["s1", "sample_10", "x", "empty"]
    for i, (name, n) in enumerate(zip(samples, (37, 5, 120, 0))):
        barcodes = np.array([f"{name}_{j}" for j in range(n)])  # widths differ between samples
        values = rng.gamma(1.0, 1.0, (n, len(genes)))
        sentences.append(tmp_path / f"{name}_s.npz")
        np.savez(sentences[-1], barcodes=barcodes, panel_genes=genes, panel_values=values.astype(np.float32))
        emb = {key: rng.normal(size=(n, 6 + 3 * k)).astype(np.float32) for k, key in enumerate(EMBEDDING_KEYS)}
        if i == 1:
            emb["features"] = emb["features"].astype(np.float64)  # another dtype: concatenate's result type
            emb["image_embeddings"] = np.asfortranarray(emb["image_embeddings"])
        embeddings.append(tmp_path / f"{name}_e.npz")
        (np.savez_compressed if i == 2 else np.savez)(embeddings[-1], barcodes=barcodes, **emb)
    for files, keys, out in ((sentences, VALUE_KEYS, "v.npz"), (embeddings, EMBEDDING_KEYS, "e.npz")):
        expected = _old_stack(files, samples, keys)
        mapped = stack_training(files, samples, keys, tmp_path / out)
        with np.load(tmp_path / out) as written:
            assert sorted(written.files) == sorted(expected)
            for key, array in expected.items():
                assert written[key].dtype == array.dtype and written[key].shape == array.shape, key
                np.testing.assert_array_equal(written[key], array)
                np.testing.assert_array_equal(mapped[key], array)
        with zipfile.ZipFile(tmp_path / out) as zf:
            assert {info.compress_type for info in zf.infolist()} == {zipfile.ZIP_STORED}
        assert isinstance(mapped[keys[0]], np.memmap)
    assert np.load(tmp_path / "e.npz")["features"].dtype == np.float64


def test_streamed_stack_refuses_rows_of_other_widths(tmp_path):
    for name, width in (("a", 4), ("b", 5)):
        np.savez(tmp_path / f"{name}.npz", barcodes=np.array([name]), panel_values=np.zeros((1, width), np.float32))
    with pytest.raises(PipelineInputError, match=r"\[sample b\].*rows of shape \(5,\)"):
        stack_training([tmp_path / "a.npz", tmp_path / "b.npz"], ["a", "b"], VALUE_KEYS, tmp_path / "v.npz")
    assert not (tmp_path / "v.npz").exists()


# The retrieval of the previous version (comtip.predict.baselines at 39f7f51), kept here as the oracle.
def _old_top_k(reference, query, k):
    s = query @ reference.T
    part = np.argpartition(-s, k - 1, axis=1)[:, :k]
    part_s = np.take_along_axis(s, part, axis=1)
    order = np.argsort(-part_s, axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1), np.take_along_axis(part_s, order, axis=1)


def _old_retrieval(ref, values, query, k, kind):
    ref, query, values = unit_rows(ref), unit_rows(query), np.asarray(values, np.float64)
    out = np.empty((len(query), values.shape[1]))
    for lo in range(0, len(query), 256):
        block = query[lo : lo + 256]
        indices, sims = _old_top_k(ref, block, k)
        if kind == "mclstexp":
            distance = np.abs(ref[indices] - block[:, None, :]).sum(axis=2)
            exact = distance == 0
            with np.errstate(divide="ignore"):
                weights = np.where(exact.any(axis=1, keepdims=True), exact.astype(np.float64), 1.0 / distance**2)
        else:
            weights = np.ones_like(sims)
        out[lo : lo + len(block)] = np.einsum(
            "qk,qkg->qg", weights / weights.sum(axis=1, keepdims=True), values[indices]
        )
    return out


def _reference(rng, n=900, d=12, g=5, duplicates=False):
    ref = rng.normal(size=(n, d)).astype(np.float32)
    values = rng.gamma(1.0, 1.0, (n, g)).astype(np.float32)
    query = rng.normal(size=(300, d)).astype(np.float32)
    if duplicates:  # exact duplicates of embeddings (as identical sentences give), with their values
        ref[300:450], values[300:450] = ref[0:150], values[0:150]
        ref[600:640], values[600:640] = ref[7], values[7]
        query[:5] = ref[7]  # 41 references at the top
    return ref, values, query


def _lattice(rng, n, d=16):
    """Unit vectors with four entries ±0.5: every dot product is a multiple of 0.25, exact in any
    summation order, so similarities tie exactly and often, whatever the BLAS kernel."""
    x = np.zeros((n, d), np.float32)
    for row in x:
        row[rng.choice(d, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    return x


@pytest.mark.parametrize("k", [1, 7, 50, 200])
def test_blocked_top_k_is_the_old_top_k(small_blocks, k):
    rng = np.random.default_rng(k)
    ref, values, query = _reference(rng)
    unit_ref, unit_query = unit_rows(ref), unit_rows(query)
    old_i, old_s = _old_top_k(unit_ref, unit_query, k)
    new_i, new_s = top_k(Rows(ref), unit_query, k)
    np.testing.assert_array_equal(new_i, old_i)  # the same neighbours in the same order
    np.testing.assert_allclose(new_s, old_s, rtol=1e-15, atol=1e-15)  # the BLAS kernel may differ by an ulp
    for kind, new in (("bleep", bleep_retrieval), ("mclstexp", mclstexp_retrieval)):
        np.testing.assert_allclose(
            new(ref, values, query, k=k), _old_retrieval(ref, values, query, k, kind), rtol=1e-12
        )


@pytest.mark.parametrize("k", [1, 7, 50, 200])
def test_exact_ties_go_to_the_lower_index_and_change_nothing_else(small_blocks, k):
    rng = np.random.default_rng(10 + k)
    ref, query = _lattice(rng, 900), _lattice(rng, 300)
    values = rng.gamma(1.0, 1.0, (900, 5)).astype(np.float32)
    full = query.astype(np.float64) @ ref.astype(np.float64).T
    old_i, old_s = _old_top_k(ref.astype(np.float64), query.astype(np.float64), k)
    new_i, new_s = top_k(Rows(ref), unit_rows(query), k)
    np.testing.assert_array_equal(new_s, old_s)  # the same similarities in the same order
    np.testing.assert_array_equal(new_i, np.argsort(-full, axis=1, kind="stable")[:, :k])  # ties: lower index first
    # the old choice among ties at the k-th place was argpartition's (arbitrary); elsewhere it is the same set
    straddle = (full == old_s[:, -1:]).sum(axis=1) > (old_s == old_s[:, -1:]).sum(axis=1)
    assert straddle.any()
    assert all(set(a) == set(b) for a, b in zip(old_i[~straddle], new_i[~straddle]))
    for kind, new in (("bleep", bleep_retrieval), ("mclstexp", mclstexp_retrieval)):
        np.testing.assert_allclose(
            new(ref, values, query, k=k)[~straddle], _old_retrieval(ref, values, query, k, kind)[~straddle], rtol=1e-12
        )


@pytest.mark.parametrize("k", [1, 7, 50, 200])
def test_duplicated_references_predict_as_before(small_blocks, k):
    """Ties from duplicated embeddings (identical sentences) carry identical values: whichever copy
    is chosen, the prediction is the old one."""
    rng = np.random.default_rng(20 + k)
    ref, values, query = _reference(rng, duplicates=True)
    for kind, new in (("bleep", bleep_retrieval), ("mclstexp", mclstexp_retrieval)):
        np.testing.assert_allclose(
            new(ref, values, query, k=k), _old_retrieval(ref, values, query, k, kind), rtol=1e-12
        )


def test_methods_read_the_stacked_file_in_blocks_with_the_in_memory_results(tmp_path, small_blocks):
    rng = np.random.default_rng(7)
    ref, values, query = _reference(rng, g=9)
    values[values < 0.4] = 0.0  # repeated quantiles, as real panels have
    np.savez(tmp_path / "e.npz", sentence_embeddings=ref)
    np.savez(tmp_path / "v.npz", panel_values=values)
    emb, vals = open_rows(tmp_path / "e.npz", "sentence_embeddings"), open_rows(tmp_path / "v.npz", "panel_values")
    assert isinstance(vals._array, np.memmap) and vals._fd is not None and len(vals) == len(values)
    np.testing.assert_array_equal(
        mean_baseline(vals, 4), np.broadcast_to(values.astype(np.float64).mean(axis=0), (4, 9))
    )
    for k in (5, 60):
        np.testing.assert_array_equal(bleep_retrieval(emb, vals, query, k=k), bleep_retrieval(ref, values, query, k=k))
        np.testing.assert_allclose(
            mclstexp_retrieval(emb, vals, query, k=k), _old_retrieval(ref, values, query, k, "mclstexp"), rtol=1e-12
        )
    for grid in ("quantile", "shared"):
        for prior in ("training", "none"):
            got, got_prior = zero_shot_grid_and_prior(vals, 8, grid=grid, prior=prior)
            old_grid = (
                quantile_value_grid(values, 8)
                if grid == "quantile"
                else np.linspace(0.0, float(values.max()), 8, dtype=np.float32)
            )
            np.testing.assert_array_equal(got, old_grid)
            if prior == "none":
                assert got_prior is None
            else:
                np.testing.assert_array_equal(got_prior, value_prior(values, old_grid))
    values[3, 2] = np.nan
    np.savez(tmp_path / "v.npz", panel_values=values)
    with pytest.raises(ValueError, match="finite"):
        zero_shot_grid_and_prior(open_rows(tmp_path / "v.npz", "panel_values"), 8)

"""The stacked training reference (rules training_values / training_embeddings): exactly the
per-sample arrays concatenated in sheet order, and a method predicts the same from it as from the
per-sample files."""

from __future__ import annotations

import numpy as np
import pytest

from comtip._core.errors import PipelineInputError
from comtip.predict.reference import EMBEDDING_KEYS, VALUE_KEYS, stack_training

GENES = np.array(["G0", "G1", "G2"])


def _sample(tmp_path, name, n, rng, genes=GENES):
    barcodes = np.array([f"{name}_{i}" for i in range(n)])
    sentences = tmp_path / f"{name}_s.npz"
    embeddings = tmp_path / f"{name}_e.npz"
    np.savez(
        sentences,
        barcodes=barcodes,
        panel_genes=genes,
        panel_values=rng.gamma(1.0, 1.0, (n, len(genes))).astype(np.float32),
    )
    np.savez(embeddings, barcodes=barcodes, **{k: rng.normal(size=(n, 4)).astype(np.float32) for k in EMBEDDING_KEYS})
    return sentences, embeddings


def test_the_reference_is_the_samples_arrays_in_sheet_order(tmp_path):
    rng = np.random.default_rng(0)
    (sa, ea), (sb, eb) = _sample(tmp_path, "a", 5, rng), _sample(tmp_path, "b", 3, rng)
    values = stack_training([sb, sa], ["b", "a"], VALUE_KEYS, tmp_path / "v.npz")
    emb = stack_training([ea, eb], ["a", "b"], EMBEDDING_KEYS, tmp_path / "e.npz")
    np.testing.assert_array_equal(
        values["panel_values"], np.concatenate([np.load(sb)["panel_values"], np.load(sa)["panel_values"]])
    )
    assert list(values["sample"]) == ["b"] * 3 + ["a"] * 5 and list(values["panel_genes"]) == list(GENES)
    assert list(values["barcodes"][:4]) == ["b_0", "b_1", "b_2", "a_0"]
    with np.load(tmp_path / "e.npz") as written:
        for key in EMBEDDING_KEYS:
            expected = np.concatenate([np.load(ea)[key], np.load(eb)[key]])
            assert written[key].dtype == np.float32
            np.testing.assert_array_equal(written[key], expected)
            np.testing.assert_array_equal(emb[key], expected)


def test_samples_with_another_panel_or_missing_arrays_are_refused(tmp_path):
    rng = np.random.default_rng(1)
    sa, _ = _sample(tmp_path, "a", 4, rng)
    sb, _ = _sample(tmp_path, "b", 4, rng, genes=np.array(["X", "Y", "Z"]))
    with pytest.raises(PipelineInputError, match=r"\[sample b\].*panel genes differ"):
        stack_training([sa, sb], ["a", "b"], VALUE_KEYS, tmp_path / "v.npz")
    with pytest.raises(PipelineInputError, match=r"\[sample a\].*lacks \['features'"):
        stack_training([sa], ["a"], EMBEDDING_KEYS, tmp_path / "e.npz")
    assert not (tmp_path / "v.npz").exists() and not (tmp_path / "e.npz").exists()

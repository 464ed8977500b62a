"""Gene panel selection (training samples only) and gene sentences."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from comtip._core.errors import PipelineInputError
from comtip.data.genes import build_gene_sentences, normalise, select_genes, sentences_from_values, value_bins


def write_spots(path: Path, counts: np.ndarray, genes: list[str]) -> Path:
    adata = ad.AnnData(sp.csr_matrix(counts.astype(np.float32)))
    adata.obs_names = [f"{path.stem}_{i}" for i in range(counts.shape[0])]
    adata.var_names = genes
    adata.write_h5ad(path)
    return path


@pytest.fixture
def cohort(tmp_path):
    rng = np.random.default_rng(0)
    genes = [f"G{i}" for i in range(40)]
    lam = np.linspace(0.2, 20, 40)
    train = []
    for k in range(2):
        counts = rng.poisson(lam, size=(60, 40))
        counts[:30, 5] += rng.poisson(40, size=30)  # G5: highly variable in training
        train.append(write_spots(tmp_path / f"train{k}.h5ad", counts, genes))
    test_counts = rng.poisson(lam, size=(50, 40))
    test_counts[:, 7] += 500  # G7 varies wildly only in the test sample
    test_counts[::2, 7] = 0
    test = write_spots(tmp_path / "test.h5ad", test_counts, genes)
    return train, test, tmp_path


def test_normalise_is_log1p_cp10k():
    x = np.array([[1, 3, 0], [0, 0, 0]])
    out = normalise(sp.csr_matrix(x))
    np.testing.assert_allclose(out[0], np.log1p(np.array([0.25, 0.75, 0]) * 1e4), rtol=1e-6)
    np.testing.assert_array_equal(out[1], 0)


def test_panel_is_chosen_on_training_samples_only(cohort):
    train, test, tmp = cohort
    table = select_genes(train, tmp / "panel.tsv", tmp / "bins.tsv", n_genes=6, method="hvg", heldout_fraction=0.0)
    assert table["gene"].iloc[0] == "G5"
    assert "G7" not in set(table["gene"])  # its test-only variance must not leak into selection
    saved = pd.read_csv(tmp / "panel.tsv", sep="\t")
    assert list(saved.columns) == ["gene", "rank", "mean", "variance", "dispersion_rank", "mean_rank", "heldout"]


def test_heg_ranks_by_mean_and_explicit_genes_come_first(cohort):
    train, _, tmp = cohort
    table = select_genes(
        train,
        tmp / "p.tsv",
        tmp / "b.tsv",
        n_genes=5,
        method="heg",
        explicit=["G0"],
        heldout_fraction=0.0,
        min_spots_fraction=0.0,
    )
    assert table["gene"].iloc[0] == "G0"
    assert set(table["gene"].iloc[1:4]) == {"G39", "G38", "G37"}


def test_heldout_fraction_is_seeded(cohort):
    train, _, tmp = cohort
    a = select_genes(train, tmp / "a.tsv", tmp / "ab.tsv", n_genes=20, heldout_fraction=0.2, seed=1)
    b = select_genes(train, tmp / "b.tsv", tmp / "bb.tsv", n_genes=20, heldout_fraction=0.2, seed=1)
    c = select_genes(train, tmp / "c.tsv", tmp / "cb.tsv", n_genes=20, heldout_fraction=0.2, seed=2)
    assert a["heldout"].sum() == 4
    assert list(a.loc[a["heldout"], "gene"]) == list(b.loc[b["heldout"], "gene"])
    assert list(a.loc[a["heldout"], "gene"]) != list(c.loc[c["heldout"], "gene"])


def test_no_training_sample_is_an_error(tmp_path):
    with pytest.raises(PipelineInputError, match="no training sample"):
        select_genes([], tmp_path / "p.tsv", tmp_path / "b.tsv")


def test_sentences_sort_by_value_drop_zeros_and_pad():
    values = np.array([[0.0, 2.0, 1.0, 3.0], [0.0, 0.0, 0.5, 0.0]], np.float32)
    edges = np.array([1.5, 2.5], np.float32)
    s = sentences_from_values(values, edges, max_len=3)
    np.testing.assert_array_equal(s["gene_ids"], [[3, 1, 2], [2, 0, 0]])
    np.testing.assert_array_equal(s["values"], [[3.0, 2.0, 1.0], [0.5, 0, 0]])
    np.testing.assert_array_equal(s["pad"], [[False, False, False], [False, True, True]])
    np.testing.assert_array_equal(s["bins"], [[3, 2, 1], [1, 0, 0]])
    np.testing.assert_array_equal(value_bins(np.array([0.0, 1.0, 2.0, 9.0]), edges), [0, 1, 2, 3])


def test_build_gene_sentences_keeps_spot_order_and_hides_heldout_genes(cohort):
    train, test, tmp = cohort
    table = select_genes(train, tmp / "panel.tsv", tmp / "bins.tsv", n_genes=10, heldout_fraction=0.3, seed=0)
    arrays = build_gene_sentences(test, tmp / "panel.tsv", tmp / "bins.tsv", tmp / "s.npz", max_len=8, sample="t")
    saved = np.load(tmp / "s.npz")
    assert list(saved["barcodes"]) == list(ad.read_h5ad(test).obs_names)
    heldout = set(table.loc[table["heldout"], "gene"])
    assert not heldout & set(saved["vocabulary"])
    assert list(saved["panel_genes"]) == list(table["gene"])
    assert saved["gene_ids"].shape == (
        50,
        7,
    )  # 10 panel genes - 3 held out and saved["gene_ids"].max() < len(saved["vocabulary"])
    # values in sentences equal the normalised values of those genes
    spot = 3
    vocab = list(saved["vocabulary"])
    full = ad.read_h5ad(test)
    expected = normalise(full.X)[spot, full.var_names.get_indexer(vocab)]
    ids, pad = saved["gene_ids"][spot], saved["pad"][spot]
    np.testing.assert_allclose(saved["values"][spot][~pad], expected[ids[~pad]], rtol=1e-6)
    np.testing.assert_array_equal(arrays["panel_values"], saved["panel_values"])

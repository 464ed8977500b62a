"""Streaming gene statistics: the same panel and bin edges as the dense, whole-cohort computation
(concatenated values + scanpy + np.quantile) they replaced, one sample in memory at a time."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

from comtip.data import genes
from comtip.data.gene_stats import TARGET_SUM, ExactQuantiles, GeneMoments, normalised_csr, seurat_dispersion_norm
from comtip.demo.params import SimulationParams
from comtip.demo.simulate import simulate_sample
from comtip.io.spaceranger import read_matrix
from conftest import shared_data


def dense_normalise(counts) -> np.ndarray:
    """The dense formula gene selection used before streaming."""
    x = counts.toarray() if sp.issparse(counts) else np.asarray(counts)
    x = x.astype(np.float64)
    library = x.sum(axis=1, keepdims=True)
    library[library == 0] = 1.0
    return np.log1p(x / library * TARGET_SUM).astype(np.float32)


def dense_statistics(paths) -> pd.DataFrame:
    """Gene statistics as computed before streaming: every training spot's dense values at once."""
    common = genes._common_genes(paths)
    blocks = []
    for path in paths:
        adata = ad.read_h5ad(path)  # normalised on all its genes, then restricted to the common ones
        blocks.append(dense_normalise(adata.X)[:, pd.Index(adata.var_names).get_indexer(common)])
    values = np.concatenate(blocks, axis=0)
    stats = pd.DataFrame(
        {"gene": common, "mean": values.mean(0), "variance": values.var(0), "spot_fraction": (values > 0).mean(0)}
    ).set_index("gene", drop=False)
    hvg = ad.AnnData(values, var=pd.DataFrame(index=list(common)))
    hvg.uns["log1p"] = {"base": None}
    dispersion = sc.pp.highly_variable_genes(hvg, flavor="seurat", inplace=False)["dispersions_norm"]
    stats["dispersion"] = np.nan_to_num(dispersion.to_numpy(np.float64), nan=-np.inf)
    stats["dispersion_rank"] = stats["dispersion"].rank(ascending=False, method="first").astype(int)
    stats["mean_rank"] = stats["mean"].rank(ascending=False, method="first").astype(int)
    stats.attrs["n_spots"] = len(values)
    stats.attrs["values"] = values
    return stats


def test_sparse_normalisation_is_bit_identical_to_the_dense_formula():
    rng = np.random.default_rng(0)
    counts = rng.negative_binomial(1, 0.7, size=(300, 200)).astype(np.float32)
    counts[5] = 0  # an empty spot
    np.testing.assert_array_equal(normalised_csr(sp.csr_matrix(counts)).toarray(), dense_normalise(counts))


@pytest.mark.parametrize("trial", range(40))
def test_exact_quantiles_equal_np_quantile(trial):
    rng = np.random.default_rng(trial)
    n = int(rng.integers(1, 4000))
    if trial % 3 == 0:
        values = rng.uniform(0, 5, size=n).astype(np.float32)
    else:  # discrete, many ties and zeros, as normalised counts are
        values = np.log1p(rng.poisson(rng.uniform(0.1, 10), size=n) * 37.5).astype(np.float32)
    if not (values > 0).any():
        values[0] = 1.5
    chunks = np.array_split(values, int(rng.integers(1, 7)))
    q = np.linspace(0, 1, int(rng.integers(3, 40)))[1:-1]
    quantiles = ExactQuantiles(q)
    for chunk in chunks:
        quantiles.add_coarse(chunk)
    quantiles.finish_coarse()
    for chunk in chunks:
        quantiles.add_fine(chunk)
    np.testing.assert_array_equal(quantiles.result(), np.quantile(values[values > 0], q))


def test_streamed_dispersion_matches_scanpy():
    rng = np.random.default_rng(1)
    counts = rng.poisson(rng.uniform(0.01, 20, size=300), size=(500, 300)).astype(np.float32)
    counts[:100, 5] += 50
    counts[:, 7] = 0  # never expressed: no dispersion
    values = normalised_csr(sp.csr_matrix(counts))
    moments = GeneMoments(300)
    for part in np.array_split(np.arange(500), 3):
        moments.add(values[part])
    adata = ad.AnnData(values.toarray())
    adata.uns["log1p"] = {"base": None}
    expected = sc.pp.highly_variable_genes(adata, flavor="seurat", inplace=False)["dispersions_norm"].to_numpy()
    got = seurat_dispersion_norm(moments)
    assert np.isneginf(got[7]) and np.isnan(expected[7])
    finite = np.isfinite(expected)
    np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-5, atol=1e-5)
    dense = values.toarray()
    np.testing.assert_allclose(moments.mean, dense.mean(0, dtype=np.float64), rtol=1e-12)
    np.testing.assert_allclose(moments.variance, dense.var(0, dtype=np.float64), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(moments.spot_fraction, (dense > 0).mean(0))


def _demo_cohort(root: Path) -> list[Path]:
    params = SimulationParams(tissue_mm=1.5, mpp=1.0, n_genes=400, region_scale_um=100.0)
    paths = []
    for k, name in enumerate(["d1", "d2", "d3"]):
        simulate_sample(root / name, name, 11 + k, params)
        adata = read_matrix(root / name / "outs", sample=name)
        path = root / f"{name}.h5ad"
        adata.write_h5ad(path)
        paths.append(path)
    return paths


def _her2st_cohort(root: Path) -> list[Path]:
    paths = []
    for section in ("C2", "C3", "C4"):
        outs = shared_data("her2st", section, "outs")
        path = root / f"{section}.h5ad"
        read_matrix(outs, sample=section).write_h5ad(path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("cohort", ["demo", pytest.param("her2st", marks=pytest.mark.realdata)])
def test_panel_and_bins_are_identical_to_the_dense_computation(cohort, tmp_path, monkeypatch):
    paths = _demo_cohort(tmp_path) if cohort == "demo" else _her2st_cohort(tmp_path)
    dense = dense_statistics(paths)
    streamed = genes.gene_statistics(paths)
    assert streamed.attrs["n_spots"] == dense.attrs["n_spots"]
    assert list(streamed["gene"]) == list(dense["gene"])
    np.testing.assert_allclose(streamed["mean"], dense["mean"], rtol=1e-5)
    np.testing.assert_array_equal(streamed["spot_fraction"], dense["spot_fraction"])
    kwargs = {"n_genes": 120, "method": "hvg_heg", "heldout_fraction": 0.2, "n_bins": 16, "seed": 3}
    table = genes.select_genes(paths, tmp_path / "panel.tsv", tmp_path / "bins.tsv", **kwargs)

    monkeypatch.setattr(genes, "gene_statistics", dense_statistics)
    before = genes.select_genes(paths, tmp_path / "panel0.tsv", tmp_path / "bins0.tsv", **kwargs)
    pd.testing.assert_frame_equal(
        table.drop(columns=["mean", "variance"]), before.drop(columns=["mean", "variance"]), check_dtype=False
    )
    np.testing.assert_allclose(table["variance"], before["variance"], rtol=1e-4)

    values = dense.attrs["values"][:, dense.index.get_indexer(table.loc[~table["heldout"], "gene"])]
    expected_edges = np.unique(np.quantile(values[values > 0], np.linspace(0, 1, 16)[1:-1]))
    np.testing.assert_array_equal(genes.read_bin_edges(tmp_path / "bins.tsv"), expected_edges.astype(np.float32))

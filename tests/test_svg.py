"""genes.method: svg — spatially variable genes by Moran's I on the training slides (squidpy)."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

pytest.importorskip("squidpy")

from comtip._core.errors import PipelineInputError  # noqa: E402
from comtip.data.genes import select_genes  # noqa: E402
from comtip.data.svg import svg_statistics  # noqa: E402

N_PATTERNED = 6


def visium_hex(n_rows: int = 18, n_cols: int = 22, pitch: float = 177.0) -> np.ndarray:
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    return np.stack([pitch * cols.ravel() + pitch / 2 * (rows.ravel() % 2), pitch * np.sqrt(3) / 2 * rows.ravel()], 1)


def simulated_slide(rng: np.random.Generator, xy: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Genes P0-P5 follow a pattern (gradients along x or y, a disc-shaped island); each S{i} has
    the counts of P{i} shuffled over the spots (same mean and variance, no spatial structure);
    B0-B9 are flat background; R0 is a strong but rare pattern (3 % of spots)."""
    x = (xy[:, 0] - xy[:, 0].min()) / np.ptp(xy[:, 0])
    y = (xy[:, 1] - xy[:, 1].min()) / np.ptp(xy[:, 1])
    island = ((x - 0.6) ** 2 + (y - 0.4) ** 2 < 0.08).astype(float)
    fields = [x, 1 - x, y, 1 - y, island, 0.5 * x + island]
    patterned = np.column_stack([rng.poisson(1 + 12 * f) for f in fields])
    shuffled = np.column_stack([rng.permutation(col) for col in patterned.T])
    background = rng.poisson(6, size=(len(xy), 10))
    corner = np.argsort(np.hypot(x, y))[: int(0.03 * len(xy))]
    rare = np.zeros((len(xy), 1), int)
    rare[corner] = rng.poisson(30, size=(len(corner), 1))
    counts = np.hstack([patterned, shuffled, background, rare])
    genes = [f"P{i}" for i in range(N_PATTERNED)] + [f"S{i}" for i in range(N_PATTERNED)]
    genes += [f"B{i}" for i in range(10)] + ["R0"]
    return counts, genes


def write_slide(root: Path, sample: str, counts: np.ndarray, genes: list[str], xy: np.ndarray | None) -> Path:
    path = root / sample / "spots.h5ad"
    path.parent.mkdir(parents=True)
    adata = ad.AnnData(sp.csr_matrix(counts.astype(np.float32)))
    adata.obs_names = [f"{sample}_{i}" for i in range(len(counts))]
    adata.var_names = genes
    if xy is not None:
        adata.obsm["spatial"] = xy
    adata.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("svg")
    rng = np.random.default_rng(3)
    paths = []
    for k, shape in enumerate([(18, 22), (16, 20)]):
        xy = visium_hex(*shape) + rng.normal(scale=4.0, size=(shape[0] * shape[1], 2))
        counts, genes = simulated_slide(rng, xy)
        paths.append(write_slide(root, f"train{k}", counts, genes, xy))
    return paths, root


def test_svg_picks_the_patterned_genes_not_their_shuffled_twins(slides):
    paths, root = slides
    table = select_genes(
        paths,
        root / "panel.tsv",
        root / "bins.tsv",
        n_genes=N_PATTERNED,
        method="svg",
        heldout_fraction=0.0,
        min_spots_fraction=0.05,
    )
    assert set(table["gene"]) == {f"P{i}" for i in range(N_PATTERNED)}
    assert (table["morans_i"] > 0.2).all()
    stats = svg_statistics(paths, [f"S{i}" for i in range(N_PATTERNED)] + ["B0"])
    assert (stats["morans_i"].abs() < 0.1).all()  # shuffled: no structure
    # hvg and heg cannot tell a gene from its shuffled twin: same mean, same variance
    hvg = select_genes(
        paths, root / "h.tsv", root / "hb.tsv", n_genes=2 * N_PATTERNED, method="hvg", heldout_fraction=0.0
    )
    assert any(g.startswith("S") for g in hvg["gene"])
    saved = pd.read_csv(root / "panel.tsv", sep="\t")
    assert list(saved.columns) == [
        "gene",
        "rank",
        "mean",
        "variance",
        "dispersion_rank",
        "mean_rank",
        "morans_i",
        "morans_i_slides",
        "morans_i_rank",
        "heldout",
    ]
    assert list(saved["rank"]) == list(range(1, N_PATTERNED + 1))
    assert saved["morans_i"].is_monotonic_decreasing


def test_svg_keeps_the_detection_filter_and_ranks_rare_patterns_when_allowed(slides):
    paths, root = slides
    strict = select_genes(
        paths, root / "a.tsv", root / "ab.tsv", n_genes=8, method="svg", heldout_fraction=0.0, min_spots_fraction=0.05
    )
    assert "R0" not in set(strict["gene"])  # detected in 3 % of spots: below min_spots_fraction
    loose = select_genes(
        paths, root / "b.tsv", root / "bb.tsv", n_genes=8, method="svg", heldout_fraction=0.0, min_spots_fraction=0.0
    )
    assert "R0" in set(loose["gene"])


def test_svg_panel_is_deterministic_and_options_apply(slides):
    paths, root = slides
    kwargs = dict(n_genes=10, method="svg", heldout_fraction=0.2, seed=4, explicit=["B3"])
    select_genes(paths, root / "d1.tsv", root / "d1b.tsv", **kwargs)
    select_genes(paths, root / "d2.tsv", root / "d2b.tsv", **kwargs)
    assert (root / "d1.tsv").read_bytes() == (root / "d2.tsv").read_bytes()
    assert (root / "d1b.tsv").read_bytes() == (root / "d2b.tsv").read_bytes()
    panel = pd.read_csv(root / "d1.tsv", sep="\t")
    assert panel["gene"].iloc[0] == "B3" and panel["heldout"].sum() == 2  # explicit first; seeded held-out
    assert set(panel["gene"].iloc[1:7]) == {f"P{i}" for i in range(N_PATTERNED)}
    median = select_genes(
        paths,
        root / "m.tsv",
        root / "mb.tsv",
        n_genes=N_PATTERNED,
        method="svg",
        heldout_fraction=0.0,
        svg_neighbours=4,
        svg_combine="median",
    )
    assert set(median["gene"]) == {f"P{i}" for i in range(N_PATTERNED)}
    four = svg_statistics(paths, ["P0"], n_neighbours=4)["morans_i"].iloc[0]
    six = svg_statistics(paths, ["P0"], n_neighbours=6)["morans_i"].iloc[0]
    assert four != six


def test_a_gene_constant_on_a_slide_counts_as_no_structure_there(tmp_path):
    rng = np.random.default_rng(0)
    xy = visium_hex(12, 12)
    counts, genes = simulated_slide(rng, xy)
    a = write_slide(tmp_path, "a", counts, genes, xy)
    silent = counts.copy()
    silent[:, genes.index("P0")] = 0  # P0 never detected on slide b
    b = write_slide(tmp_path, "b", silent, genes, xy)
    alone = svg_statistics([a], ["P0", "P1"])
    both = svg_statistics([a, b], ["P0", "P1"])
    assert both.loc["P0", "morans_i"] == pytest.approx(alone.loc["P0", "morans_i"] / 2)
    assert list(both["morans_i_slides"]) == [1, 2]
    assert both.loc["P1", "morans_i_rank"] == 1


def test_bad_slides_name_the_sample_and_the_file(tmp_path):
    rng = np.random.default_rng(1)
    xy = visium_hex(10, 10)
    counts, genes = simulated_slide(rng, xy)
    good = write_slide(tmp_path, "good", counts, genes, xy)
    bare = write_slide(tmp_path, "bare", counts, genes, None)
    with pytest.raises(PipelineInputError, match=r"\[sample bare\] .*bare/spots\.h5ad: obsm\[\"spatial\"\]"):
        select_genes([good, bare], tmp_path / "p.tsv", tmp_path / "b.tsv", n_genes=4, method="svg")
    broken = xy.copy()
    broken[3] = np.nan
    nan = write_slide(tmp_path, "nan", counts, genes, broken)
    with pytest.raises(PipelineInputError, match=r"\[sample nan\] .*nan/spots\.h5ad: .*finite"):
        select_genes([good, nan], tmp_path / "p.tsv", tmp_path / "b.tsv", n_genes=4, method="svg")
    tiny = write_slide(tmp_path, "tiny", counts[:5], genes, xy[:5])
    with pytest.raises(PipelineInputError, match=r"\[sample tiny\] .*5 spots.*svg_neighbours"):
        select_genes([good, tiny], tmp_path / "p.tsv", tmp_path / "b.tsv", n_genes=4, method="svg")
    assert not (tmp_path / "p.tsv").exists()

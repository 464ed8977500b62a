"""Moran's I of true and predicted maps (comtip.evaluation.spatial, squidpy): a spatial gradient
is near 1, shuffled noise near 0, a constant map NaN; the value equals Moran's I computed by hand
on the 6-nearest-neighbour graph; run_evaluation adds the columns and checks the spots."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy.spatial import cKDTree

from comtip._core.errors import PipelineInputError

pytest.importorskip("squidpy")
from comtip.evaluation.spatial import MORAN_COLUMNS, N_NEIGHBOURS, moran_table, morans_i  # noqa: E402

PITCH = 200.0  # Visium's 100 µm at 0.5 µm/px


def hex_lattice(rows: int = 16, cols: int = 18) -> np.ndarray:
    r, c = np.mgrid[0:rows, 0:cols]
    x = (c + 0.5 * (r % 2)) * PITCH
    return np.column_stack([x.ravel(), (r * PITCH * np.sqrt(3) / 2).ravel()]) + 1000.0


def hand_morans_i(values: np.ndarray, xy: np.ndarray, k: int = N_NEIGHBOURS) -> np.ndarray:
    """I = (N / S0) z'Wz / z'z with W the row-standardised k-nearest-neighbour weights (S0 = N)."""
    _, neighbours = cKDTree(xy).query(xy, k=k + 1)
    z = values - values.mean(axis=0)
    lag = z[neighbours[:, 1:]].mean(axis=1)
    return (z * lag).sum(axis=0) / (z * z).sum(axis=0)


def test_a_gradient_is_near_one_shuffled_noise_near_zero_and_a_constant_map_nan():
    xy = hex_lattice()
    rng = np.random.default_rng(0)
    gradient = (xy[:, 0] - xy[:, 0].min()) / np.ptp(xy[:, 0]) + 0.5 * xy[:, 1] / xy[:, 1].max()
    truth = np.column_stack([gradient, gradient, gradient, gradient])
    pred = np.column_stack(
        [gradient + 0.02 * rng.normal(size=len(xy)), rng.permutation(gradient), np.ones(len(xy)), -gradient]
    )
    table = moran_table(truth, {"m": pred}, xy, ["smooth", "shuffled", "constant", "flipped"]).set_index("gene")
    assert list(table.columns) == ["method", *MORAN_COLUMNS]
    assert (table["morans_i_true"] > 0.9).all()
    assert table.loc["smooth", "morans_i_pred"] > 0.9 and abs(table.loc["smooth", "morans_i_diff"]) < 0.05
    assert abs(table.loc["shuffled", "morans_i_pred"]) < 0.15 and table.loc["shuffled", "morans_i_diff"] < -0.75
    assert np.isnan(table.loc["constant", ["morans_i_pred", "morans_i_diff"]].astype(float)).all()
    # Moran's I does not see the sign of a map: a flipped gradient is as structured
    assert table.loc["flipped", "morans_i_pred"] == pytest.approx(table.loc["flipped", "morans_i_true"])


def test_morans_i_is_the_hand_computed_value_on_the_six_neighbour_graph():
    rng = np.random.default_rng(1)
    xy = hex_lattice() + rng.normal(scale=20.0, size=(16 * 18, 2))  # irregular: ties would be arbitrary
    values = np.column_stack([np.sin(xy[:, 0] / 700.0) + 0.3 * rng.normal(size=len(xy)), rng.normal(size=len(xy))])
    np.testing.assert_allclose(morans_i(values, xy), hand_morans_i(values, xy), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="coordinates of shape"):
        morans_i(values, xy[:-1])


def _evaluation_inputs(tmp_path, rng, xy):
    genes = ["g0", "g1", "g2"]
    pd.DataFrame({"gene": genes, "mean_rank": range(3), "dispersion_rank": range(3), "heldout": False}).to_csv(
        tmp_path / "panel.tsv", sep="\t", index=False
    )
    barcodes = np.array([f"s{i}-1" for i in range(len(xy))])
    gradient = xy[:, 0] / xy[:, 0].max()
    truth = np.column_stack([gradient, gradient**2, rng.normal(size=len(xy))])
    np.savez(tmp_path / "t.npz", panel_genes=np.array(genes), panel_values=truth, barcodes=barcodes)
    spots = ad.AnnData(np.zeros((len(xy), 1), np.float32), obsm={"spatial": xy})
    spots.obs_names = barcodes
    spots.write_h5ad(tmp_path / "spots.h5ad")
    preds = {}
    for method, pred in (("good", truth + 0.05 * rng.normal(size=truth.shape)), ("noise", rng.permutation(truth))):
        adata = ad.AnnData(pred)
        adata.var_names = genes
        adata.write_h5ad(tmp_path / f"{method}.h5ad")
        preds[("t", method)] = tmp_path / f"{method}.h5ad"
    return {"t": tmp_path / "t.npz"}, preds, spots


def test_run_evaluation_adds_morans_i_to_the_metrics_and_the_summary(tmp_path):
    from comtip.evaluation.run import run_evaluation

    rng = np.random.default_rng(2)
    xy = hex_lattice()
    truth, preds, _ = _evaluation_inputs(tmp_path, rng, xy)
    out = [tmp_path / n for n in ("metrics.tsv", "summary.tsv", "paired.tsv")]
    run_evaluation(truth, preds, tmp_path / "panel.tsv", *out, reference=None)
    plain = pd.read_csv(out[0], sep="\t")
    summary = run_evaluation(
        truth, preds, tmp_path / "panel.tsv", *out, reference=None, spots_h5ads={"t": tmp_path / "spots.h5ad"}
    )
    metrics = pd.read_csv(out[0], sep="\t")
    assert list(metrics.columns) == [*plain.columns, *MORAN_COLUMNS]
    pd.testing.assert_frame_equal(metrics[plain.columns], plain)
    by = metrics.set_index(["method", "gene"])
    assert by.loc[("good", "g0"), "morans_i_true"] == by.loc[("noise", "g0"), "morans_i_true"] > 0.9
    assert abs(by.loc[("noise", "g0"), "morans_i_pred"]) < 0.15 and abs(by.loc[("good", "g0"), "morans_i_diff"]) < 0.1
    row = summary.set_index(["method", "gene_set"])["morans_i_abs_diff_mean"]
    expected = by.loc["noise", "morans_i_diff"].abs().mean()
    assert row[("noise", "all")] == pytest.approx(expected) and row[("good", "all")] < 0.1 < row[("noise", "all")]
    assert "morans_i_abs_diff_mean" in pd.read_csv(out[1], sep="\t")


def test_spots_that_are_not_the_truths_are_refused_naming_sample_and_file(tmp_path):
    from comtip.evaluation.run import run_evaluation

    truth, preds, spots = _evaluation_inputs(tmp_path, np.random.default_rng(3), hex_lattice())
    spots[::-1].copy().write_h5ad(tmp_path / "reversed.h5ad")
    out = [tmp_path / n for n in ("metrics.tsv", "summary.tsv", "paired.tsv")]
    with pytest.raises(PipelineInputError, match=r"\[sample t\] .*reversed\.h5ad: .* not the 288 spots of .*t\.npz"):
        run_evaluation(truth, preds, tmp_path / "panel.tsv", *out, spots_h5ads={"t": tmp_path / "reversed.h5ad"})
    assert not any(p.exists() for p in out)

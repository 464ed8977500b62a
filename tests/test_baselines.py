"""Baselines: the mean, HEST's ridge probe (scaler → PCA → no-intercept lsqr ridge) and BLEEP /
mclSTExp retrieval on hand-made examples."""

from __future__ import annotations

import numpy as np
import pytest

from comtip.predict.baselines import bleep_retrieval, fit_hest_ridge, hest_ridge, mclstexp_retrieval, mean_baseline


def test_mean_baseline():
    train = np.array([[1.0, 4.0], [3.0, 0.0]])
    pred = mean_baseline(train, 3)
    np.testing.assert_array_equal(pred, [[2.0, 2.0]] * 3)
    pred[0, 0] = 9.0  # a writable copy, not a view of one row
    assert pred[1, 0] == 2.0


def _linear_data(n: int, d: int, g: int, seed: int, noise: float = 0.1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * rng.uniform(0.5, 3.0, size=d) + rng.normal(size=d) * 5  # scaled, shifted features
    w = rng.normal(size=(d, g))
    y = (x - x.mean(axis=0)) @ w
    return x, y + noise * rng.normal(size=y.shape), w


def test_hest_ridge_recovers_linear_map():
    x, y, _ = _linear_data(600, 20, 5, seed=0)
    pred = hest_ridge(x[:400], y[:400], x[400:], pca_dim=256)
    truth = y[400:]
    r2 = 1 - ((pred - truth) ** 2).sum(axis=0) / ((truth - truth.mean(axis=0)) ** 2).sum(axis=0)
    assert (r2 > 0.9).all(), r2


def test_hest_ridge_pca_dims_and_alpha():
    x, y, _ = _linear_data(50, 80, 3, seed=1)
    probe = fit_hest_ridge(x, y, pca_dim=256)
    assert probe.components.shape == (49, 80)  # min(256, n_train - 1, D)
    assert probe.alpha == pytest.approx(100.0 / (49 * 3))  # alpha from the dimension AFTER PCA
    np.testing.assert_allclose(probe.components @ probe.components.T, np.eye(49), atol=1e-8)
    assert fit_hest_ridge(x, y, pca_dim=10).components.shape == (10, 80)
    scores = probe.transform(x)
    np.testing.assert_allclose(scores.mean(axis=0), 0.0, atol=1e-8)  # centred training scores


def test_hest_ridge_matches_closed_form_ridge():
    """LSQR with damp = √alpha solves min ‖Xb − y‖² + alpha‖b‖² (sklearn Ridge, no intercept), up to
    its stopping tolerance 1e-4 (as sklearn: an approximate solve, not the closed form)."""
    x, y, _ = _linear_data(200, 12, 4, seed=2, noise=1.0)
    probe = fit_hest_ridge(x, y, pca_dim=8, alpha_scale=100.0)
    z = probe.transform(x)
    closed = np.linalg.solve(z.T @ z + probe.alpha * np.eye(8), z.T @ y)
    np.testing.assert_allclose(probe.coef, closed, rtol=0, atol=1e-3 * np.abs(closed).max())


def test_hest_ridge_has_no_intercept_unless_asked():
    """HEST's probe cannot represent a gene's mean level (centred scores, no intercept)."""
    x, y, _ = _linear_data(300, 10, 2, seed=3)
    y = y + 7.0
    hest = hest_ridge(x[:200], y[:200], x[200:])
    assert abs(hest.mean() - 7.0) > 5.0  # predictions near 0, not near 7
    with_intercept = hest_ridge(x[:200], y[:200], x[200:], fit_intercept=True)
    np.testing.assert_allclose(with_intercept.mean(axis=0), y[200:].mean(axis=0), atol=0.3)
    np.testing.assert_allclose(with_intercept - with_intercept.mean(0), hest - hest.mean(0), atol=0.02)  # lsqr tol


def test_hest_ridge_constant_feature_is_harmless():
    x, y, _ = _linear_data(100, 6, 2, seed=4)
    x[:, 2] = 3.0
    assert np.isfinite(hest_ridge(x, y, x)).all()


# reference: 5 spots on the unit circle in 2-D, with 2 genes
ANGLES = np.array([0.0, 0.1, 0.3, 1.5, 3.0])
REF = np.stack([np.cos(ANGLES), np.sin(ANGLES)], axis=1)
REF_VALUES = np.array([[1.0, 0.0], [2.0, 10.0], [4.0, 20.0], [8.0, 30.0], [16.0, 40.0]])


def test_bleep_average_is_exact_mean_of_top_k():
    query = np.array([[np.cos(0.05), np.sin(0.05)], [np.cos(2.9), np.sin(2.9)]]) * 3.0  # scale must not matter
    pred = bleep_retrieval(REF * 2.0, REF_VALUES, query, k=3)
    np.testing.assert_allclose(pred[0], REF_VALUES[[0, 1, 2]].mean(axis=0))  # angles 0, 0.1, 0.3 closest to 0.05
    np.testing.assert_allclose(pred[1], REF_VALUES[[4, 3, 2]].mean(axis=0))  # 3.0, 1.5, 0.3 closest to 2.9


def test_bleep_simple_and_weighted():
    query = np.array([[np.cos(0.12), np.sin(0.12)]])
    np.testing.assert_allclose(bleep_retrieval(REF, REF_VALUES, query, method="simple"), REF_VALUES[[1]])
    pred = bleep_retrieval(REF, REF_VALUES, query, k=2, method="weighted")
    d2 = ((REF[[1, 0]] - query) ** 2).sum(axis=1)  # top-2: angle 0.1 then 0.0
    w = np.exp(-(d2 - d2.min() + 1))  # BLEEP's formula, e^-1 included
    np.testing.assert_allclose(pred[0], (w[:, None] * REF_VALUES[[1, 0]]).sum(0) / w.sum())


def test_mclstexp_inverse_square_l1_weights():
    query = np.array([[np.cos(0.2), np.sin(0.2)]])
    pred = mclstexp_retrieval(REF, REF_VALUES, query, k=3)
    a = np.abs(REF[[2, 1, 0]] - query).sum(axis=1)
    w = 1 / a**2
    np.testing.assert_allclose(pred[0], (w[:, None] * REF_VALUES[[2, 1, 0]]).sum(0) / w.sum())
    exact = mclstexp_retrieval(REF, REF_VALUES, REF[[3]], k=3)  # distance 0: the exact match only
    np.testing.assert_allclose(exact[0], REF_VALUES[3])


def test_retrieval_blocks_match_one_pass(monkeypatch):
    rng = np.random.default_rng(5)
    ref, values, query = rng.normal(size=(40, 4)), rng.normal(size=(40, 3)), rng.normal(size=(25, 4))
    full = bleep_retrieval(ref, values, query, k=5)
    monkeypatch.setattr("comtip.predict.neighbours.RETRIEVAL_BLOCK", 7)
    monkeypatch.setattr("comtip.predict.neighbours.SIMILARITY_BYTES", 8 * 25 * 6)  # reference blocks of 6 rows
    np.testing.assert_allclose(bleep_retrieval(ref, values, query, k=5), full)


def test_retrieval_rejects_bad_input():
    with pytest.raises(ValueError, match="k must be"):
        bleep_retrieval(REF, REF_VALUES, REF, k=6)
    with pytest.raises(ValueError, match="method"):
        bleep_retrieval(REF, REF_VALUES, REF, method="median")
    with pytest.raises(ValueError, match="width"):
        mclstexp_retrieval(REF, REF_VALUES, np.ones((1, 3)), k=2)
    with pytest.raises(ValueError, match="all zeros"):
        bleep_retrieval(REF, REF_VALUES, np.zeros((1, 2)), k=2)


def _old_spatial_neighbour_mean(embeddings, xy, radius=1.5):
    """The hand-written neighbour mean that squidpy's radius graph replaced (cKDTree pairs within
    radius × median nearest-neighbour distance, itself included), kept as the reference."""
    from scipy.spatial import cKDTree

    emb = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    tree = cKDTree(xy)
    pitch = float(np.median(tree.query(xy, k=2)[0][:, 1]))
    pairs = tree.query_pairs(radius * pitch, output_type="ndarray")
    total = emb.copy()
    np.add.at(total, pairs[:, 0], emb[pairs[:, 1]])
    np.add.at(total, pairs[:, 1], emb[pairs[:, 0]])
    return total / np.linalg.norm(total, axis=1, keepdims=True)


def _visium_hex(n_rows, n_cols, pitch=100.0):
    """Visium's layout: odd array rows shifted by half a pitch, rows √3/2 pitch apart, in px."""
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    return np.stack([pitch * cols.ravel() + pitch / 2 * (rows.ravel() % 2), pitch * np.sqrt(3) / 2 * rows.ravel()], 1)


@pytest.mark.parametrize("grid", ["visium_hex", "st_square", "jittered_hex"])
def test_squidpy_neighbour_mean_equals_the_hand_written_one(grid):
    from comtip.predict.baselines import spatial_neighbour_mean

    rng = np.random.default_rng(11)
    if grid == "st_square":  # legacy ST: 33 x 35 array at a 200 µm pitch (here 1 µm = 1.3 px)
        rows, cols = np.meshgrid(np.arange(12), np.arange(15), indexing="ij")
        xy = 260.0 * np.stack([cols.ravel(), rows.ravel()], 1) + 1000.0
    else:
        xy = _visium_hex(14, 16, pitch=177.3) + 500.0  # Visium at ~0.56 µm/px
        if grid == "jittered_hex":  # Space Ranger's fitted positions are not an exact lattice
            xy = xy + rng.normal(scale=3.0, size=xy.shape)
    keep = rng.random(len(xy)) > 0.1  # holes: spots dropped off tissue
    xy = xy[keep]
    emb = rng.normal(size=(len(xy), 8))
    for radius in (1.5, 1.2, 2.5):
        np.testing.assert_allclose(
            spatial_neighbour_mean(emb, xy, radius=radius), _old_spatial_neighbour_mean(emb, xy, radius), rtol=1e-10
        )


def test_spatial_neighbour_mean_follows_hexagonal_and_square_grids():
    from comtip.predict.baselines import spatial_neighbour_mean

    rng = np.random.default_rng(5)
    # Visium-like hexagonal lattice, pitch 100: an inner spot has 6 neighbours at 100, the next at 173
    rows, cols = np.meshgrid(np.arange(5), np.arange(5), indexing="ij")
    hex_xy = np.stack([100.0 * cols.ravel() + 50.0 * (rows.ravel() % 2), 100.0 * np.sqrt(3) / 2 * rows.ravel()], 1)
    emb = rng.normal(size=(25, 4))
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    out = spatial_neighbour_mean(emb, hex_xy)
    for i in range(25):
        near = np.linalg.norm(hex_xy - hex_xy[i], axis=1) <= 150
        expected = unit[near].sum(axis=0)
        np.testing.assert_allclose(out[i], expected / np.linalg.norm(expected), rtol=1e-10)
    assert (np.linalg.norm(hex_xy - hex_xy[12], axis=1) <= 150).sum() == 7  # itself + 6
    # square grid (legacy ST), pitch 200: 8 neighbours with the diagonals; radius 1.2 keeps only 4
    square = np.stack([200.0 * cols.ravel(), 200.0 * rows.ravel()], 1)
    inner = unit[[6, 7, 8, 11, 12, 13, 16, 17, 18]].sum(axis=0)
    np.testing.assert_allclose(spatial_neighbour_mean(emb, square)[12], inner / np.linalg.norm(inner), rtol=1e-10)
    cross = unit[[7, 11, 12, 13, 17]].sum(axis=0)
    np.testing.assert_allclose(
        spatial_neighbour_mean(emb, square, radius=1.2)[12], cross / np.linalg.norm(cross), rtol=1e-10
    )
    # a lone spot far from the rest keeps its direction
    far = np.vstack([square, [[1e5, 1e5]]])
    np.testing.assert_allclose(spatial_neighbour_mean(np.vstack([emb, emb[:1]]), far)[-1], unit[0], rtol=1e-12)
    with pytest.raises(ValueError, match="xy must be"):
        spatial_neighbour_mean(emb, square[:3])

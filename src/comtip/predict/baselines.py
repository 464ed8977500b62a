"""Baselines for spot expression from H&E: the training mean, HEST-Benchmark's ridge probe, and
BLEEP / mclSTExp retrieval. Each reproduces the published code's arithmetic; every deviation is
listed in ``docs/evaluation.md``.

All functions work on plain arrays (numpy, float64 inside) so that they can be applied to any
embedding: CoMTIP's, a frozen backbone's, or another model's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.sparse.linalg import lsqr

from comtip._core.rows import Rows, as_rows
from comtip.data.spatial_graph import RADIUS_PITCHES, neighbour_mean
from comtip.predict.neighbours import unit_rows, weighted_neighbours

log = logging.getLogger(__name__)

# sklearn.linear_model.Ridge defaults that HEST's train_test_reg relies on (tol is sklearn's
# default since 1.2; max_iter is passed explicitly by HEST).
LSQR_TOL = 1e-4
LSQR_MAX_ITER = 1000


def mean_baseline(train_values: np.ndarray | Rows, n_test: int) -> np.ndarray:
    """Every test spot predicted as the per-gene mean over the training spots: (n_test, G).

    The floor any image model must beat on MSE/MAE; its correlations are undefined (a constant
    prediction), which the metrics report as NaN. ``train_values`` is an array or
    :class:`~comtip._core.rows.Rows` (the stacked reference, read in chunks of rows): the float64
    sum runs over the rows in order, as ``mean(axis=0)`` of the whole array does.
    """
    rows = as_rows(train_values)
    if rows.ndim != 2 or len(rows) == 0:
        raise ValueError(f"train_values must be a non-empty (N, G) array, got shape {rows.shape}")
    total = np.zeros((1, rows.shape[1]))
    for _, chunk in rows.chunks():
        total = np.sum(np.vstack([total, np.asarray(chunk, dtype=np.float64)]), axis=0, keepdims=True)
    return np.broadcast_to(total[0] / len(rows), (n_test, rows.shape[1])).copy()


@dataclass
class RidgeProbe:
    """The fitted HEST probe: scaler, PCA and ridge coefficients, all from the training spots."""

    scaler_mean: np.ndarray  # (D,)
    scaler_scale: np.ndarray  # (D,) population std; 1 where a feature is constant
    pca_mean: np.ndarray  # (D,) mean of the scaled training features (≈ 0, kept as sklearn does)
    components: np.ndarray  # (K, D) principal axes
    coef: np.ndarray  # (K, G) ridge coefficients, no intercept
    alpha: float
    target_mean: np.ndarray | None  # (G,) added back when fit with an intercept; None = HEST

    def transform(self, feats: np.ndarray) -> np.ndarray:
        """Features (N, D) → PCA scores (N, K)."""
        scaled = (np.asarray(feats, dtype=np.float64) - self.scaler_mean) / self.scaler_scale
        return (scaled - self.pca_mean) @ self.components.T

    def predict(self, feats: np.ndarray) -> np.ndarray:
        """Features (N, D) → predicted expression (N, G)."""
        pred = self.transform(feats) @ self.coef
        return pred if self.target_mean is None else pred + self.target_mean


def fit_hest_ridge(
    train_feats: np.ndarray,
    train_values: np.ndarray,
    *,
    pca_dim: int = 256,
    alpha_scale: float = 100.0,
    fit_intercept: bool = False,
    lsqr_tol: float = LSQR_TOL,
) -> RidgeProbe:
    """Fit HEST-Benchmark's linear probe (``benchmark.py`` + ``trainer.train_test_reg``).

    1. StandardScaler fit on the training features: (x − mean) / std, population std, a constant
       feature keeps scale 1 (as sklearn).
    2. PCA fit on the scaled training features, K = min(pca_dim, n_train − 1, D) components,
       exact SVD (HEST: sklearn ``PCA(n_components=256)``; its randomized solver, used for large
       inputs, approximates the same subspace). Scores are not whitened.
    3. Ridge on the K scores without intercept, alpha = alpha_scale / (K × G) — HEST computes it
       from ``X_train.shape[1]``, i.e. the dimension AFTER PCA, times the number of genes —
       solved per gene with LSQR (damp = √alpha, atol = btol = 1e-4, at most 1000 iterations),
       which is exactly what ``Ridge(solver="lsqr", fit_intercept=False, max_iter=1000)`` runs.

    HEST centres nothing else: the targets keep their mean, and since the PCA scores have zero
    mean on the training spots, the no-intercept fit cannot represent a gene's average level:
    predictions are centred near 0. Pearson (what HEST reports) is unaffected; MSE/MAE are not
    comparable with other methods. ``fit_intercept=True`` (our option, not HEST) centres the
    targets on their training mean and adds it back, which is what an intercept does here.

    This in-memory fit (N × D float64 and its SVD) is the reference of the pipeline's probe,
    :mod:`comtip.predict.ridge`, which streams the training samples and solves the same ridge
    exactly; ``lsqr_tol`` (atol = btol) lets a test run LSQR to convergence.
    """
    x = np.asarray(train_feats, dtype=np.float64)
    y = np.asarray(train_values, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        raise ValueError(f"train_feats (N, D) and train_values (N, G) must have the same N, got {x.shape}, {y.shape}")
    if len(x) < 2:
        raise ValueError(f"need at least 2 training spots, got {len(x)}")
    if pca_dim < 1 or alpha_scale <= 0:
        raise ValueError(f"pca_dim must be >= 1 and alpha_scale > 0, got {pca_dim}, {alpha_scale}")
    scaler_mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale == 0] = 1.0
    scaled = (x - scaler_mean) / scale
    pca_mean = scaled.mean(axis=0)
    k = min(pca_dim, len(x) - 1, x.shape[1])
    _, _, vt = np.linalg.svd(scaled - pca_mean, full_matrices=False)
    components = vt[:k]
    scores = (scaled - pca_mean) @ components.T
    target_mean = y.mean(axis=0) if fit_intercept else None
    targets = y - target_mean if fit_intercept else y
    alpha = alpha_scale / (k * y.shape[1])
    damp = float(np.sqrt(alpha))
    coef = np.empty((k, y.shape[1]))
    for g in range(y.shape[1]):
        coef[:, g] = lsqr(scores, targets[:, g], damp=damp, atol=lsqr_tol, btol=lsqr_tol, iter_lim=LSQR_MAX_ITER)[0]
    log.info(
        "HEST ridge probe: %d training spots, %d → %d PCA dims, %d genes, alpha %.3g%s",
        len(x),
        x.shape[1],
        k,
        y.shape[1],
        alpha,
        ", with intercept" if fit_intercept else "",
    )
    return RidgeProbe(scaler_mean, scale, pca_mean, components, coef, alpha, target_mean)


def hest_ridge(
    train_feats: np.ndarray,
    train_values: np.ndarray,
    test_feats: np.ndarray,
    *,
    pca_dim: int = 256,
    alpha_scale: float = 100.0,
    fit_intercept: bool = False,
) -> np.ndarray:
    """HEST-Benchmark's probe fit on the training spots, applied to ``test_feats``: (n_test, G).
    See :func:`fit_hest_ridge` for the exact recipe."""
    probe = fit_hest_ridge(
        train_feats, train_values, pca_dim=pca_dim, alpha_scale=alpha_scale, fit_intercept=fit_intercept
    )
    return probe.predict(test_feats)


def _check_retrieval(
    reference_emb: np.ndarray | Rows, reference_values: np.ndarray | Rows, query_emb: np.ndarray, k: int
) -> tuple[Rows, Rows, np.ndarray]:
    ref, values, query = as_rows(reference_emb), as_rows(reference_values), unit_rows(query_emb)
    if values.ndim != 2 or len(values) != len(ref):
        raise ValueError(f"reference_values must be (n_reference, G) with n_reference = {len(ref)}, got {values.shape}")
    if ref.ndim != 2 or ref.shape[1] != query.shape[1]:
        raise ValueError(f"reference and query embeddings differ in width: {ref.shape[1:]} vs {query.shape[1]}")
    if not 1 <= k <= len(ref):
        raise ValueError(f"k must be in [1, n_reference = {len(ref)}], got {k}")
    return ref, values, query


def bleep_retrieval(
    reference_emb: np.ndarray,
    reference_values: np.ndarray,
    query_emb: np.ndarray,
    *,
    k: int = 50,
    method: Literal["average", "simple", "weighted"] = "average",
) -> np.ndarray:
    """BLEEP's prediction (``BLEEP_inference.ipynb``): expression of the most similar reference spots.

    Both sides are L2-normalised and compared by dot product (cosine), then for each query spot:

    * ``"average"`` (BLEEP's default): plain mean of the top-``k`` reference spots' expression;
    * ``"simple"``: the expression of the top-1 reference spot (``k`` is not used);
    * ``"weighted"`` (BLEEP's ``weighted_average``): weights exp(−(d²_j − d²_min + 1)), d_j the
      Euclidean distance between query and reference j among the top k; the constant e^−1 cancels
      in the normalised average, so the weights are exp(−(d²_j − d²_min)).

    In BLEEP the reference embeddings are the training spots' *expression* embeddings (the other
    modality), queried with test image embeddings; any embedding of the same width works here
    (e.g. training image embeddings for image-to-image retrieval). Deviation: BLEEP takes d on the
    un-normalised projections while ranking on normalised ones; here both use the normalised
    vectors (identical for CoMTIP, whose encoders output unit vectors).
    Returns (n_query, G).
    """
    if method not in ("average", "simple", "weighted"):
        raise ValueError(f"method must be 'average', 'simple' or 'weighted', got {method!r}")
    if method == "simple":
        k = 1
    ref, values, query = _check_retrieval(reference_emb, reference_values, query_emb, k)
    if method == "weighted":
        # unit vectors: d² = 2 − 2·cos, so d²_j − d²_min = 2·(cos_max − cos_j)
        return weighted_neighbours(ref, values, query, k, lambda q, nb, sims: np.exp(-2.0 * (sims[:, :1] - sims)))
    return weighted_neighbours(ref, values, query, k, lambda q, nb, sims: np.ones_like(sims))


def mclstexp_retrieval(
    reference_emb: np.ndarray, reference_values: np.ndarray, query_emb: np.ndarray, *, k: int = 200
) -> np.ndarray:
    """mclSTExp's prediction (``evel_her2st.py``): top-``k`` reference spots by cosine, averaged with
    weights 1 / a_j², a_j the L1 distance between query and reference j, normalised to sum 1.

    A reference at distance 0 would get an infinite weight (NaN in mclSTExp's code); here the
    limit is taken: the exact matches share the weight equally. Deviation as for BLEEP: the L1
    distance is taken between the L2-normalised vectors (mclSTExp: its un-normalised projections).
    Returns (n_query, G).
    """
    ref, values, query = _check_retrieval(reference_emb, reference_values, query_emb, k)
    return weighted_neighbours(ref, values, query, k, _inverse_square_l1, neighbours=True)


def _inverse_square_l1(query: np.ndarray, neighbours: np.ndarray, sims: np.ndarray) -> np.ndarray:
    """mclSTExp's weights 1 / a², a = L1 distance; exact matches (a = 0) share the weight."""
    distance = np.abs(neighbours - query[:, None, :]).sum(axis=2)
    exact = distance == 0
    with np.errstate(divide="ignore"):
        return np.where(exact.any(axis=1, keepdims=True), exact.astype(np.float64), 1.0 / distance**2)


def spatial_neighbour_mean(embeddings: np.ndarray, xy: np.ndarray, *, radius: float = RADIUS_PITCHES) -> np.ndarray:
    """Each spot's embedding averaged (equal weights, itself included) with those of the spots of
    the same slide whose centres lie within ``radius`` × the slide's spot pitch, then L2-normalised.

    The neighbours are squidpy's radius graph (``squidpy.gr.spatial_neighbors_radius``, through
    :func:`comtip.data.spatial_graph.radius_graph`); the pitch is the median distance from a spot
    to its nearest other spot, so the neighbourhood follows the array without knowing it: with the
    default 1.5 a Visium spot (hexagonal, pitch 100 µm) averages with its 6 touching neighbours, a
    legacy ST spot (square, pitch 200 µm) with its 8 (diagonals at √2 pitch). A spot with no
    neighbour in range keeps its own direction. ``embeddings`` (N, D) and ``xy`` (N, 2) are rows of
    one slide in the same order. Returns (N, D) float64 unit rows. Not part of mclSTExp (see
    ``docs/evaluation.md``).
    """
    return unit_rows(neighbour_mean(unit_rows(embeddings), xy, radius=radius))

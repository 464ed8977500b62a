"""Batch mixing: how well the spots of different slides mix in an embedding (rule ``batch_mixing``).

An encoder whose embeddings cluster by slide rather than by biology predicts worse on new
slides. For each representation (the expression itself as the reference, and the image
embeddings of every encoder the configured methods read) and each label (the slide always, the
sample sheet's ``batch`` and ``patient`` when they vary), this module computes:

* **iLISI** (Korsunsky et al. 2019, Harmony; scib's ``ilisi_graph``): per spot the inverse
  Simpson index 1 / Σ_b p_b² of the labels among its neighbours, weighted by a Gaussian kernel
  whose bandwidth gives the neighbourhood an effective size of ``perplexity`` spots. 1 = all
  neighbours from one slide; the number of slides = perfectly even. Reported as the median, the
  same median with the labels permuted over the spots (what a perfectly mixed embedding of these
  spots reaches) and their normalised ratio ``ilisi_norm`` (see :func:`mixing_scores`).
* **kBET acceptance** (Büttner et al. 2019): the fraction of spots whose neighbours' label counts
  a χ² test does not tell apart from the global label frequencies.
* **Batch silhouette**: sklearn's silhouette score with the slide as the cluster label.

The rule's table and figure (reading the files, subsampling, the warning) are in
:mod:`comtip.evaluation.batch_mixing_run`.

numpy and pandas only (matplotlib for the figure, imported when drawing): exact neighbours in row
blocks, memory O(block × spots). Every random choice takes its seed from the config.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from comtip._core.errors import PipelineInputError

log = logging.getLogger(__name__)

LABEL_COLUMNS = ("batch", "patient")  # optional sample-sheet columns, besides the sample itself
EMBEDDING_KEY = "image_embeddings"  # what the retrieval methods read (comtip.predict.methods)
EXPRESSION = "expression"
WARN_BELOW = -0.1  # ilisi_norm_vs_expression below which an encoder separates slides
COLUMNS = (
    "representation",
    "label",
    "n_spots",
    "n_groups",
    "ilisi_median",
    "ilisi_permuted",
    "ilisi_norm",
    "kbet_acceptance",
    "silhouette",
    "ilisi_norm_vs_expression",
)


def pca(x: np.ndarray, dim: int) -> np.ndarray:
    """Scores of the centred rows of ``x`` on their first ``dim`` principal components.

    The eigendecomposition of the smaller Gram matrix (features² or spots²), i.e. the SVD of
    the smaller side; ``dim`` is capped by the rank. Signs are fixed (largest loading of each
    component positive on the scores), so the result is deterministic.
    """
    x = np.asarray(x, dtype=np.float64)
    xc = x - x.mean(axis=0)
    n, d = xc.shape
    if n <= d:
        vals, vecs = np.linalg.eigh(xc @ xc.T)  # U, s² of xc = U s Vᵀ
    else:
        vals, vecs = np.linalg.eigh(xc.T @ xc)  # V, s²
    order = np.argsort(vals)[::-1]
    vals, vecs = vals[order], vecs[:, order]
    tol = max(vals[0], 0.0) * max(n, d) * np.finfo(np.float64).eps if len(vals) else 0.0
    rank = int((vals > tol).sum())
    k = max(1, min(dim, rank)) if rank else 1
    vals, vecs = vals[:k], vecs[:, :k]
    scores = vecs * np.sqrt(np.clip(vals, 0, None)) if n <= d else xc @ vecs
    signs = np.sign(scores[np.abs(scores).argmax(axis=0), np.arange(k)])
    return scores * np.where(signs == 0, 1.0, signs)


def knn(x: np.ndarray, k: int, block: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``k`` nearest neighbours of every row (itself excluded): (Euclidean distances,
    indices), both (rows, k), nearest first; computed ``block`` rows at a time."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if not 1 <= k < n:
        raise ValueError(f"k must lie in [1, {n - 1}] for {n} rows, got {k}")
    block = block or max(1, min(n, 2**23 // n))
    sq = (x * x).sum(axis=1)
    dist = np.empty((n, k))
    idx = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, block):
        rows = np.arange(start, min(start + block, n))
        d2 = sq[rows, None] + sq[None, :] - 2.0 * (x[rows] @ x.T)
        d2[np.arange(len(rows)), rows] = np.inf
        part = np.argpartition(d2, k - 1, axis=1)[:, :k]
        near = np.take_along_axis(d2, part, axis=1)
        order = np.argsort(near, axis=1, kind="stable")
        idx[rows] = np.take_along_axis(part, order, axis=1)
        dist[rows] = np.sqrt(np.clip(np.take_along_axis(near, order, axis=1), 0, None))
    return dist, idx


def _entropy(d: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.exp(-d * beta[:, None])
    total = p.sum(axis=1)
    return np.log(total) + beta * (d * p).sum(axis=1) / total, p / total[:, None]


def perplexity_weights(
    distances: np.ndarray, perplexity: float, kernel: str = "gaussian", tol: float = 1e-5, max_iter: int = 50
) -> np.ndarray:
    """Neighbour weights per row (rows sum to 1) with an effective neighbourhood of ``perplexity``.

    ``gaussian``: p_j ∝ exp(−β d_j) with β found by bisection so that the row's entropy equals
    log(perplexity), as Harmony's ``compute_simpson`` and scib's LISI do (on the distances as
    given, Euclidean here). A perplexity at or above the number of neighbours gives uniform
    weights (the entropy cannot exceed log k). ``uniform``: weight 1/m on the m = round(perplexity)
    nearest neighbours (entropy log m), 0 on the others.
    """
    d = np.asarray(distances, dtype=np.float64)
    n, k = d.shape
    if kernel == "uniform":
        m = int(min(k, max(1, round(perplexity))))
        w = np.zeros((n, k))
        w[:, :m] = 1.0 / m
        return w
    if kernel != "gaussian":
        raise ValueError(f"kernel must be 'gaussian' or 'uniform', got {kernel!r}")
    if perplexity >= k:
        return np.full((n, k), 1.0 / k)
    d = d - d.min(axis=1, keepdims=True)  # the normalised weights and the entropy do not change
    target = math.log(perplexity)
    beta = np.ones(n)
    lo, hi = np.zeros(n), np.full(n, np.inf)
    for _ in range(max_iter):
        h, p = _entropy(d, beta)
        diff = h - target
        if np.all(np.abs(diff) < tol):
            break
        too_flat = diff > 0  # entropy too high: sharpen (larger β)
        lo = np.where(too_flat, beta, lo)
        hi = np.where(too_flat, hi, beta)
        beta = np.where(np.isinf(hi), beta * 2.0, (lo + hi) / 2.0)
    return _entropy(d, beta)[1]


def inverse_simpson(weights: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per spot 1 / Σ_b p_b², p_b = the weight mass of label b among its neighbours (LISI).

    ``weights`` and ``labels`` are (spots, neighbours): the neighbours' weights and label codes.
    """
    w = np.asarray(weights, dtype=np.float64)
    codes = np.asarray(labels)
    mass = np.zeros((len(w), int(codes.max()) + 1))
    np.add.at(mass, (np.arange(len(w))[:, None], codes), w)
    p = mass / mass.sum(axis=1, keepdims=True)
    return 1.0 / (p * p).sum(axis=1)


def chi2_sf(x: float, df: int) -> float:
    """P(χ²_df > x): the regularised upper incomplete gamma Q(df/2, x/2) (series below a+1,
    continued fraction above, as Numerical Recipes' ``gammq``)."""
    a, z = df / 2.0, x / 2.0
    if z <= 0:
        return 1.0
    lead = math.exp(-z + a * math.log(z) - math.lgamma(a))
    if z < a + 1:
        term = total = 1.0 / a
        for n in range(1, 1000):
            term *= z / (a + n)
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1.0 - total * lead)
    b, c, dd = z + 1 - a, 1e300, 1.0 / (z + 1 - a)
    h = dd
    for i in range(1, 1000):
        an = -i * (i - a)
        b += 2
        dd = 1.0 / (an * dd + b)
        c = b + an / c
        h *= dd * c
        if abs(dd * c - 1) < 1e-15:
            break
    return h * lead


def chi2_critical(alpha: float, df: int) -> float:
    """The χ²_df value whose upper tail is ``alpha`` (bisection on :func:`chi2_sf`)."""
    lo, hi = 0.0, float(df) + 10.0 * math.sqrt(2.0 * df) + 50.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if chi2_sf(mid, df) > alpha else (lo, mid)
    return (lo + hi) / 2.0


def kbet_acceptance(knn_labels: np.ndarray, global_freqs: np.ndarray, alpha: float = 0.05) -> float:
    """Fraction of spots whose neighbour label counts a χ² test at level ``alpha`` does not
    reject against the global label frequencies (kBET's acceptance rate; 1 = mixed).

    NaN when an expected count (neighbours × a label's frequency) is below 5: the χ²
    approximation is invalid there (the textbook rule), and a made-up number would read as a
    measurement. With k neighbours this happens once a slide holds less than 5/k of the spots,
    i.e. with many slides; iLISI still measures mixing then.
    """
    codes = np.asarray(knn_labels)
    freqs = np.asarray(global_freqs, dtype=np.float64)
    n, k = codes.shape
    expected = k * freqs
    if len(freqs) < 2 or expected.min() < 5:
        return float("nan")
    counts = np.zeros((n, len(freqs)))
    np.add.at(counts, (np.arange(n)[:, None], codes), 1.0)
    stat = ((counts - expected) ** 2 / expected).sum(axis=1)
    return float((stat <= chi2_critical(alpha, len(freqs) - 1)).mean())


def silhouette(x: np.ndarray, labels: np.ndarray, block: int | None = None) -> float:
    """Mean silhouette of the rows with ``labels`` as clusters, Euclidean, as
    ``sklearn.metrics.silhouette_score``: a = mean distance to the other members of the own
    cluster, b = the smallest mean distance to another cluster, s = (b − a) / max(a, b), 0 for a
    spot alone in its cluster. NaN with fewer than 2 clusters."""
    x = np.asarray(x, dtype=np.float64)
    codes = pd.factorize(np.asarray(labels))[0]
    n_groups = int(codes.max()) + 1 if len(codes) else 0
    if n_groups < 2 or n_groups >= len(x):
        return float("nan")
    onehot = np.zeros((len(x), n_groups))
    onehot[np.arange(len(x)), codes] = 1.0
    sizes = onehot.sum(axis=0)
    sq = (x * x).sum(axis=1)
    block = block or max(1, min(len(x), 2**23 // len(x)))
    s = np.zeros(len(x))
    for start in range(0, len(x), block):
        rows = np.arange(start, min(start + block, len(x)))
        dist = np.sqrt(np.clip(sq[rows, None] + sq[None, :] - 2.0 * (x[rows] @ x.T), 0, None))
        dist[np.arange(len(rows)), rows] = 0.0
        sums = dist @ onehot
        own = codes[rows]
        own_size = sizes[own]
        a = sums[np.arange(len(rows)), own] / np.maximum(own_size - 1, 1)
        means = sums / sizes
        means[np.arange(len(rows)), own] = np.inf
        b = means.min(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            value = (b - a) / np.maximum(a, b)
        s[rows] = np.where((own_size > 1) & np.isfinite(value), value, 0.0)
    return float(s.mean())


def neighbourhoods(x: np.ndarray, perplexity: float, kernel: str = "gaussian") -> tuple[np.ndarray, np.ndarray]:
    """(neighbour indices, weights) of every spot: k = 3 × perplexity neighbours as Harmony's
    ``compute_lisi`` (capped by the spots), weights by :func:`perplexity_weights`."""
    k = int(min(len(x) - 1, max(1, round(3 * perplexity))))
    dist, idx = knn(x, k)
    return idx, perplexity_weights(dist, min(perplexity, k), kernel)


def mixing_scores(
    x: np.ndarray,
    labels: np.ndarray,
    *,
    perplexity: float = 30,
    kernel: str = "gaussian",
    silhouette_spots: int = 5000,
    alpha: float = 0.05,
    seed: int = 0,
    neighbours: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, float]:
    """Mixing of ``labels`` (one per row of ``x``) in ``x``: median iLISI, the permuted median,
    ``ilisi_norm``, kBET acceptance and the batch silhouette.

    ``ilisi_norm = (median − 1) / (permuted − 1)``: 0 = every neighbourhood holds one slide, 1 =
    as mixed as the same spots with the slide labels shuffled (seeded). scib instead divides by
    (L − 1), L = number of slides: but the inverse Simpson index of a neighbourhood of effective
    size ``perplexity`` cannot reach L when L exceeds the perplexity (nor with uneven slide
    sizes), so that scale saturates well below 1 for 20–200 slides; the permuted value is what
    these spots, this kernel and these slide sizes can reach. ``silhouette`` is the raw score (as
    sklearn, on at most ``silhouette_spots`` rows drawn with ``seed``; it is O(n²)): about 0 or
    below = mixed, towards 1 = slides apart. Raw rather than scib's 1 − |s|, so that it can be
    checked against sklearn and a negative value is not read as separation.
    ``neighbours`` = :func:`neighbourhoods`'s result, to share it between labels.
    """
    codes, uniques = pd.factorize(np.asarray(labels))
    idx, weights = neighbours if neighbours is not None else neighbourhoods(x, perplexity, kernel)
    rng = np.random.default_rng(seed)
    ilisi = float(np.median(inverse_simpson(weights, codes[idx])))
    permuted_codes = rng.permutation(codes)
    permuted = float(np.median(inverse_simpson(weights, permuted_codes[idx])))
    norm = (ilisi - 1.0) / (permuted - 1.0) if permuted - 1.0 > 1e-9 else float("nan")
    freqs = np.bincount(codes, minlength=len(uniques)) / len(codes)
    rows = np.arange(len(codes))
    if len(rows) > silhouette_spots:
        rows = np.sort(rng.choice(len(rows), silhouette_spots, replace=False))
    return {
        "n_spots": len(codes),
        "n_groups": len(uniques),
        "ilisi_median": ilisi,
        "ilisi_permuted": permuted,
        "ilisi_norm": norm,
        "kbet_acceptance": kbet_acceptance(codes[idx], freqs, alpha),
        "silhouette": silhouette(np.asarray(x)[rows], codes[rows]),
    }


def _blank(value: object) -> bool:
    return value is None or (isinstance(value, float) and value != value) or str(value).strip() == ""


def sample_labels(
    sheet: pd.DataFrame, samples: Sequence[str], sheet_path: str | Path | None = None
) -> dict[str, dict[str, str]]:
    """Label → {sample: value}: ``sample`` always, plus the sheet's ``batch`` and ``patient``
    columns where present with at least 2 distinct values over ``samples``.

    A column filled for some of ``samples`` and blank for others is a
    :class:`PipelineInputError` naming the column and the samples with the blank (a blank is
    not a group of its own, and silently dropping those slides would change what is measured).
    """
    labels = {"sample": {s: str(s) for s in samples}}
    for column in LABEL_COLUMNS:
        if column not in sheet.columns:
            continue
        values = {s: sheet.loc[s, column] for s in samples}
        blank = [s for s, v in values.items() if _blank(v)]
        if len(blank) == len(values):
            continue
        if blank:
            raise PipelineInputError(
                f"sample sheet column {column!r} is blank for {', '.join(blank)} but filled for other "
                "samples: fill it for every training and test sample, or for none",
                path=sheet_path,
            )
        if len({str(v) for v in values.values()}) >= 2:
            labels[column] = {s: str(v) for s, v in values.items()}
    return labels


def subsample_rows(n_per_sample: Mapping[str, int], seed: int, limit: int) -> dict[str, np.ndarray]:
    """Sorted row indices of at most ``limit`` spots per sample, each sample drawn from its own
    stream (config seed, crc32 of the name), so adding a sample does not change the others'."""
    rows = {}
    for sample, n in n_per_sample.items():
        if n <= limit:
            rows[sample] = np.arange(n)
            continue
        rng = np.random.default_rng([seed, zlib.crc32(str(sample).encode())])
        rows[sample] = np.sort(rng.choice(n, limit, replace=False))
    return rows

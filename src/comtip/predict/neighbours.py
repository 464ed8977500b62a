"""Top-k retrieval over a reference far larger than memory (BLEEP / mclSTExp,
:mod:`comtip.predict.baselines`): the reference is read in blocks of rows
(:class:`comtip._core.rows.Rows`) and each query's k best are merged block by block, so memory is
O(queries × (block + k)) whatever the number of training spots; then the top-k spots' values are
read by index and averaged in query blocks.

Float64 throughout, as the in-memory computation. The k best of a query are the k largest
similarities, ties broken by the lower reference index (the order of a stable sort of the whole
row): a deterministic choice among those ``torch.topk`` may make, and the same whatever the
block sizes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from comtip._core.rows import Rows

RETRIEVAL_BLOCK = 256  # query rows per block of the gather: bounds the (block, k, D) and (block, k, G) arrays
SIMILARITY_BYTES = 64 * 2**20  # (queries × reference block) similarities per step of the scan

Weigh = Callable[[np.ndarray, np.ndarray | None, np.ndarray], np.ndarray]


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` (float64) divided by their L2 norm; a zero or non-finite row is refused."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    if (norm == 0).any():
        raise ValueError("an embedding row is all zeros: it has no direction to compare")
    if not np.isfinite(norm).all():
        raise ValueError("an embedding row is not finite")
    return x / norm


def _keep_k(sims: np.ndarray, index: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest ``sims`` of each row with their ``index``, in column order; columns are in
    ascending reference index, so among equal similarities the leftmost (lowest index) are kept."""
    kth = -np.partition(-sims, k - 1, axis=1)[:, k - 1 : k]
    above, equal = sims > kth, sims == kth
    need = k - above.sum(axis=1, keepdims=True)
    if (equal.sum(axis=1, keepdims=True) == need).all():
        keep = above | equal
    else:  # ties at the k-th place: the first `need` of them
        keep = above | (equal & (np.cumsum(equal, axis=1) <= need))
    cols = np.nonzero(keep)[1].reshape(len(sims), k)
    return np.take_along_axis(sims, cols, axis=1), np.take_along_axis(index, cols, axis=1)


def top_k(reference: Rows, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (Q, k) of the k reference rows most similar to each unit ``query`` row by cosine,
    most similar first (ties: lower index first), and their similarities (Q, k) float64.

    The reference is read in blocks of at least k rows; after the first block a row enters a
    query's candidates only if it beats that query's current k-th best, so a block costs one
    matrix product and one comparison."""
    n_query = len(query)
    block = max(k, SIMILARITY_BYTES // (8 * max(n_query, 1)))
    best_s = best_i = None
    for lo, chunk in reference.chunks(block):
        sims = query @ unit_rows(chunk).T
        if best_s is None:
            cand_s, cand_i = sims, np.broadcast_to(np.arange(lo, lo + len(chunk)), sims.shape)
        else:
            hit = sims > best_s.min(axis=1, keepdims=True)
            rows, cols = np.nonzero(hit)
            if not len(rows):
                continue
            counts = np.bincount(rows, minlength=n_query)
            slot = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
            new_s = np.full((n_query, counts.max()), -np.inf)
            new_i = np.full((n_query, counts.max()), -1, np.int64)
            new_s[rows, slot], new_i[rows, slot] = sims[rows, cols], lo + cols
            cand_s, cand_i = np.hstack([best_s, new_s]), np.hstack([best_i, new_i])
        best_s, best_i = _keep_k(cand_s, cand_i, k)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_i, order, axis=1), np.take_along_axis(best_s, order, axis=1)


def weighted_neighbours(
    reference: Rows, values: Rows, query: np.ndarray, k: int, weigh: Weigh, *, neighbours: bool = False
) -> np.ndarray:
    """Σ_j w_j · values[j] / Σ_j w_j over each unit ``query`` row's top-k references (float64,
    (Q, G)). ``weigh(query_block, neighbour unit rows (B, k, D) or None, sims (B, k))`` returns the
    (B, k) weights; the neighbours' rows are read only when ``neighbours`` is true. Memory
    O(queries × (block + k) + RETRIEVAL_BLOCK × k × (D + G))."""
    indices, sims = top_k(reference, query, k)
    out = np.empty((len(query), values.shape[1]))
    for lo in range(0, len(query), RETRIEVAL_BLOCK):
        index = indices[lo : lo + RETRIEVAL_BLOCK]
        unique, inverse = np.unique(index.ravel(), return_inverse=True)
        inverse = inverse.reshape(index.shape)
        near = unit_rows(reference.take(unique))[inverse] if neighbours else None
        weights = weigh(query[lo : lo + RETRIEVAL_BLOCK], near, sims[lo : lo + RETRIEVAL_BLOCK])
        near_values = np.asarray(values.take(unique), dtype=np.float64)[inverse]
        out[lo : lo + len(index)] = np.einsum("qk,qkg->qg", weights / weights.sum(axis=1, keepdims=True), near_values)
    return out

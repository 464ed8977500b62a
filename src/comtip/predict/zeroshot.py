"""CoMTIP zero-shot expression: the image embedding scored against "gene g at value v" prompts
over a grid of values, weighted by the training value prior, and the expectation taken.

The model runs in eval mode under ``no_grad``; its previous mode and vocabulary are restored
afterwards. The formula and its reading: ``docs/prediction.md``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from comtip._core.rows import Rows, as_rows
from comtip.data.genes import value_bins
from comtip.model import CoMTIP
from comtip.predict.embeddings import eval_mode

NORM_TOLERANCE = 1e-3
COLUMN_BYTES = 128 * 2**20  # float64 training values per block of genes of zero_shot_grid_and_prior


ZEROSHOT_GRIDS = ("shared", "quantile")
ZEROSHOT_PRIORS = ("none", "training")


def default_value_grid(train_values: np.ndarray | Rows, n: int = 16) -> np.ndarray:
    """``n`` evenly spaced values from 0 to the largest training value of the panel (float32):
    the candidate expression levels of zero-shot prediction. Only training values set the range."""
    if isinstance(train_values, Rows):
        top = float(max(np.max(chunk) for _, chunk in train_values.chunks()))
    else:
        top = float(np.max(train_values))
    if not np.isfinite(top) or top <= 0:
        raise ValueError(f"training values must have a finite positive maximum, got {top}")
    if n < 2:
        raise ValueError(f"the value grid needs at least 2 points, got {n}")
    return np.linspace(0.0, top, n, dtype=np.float32)


def quantile_value_grid(train_values: np.ndarray, n: int = 16) -> np.ndarray:
    """(G, n) per-gene grids: gene g's training quantiles at levels 0, 1/(n-1), ..., 1 (float32).

    The points crowd where gene g's training values lie (a gene that is 0 in 60 % of the training
    spots gets about 60 % of its points at 0). Repeated points are allowed: :func:`zero_shot`
    then scores the same prompt several times, which with no prior weights that value by its
    multiplicity, i.e. by its training frequency; :func:`value_prior` assigns a repeated value's
    mass to one of the copies, so with the prior the repetition does not count twice."""
    values = _check_train_values(train_values)
    if n < 2:
        raise ValueError(f"the value grid needs at least 2 points, got {n}")
    return np.quantile(values, np.linspace(0.0, 1.0, n), axis=0).T.astype(np.float32)


def zero_shot_grid_and_prior(
    train_values: np.ndarray | Rows,
    n: int = 16,
    *,
    grid: str = "quantile",
    prior: str = "training",
    smoothing: float = 0.01,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The value grid and prior :func:`zero_shot` uses, from the **training** values (N, G) only.

    ``grid``: ``"shared"`` = :func:`default_value_grid` (0..max of the panel, one grid), or
    ``"quantile"`` = :func:`quantile_value_grid` (each gene's training quantiles). ``prior``:
    ``"training"`` = :func:`value_prior` on that grid, ``"none"`` = None (a flat prior: the plain
    softmax over the grid). Measured choice of the defaults: docs/evaluation.md.

    ``train_values`` is an array or :class:`~comtip._core.rows.Rows` (the stacked reference).
    Both are computed per gene, so they run on blocks of genes: all N rows of as many genes as fit
    :data:`COLUMN_BYTES` in float64 at a time (memory O(COLUMN_BYTES), not O(N × G)), with the
    same result as on the whole array, exactly."""
    if grid not in ZEROSHOT_GRIDS:
        raise ValueError(f"zero-shot grid must be one of {ZEROSHOT_GRIDS}, got {grid!r}")
    if prior not in ZEROSHOT_PRIORS:
        raise ValueError(f"zero-shot prior must be one of {ZEROSHOT_PRIORS}, got {prior!r}")
    rows = as_rows(train_values)
    if rows.ndim != 2 or len(rows) == 0:
        raise ValueError(f"training values must be (spots, genes) with at least one spot, got shape {rows.shape}")
    shared = default_value_grid(rows, n) if grid == "shared" else None
    if shared is not None and prior == "none":
        return shared, None
    if n < 2:
        raise ValueError(f"the value grid needs at least 2 points, got {n}")
    genes = rows.shape[1]
    step = int(np.clip(COLUMN_BYTES // (8 * len(rows)), 1, max(genes, 1)))
    grids, priors = [], []
    for lo in range(0, genes, step):
        values = rows.columns(lo, lo + step, np.float64)
        block = quantile_value_grid(values, n) if shared is None else shared
        grids.append(block)
        if prior == "training":
            priors.append(value_prior(values, block, smoothing=smoothing))
    if shared is None:
        shared = np.concatenate(grids) if grids else np.empty((0, n), np.float32)
    if prior == "none":
        return shared, None
    return shared, np.concatenate(priors) if priors else np.empty((0, shared.shape[-1]))


def _check_train_values(train_values: np.ndarray) -> np.ndarray:
    values = np.asarray(train_values, dtype=np.float64)
    if values.ndim != 2 or len(values) == 0:
        raise ValueError(f"training values must be (spots, genes) with at least one spot, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError("training values must be finite")
    return values


def value_prior(train_values: np.ndarray, value_grid: np.ndarray, *, smoothing: float = 0.01) -> np.ndarray:
    """p(v_j | g): gene g's training value distribution as a smoothed histogram on the grid, (G, V) float64.

    ``train_values`` (N, G) are the **training** spots' values (``panel_values`` of the training
    samples' ``gene_sentences.npz``; held-out genes have them too); ``value_grid`` is shared (V,)
    or per gene (G, V), non-decreasing. Each training value x in [v_j, v_{j+1}] gives weight
    (v_{j+1} - x) / (v_{j+1} - v_j) to v_j and the rest to v_{j+1} (linear binning: the
    histogram keeps the count and, inside the grid's range, the mean of the values); values
    outside the range go to the nearest end, a value on repeated points to one copy. The
    histogram h_g is normalised and mixed with the uniform distribution over the grid's points,
    p(v_j | g) = (1 - smoothing) · h_{g,j} + smoothing / V, so that no grid value has prior 0 and
    image evidence can still reach values rare in training; the smoothing mass does not grow with
    the number of grid points. ``smoothing=0`` gives the plain histogram."""
    values = _check_train_values(train_values)
    grid = np.asarray(value_grid, dtype=np.float64)
    n_genes = values.shape[1]
    if grid.ndim == 1:
        grid = np.broadcast_to(grid, (n_genes, len(grid)))
    if grid.ndim != 2 or grid.shape[0] != n_genes or grid.shape[1] < 2:
        raise ValueError(f"value_grid must be (V,) or ({n_genes}, V) with V >= 2, got shape {np.shape(value_grid)}")
    if (np.diff(grid, axis=1) < 0).any():
        raise ValueError("value_grid must be non-decreasing")
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"smoothing must be in [0, 1], got {smoothing}")
    n_values = grid.shape[1]
    counts = np.zeros((n_genes, n_values))
    for g in range(n_genes):
        x, v = values[:, g], grid[g]
        j = np.clip(np.searchsorted(v, x, side="right") - 1, 0, n_values - 2)
        width = v[j + 1] - v[j]
        upper = np.clip(np.divide(x - v[j], width, out=np.zeros_like(x), where=width > 0), 0.0, 1.0)
        np.add.at(counts[g], j, 1.0 - upper)
        np.add.at(counts[g], j + 1, upper)
    return (1.0 - smoothing) * counts / len(values) + smoothing / n_values


def prompt_embeddings(
    model: CoMTIP,
    genes: Sequence[str],
    value_grid: np.ndarray,
    bin_edges: np.ndarray,
    *,
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """(G, V, D) L2-normalised embeddings of the one-gene prompts "g at v_{g,j}" (float32).

    ``value_grid`` is (G, V), row g for ``genes[g]``. Prompt = gene id of g in the vocabulary
    ``genes`` (set with ``model.set_vocabulary``: genes unseen in pretraining get embeddings from
    their names), value v_{g,j}, bin ``value_bins(v_{g,j}, bin_edges)``, no padding; encoded in
    batches of ``batch_size`` in eval mode without autograd. The model's vocabulary and
    train/eval mode are restored afterwards; it is moved to ``device``."""
    grid = np.ascontiguousarray(value_grid, dtype=np.float32)
    if grid.ndim != 2 or grid.shape[0] != len(genes):
        raise ValueError(f"value_grid must be ({len(genes)}, V), got shape {grid.shape}")
    n_genes, n_values = grid.shape
    gene_ids = torch.arange(n_genes).repeat_interleave(n_values).unsqueeze(1)  # prompt r = g · V + j
    values = torch.from_numpy(grid.reshape(-1)).unsqueeze(1)
    bins = torch.from_numpy(value_bins(values.numpy(), np.asarray(bin_edges)).astype(np.int64))
    pad = torch.zeros_like(gene_ids, dtype=torch.bool)
    model.to(device)
    previous = list(model.vocabulary)
    model.set_vocabulary(list(genes))
    try:
        with eval_mode(model):
            text = torch.cat(
                [
                    model.encode_sentences(
                        gene_ids[lo : lo + batch_size].to(device),
                        values[lo : lo + batch_size].to(device),
                        bins[lo : lo + batch_size].to(device),
                        pad[lo : lo + batch_size].to(device),
                    ).float()
                    for lo in range(0, len(gene_ids), batch_size)
                ]
            )
    finally:
        model.set_vocabulary(previous)
    return text.reshape(n_genes, n_values, -1)


def zero_shot(
    model: CoMTIP,
    image_emb: np.ndarray,
    genes: Sequence[str],
    value_grid: np.ndarray,
    bin_edges: np.ndarray,
    *,
    temperature: float | None = None,
    prior: np.ndarray | None = None,
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Zero-shot expression (N, G) from image embeddings and gene-value prompts.

    For gene g and grid value v_j the prompt is the one-token sentence "g at v_j" (see
    :func:`prompt_embeddings`). ``value_grid`` is one grid for all genes (V,) or one per gene
    (G, V). The prompt's embedding t_{g,j} = ``encode_sentences`` (L2-normalised). For spot i
    with embedding x_i:

        s_{i,g,j} = scale · x_i · t_{g,j}
        p_{i,g,j} = π_{g,j} · exp(s_{i,g,j}) / Σ_k π_{g,k} · exp(s_{i,g,k})
        ŷ_{i,g}   = Σ_j p_{i,g,j} · v_{g,j}

    with scale = the model's learned, clamped logit scale (``model.scale()``) when ``temperature``
    is None, else 1 / temperature. π = ``prior`` (G, V), each row normalised here (e.g.
    :func:`value_prior` of the training values), or flat when None (then p is the plain softmax
    over the grid). InfoNCE's optimal critic estimates log p(t | x) / p(t) up to a constant in x,
    so exp(s) is a density ratio, and Bayes' rule gives p(v | x, g) ∝ p(v | g) · exp(s): the
    flat prior drops p(v | g). ŷ lies within [min v, max v] of the gene's grid. ``image_emb``
    must be L2-normalised (as :func:`image_embeddings` returns). The model's vocabulary and
    train/eval mode are restored afterwards; it is moved to ``device``.

    The grid's value 0 is the token "g at 0" (bin 0). Pretraining sees it when cut sentences are
    drawn from the whole vocabulary (``pretrain.subsample_genes: vocabulary``, the default); with
    ``expressed`` sentences hold only detected genes and "g at 0" is never trained (docs/model.md).
    """
    grid = np.asarray(value_grid, dtype=np.float32)
    if len(genes) == 0:
        raise ValueError("no genes to predict")
    n_genes = len(genes)
    if grid.ndim == 1:
        grid = np.tile(grid, (n_genes, 1))
    if grid.ndim != 2 or grid.shape[0] != n_genes or grid.shape[1] < 2:
        raise ValueError(
            f"value_grid must be (V,) or ({n_genes}, V) with at least 2 values, got shape {np.shape(value_grid)}"
        )
    if temperature is not None and temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_prior = log_value_prior(prior, grid.shape)
    x = torch.as_tensor(np.asarray(image_emb), dtype=torch.float32)
    if x.ndim != 2:
        raise ValueError(f"image_emb must be (N, D), got shape {tuple(x.shape)}")
    norms = x.norm(dim=1)
    if not torch.allclose(norms, torch.ones_like(norms), atol=NORM_TOLERANCE):
        raise ValueError("image_emb rows must be L2-normalised (use image_embeddings)")
    text = prompt_embeddings(model, genes, grid, bin_edges, batch_size=batch_size, device=device)
    with torch.no_grad():
        scale = model.scale().float() if temperature is None else torch.tensor(1.0 / temperature)
    if text.shape[-1] != x.shape[1]:
        raise ValueError(f"image_emb has width {x.shape[1]}, the text embeddings {text.shape[-1]}")
    return prompt_expectation(x, text, grid, scale, log_prior, batch_size=batch_size, device=device)


def log_value_prior(prior: np.ndarray | None, shape: tuple[int, int]) -> torch.Tensor:
    """log π (G, V) float32 for :func:`zero_shot`: ``prior`` checked against the grid's ``shape``
    and each row normalised; zeros (a flat prior) when ``prior`` is None."""
    if prior is None:
        return torch.zeros(shape)
    pi = np.asarray(prior, dtype=np.float64)
    if pi.shape != tuple(shape):
        raise ValueError(f"prior must be ({shape[0]}, {shape[1]}) like the grid, got shape {pi.shape}")
    if not np.isfinite(pi).all() or (pi < 0).any() or (pi.sum(axis=1) <= 0).any():
        raise ValueError("prior must be finite, non-negative, with positive mass for every gene")
    with np.errstate(divide="ignore"):
        return torch.from_numpy(np.log(pi / pi.sum(axis=1, keepdims=True))).float()


def prompt_expectation(
    image_emb: torch.Tensor,
    text: torch.Tensor,
    value_grid: np.ndarray,
    scale: torch.Tensor,
    log_prior: torch.Tensor,
    *,
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """The scoring half of :func:`zero_shot`: ŷ_{i,g} = Σ_j softmax_j(scale · x_i · t_{g,j} + log π_{g,j}) · v_{g,j}
    (N, G), from image embeddings (N, D), prompt embeddings (G, V, D) (e.g.
    :func:`prompt_embeddings`), the (G, V) grid and :func:`log_value_prior`; spots in batches of
    ``batch_size`` on ``device``. Callers check shapes and normalisation (as :func:`zero_shot` does)."""
    grid_t = torch.from_numpy(np.ascontiguousarray(value_grid, dtype=np.float32)).to(device)
    text, log_prior, scale = text.to(device), log_prior.to(device), scale.to(device)
    out = []
    for lo in range(0, len(image_emb), batch_size):
        scores = torch.einsum("nd,gvd->ngv", image_emb[lo : lo + batch_size].to(device), text) * scale
        out.append((F.softmax(scores + log_prior, dim=-1) * grid_t).sum(dim=-1).cpu())
    return torch.cat(out).numpy()

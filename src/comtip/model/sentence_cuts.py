"""Sentence augmentation: random sub-sentences, so short (even single-gene) sentences are in
distribution. Zero-shot expression prediction scores an image against sentences of ONE gene at
different values; a model that only ever saw ~full sentences would embed those off-manifold."""

from __future__ import annotations

import torch

from comtip.model.config import LENGTH_DISTRIBUTIONS


def _check_cut(prob: float, min_len: int, length: str) -> None:
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must be in [0, 1], got {prob}")
    if min_len < 1:
        raise ValueError(f"min_len must be >= 1, got {min_len}")
    if length not in LENGTH_DISTRIBUTIONS:
        raise ValueError(f"length must be one of {LENGTH_DISTRIBUTIONS}, got {length!r}")


def _cut_lengths(n: torch.Tensor, u: torch.Tensor, min_len: int, length: str) -> torch.Tensor:
    """Cut lengths k in [min_len, n] (n >= min_len) from uniform draws ``u`` in [0, 1), by ``length``."""
    if length == "uniform":
        k = min_len + (u * (n - min_len + 1).clamp(min=1)).floor().long()
    else:
        ratio = ((n + 1).double() / min_len).clamp(min=1.0)
        k = (min_len * ratio.pow(u.double())).floor().long()
    return torch.minimum(k.clamp(min=min_len), n)


def subsample_sentences(
    gene_ids: torch.Tensor,
    values: torch.Tensor,
    bins: torch.Tensor,
    pad: torch.Tensor,
    generator: torch.Generator | None = None,
    prob: float = 0.5,
    min_len: int = 1,
    length: str = "uniform",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep a random subset of tokens in some sentences; returns (gene_ids, values, bins, pad).

    Each sentence with ``n >= min_len`` tokens is, with probability ``prob``, cut to a random
    subset of ``k`` tokens, ``k`` in ``[min_len, n]`` drawn by ``length``:

    * ``"uniform"``: every ``k`` equally likely. With 128-token sentences a cut sentence has one
      gene with probability 1/128, so single-gene sentences stay rare;
    * ``"log_uniform"``: ``k = floor(min_len · ((n + 1) / min_len)^u)``, ``u`` uniform in [0, 1):
      ``P(k) ∝ log((k + 1) / k)``, as many cut sentences with 1 gene as with 2–3, 4–7, 8–15...
      (for 128 tokens, one gene with probability 1/7).

    The kept tokens keep their relative
    order (by value, descending) and are packed to the front, the rest becomes padding (gene id 0,
    value 0, bin 0, as in gene_sentences.npz). Other sentences are returned unchanged (re-packed to
    the front if their padding was not at the end). Shapes are kept; one pass, no loop over rows.
    """
    _check_cut(prob, min_len, length)
    pad = pad.bool()
    rows, width = pad.shape
    device = pad.device
    n = (~pad).sum(dim=1)
    draw = torch.rand(rows, 2, device=device, generator=generator)
    apply = (draw[:, 0] < prob) & (n >= min_len)
    k = torch.where(apply, _cut_lengths(n, draw[:, 1], min_len, length), n)
    # rank the non-pad slots in a random order; the first k of that order survive
    keys = torch.rand(rows, width, device=device, generator=generator).masked_fill(pad, 2.0)
    rank = keys.argsort(dim=1).argsort(dim=1)
    keep = ~pad & (rank < k[:, None])
    # re-pack: kept slots first, in their original order
    position = torch.arange(width, device=device)[None, :]
    order = (position + (~keep).long() * width).argsort(dim=1)
    keep = keep.gather(1, order)
    out_ids = gene_ids.gather(1, order).masked_fill(~keep, 0)
    out_values = values.gather(1, order).masked_fill(~keep, 0.0)
    out_bins = bins.gather(1, order).masked_fill(~keep, 0)
    return out_ids, out_values, out_bins, ~keep


def vocabulary_sentences(
    gene_ids: torch.Tensor,
    values: torch.Tensor,
    bins: torch.Tensor,
    pad: torch.Tensor,
    dense: torch.Tensor,
    edges: torch.Tensor,
    generator: torch.Generator | None = None,
    prob: float = 0.5,
    min_len: int = 1,
    length: str = "uniform",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replace some sentences by random vocabulary genes AT THEIR VALUES, zeros included.

    ``dense`` (B, G) holds every vocabulary gene's normalised value at each spot (0 where not
    expressed); ``edges`` are the value-bin edges (``value_bins``: bin 0 for 0, else
    ``1 + #edges <= v``). With probability ``prob`` a sentence is replaced by ``k`` genes drawn
    uniformly without replacement from the G vocabulary genes, ``k`` in ``[min_len, min(L, G)]``
    by ``length`` (as :func:`subsample_sentences`; L = the sentence width), each with its value
    and bin at that spot, ordered by value (descending), packed to the front. A gene the spot does
    not express is a token "g at 0" (bin 0, not padding). Other sentences are returned unchanged.

    Why (docs/model.md, "Which genes a cut sentence keeps"): cutting the *expressed* genes never
    shows a value of 0, and a spot's share of short sentences grows as its library shrinks; the
    one-gene prompt "g at v" of zero-shot then reads as "g detected at v", i.e. E[v | v > 0], which
    library-size normalisation makes *larger* in sparse spots. Here the kept genes and their number
    do not depend on the spot, so "g at v" is a draw of (gene, value) at the spot, zeros included.
    """
    _check_cut(prob, min_len, length)
    pad = pad.bool()
    rows, width = pad.shape
    if dense.ndim != 2 or dense.shape[0] != rows:
        raise ValueError(f"dense must be ({rows}, G), got shape {tuple(dense.shape)}")
    n_genes = dense.shape[1]
    device = pad.device
    cap = min(width, n_genes)
    draw = torch.rand(rows, 2, device=device, generator=generator)
    apply = draw[:, 0] < prob
    k = _cut_lengths(torch.full((rows,), cap, device=device), draw[:, 1], min(min_len, cap), length)
    # a random order of the vocabulary per row; its first k genes are kept
    genes = torch.rand(rows, n_genes, device=device, generator=generator).argsort(dim=1)[:, :cap]
    picked = dense.gather(1, genes).to(values.dtype)
    keep = torch.arange(cap, device=device)[None, :] < k[:, None]
    order = picked.masked_fill(~keep, -float("inf")).argsort(dim=1, descending=True, stable=True)
    genes, picked, keep = genes.gather(1, order), picked.gather(1, order), keep.gather(1, order)
    new_bins = torch.bucketize(picked, edges.to(device=device, dtype=picked.dtype), right=True) + 1
    new_bins = torch.where(picked > 0, new_bins, torch.zeros_like(new_bins))
    extra = width - cap  # the vocabulary is smaller than the sentence width: pad the rest
    new = [
        torch.nn.functional.pad(t, (0, extra))
        for t in (genes.masked_fill(~keep, 0), picked.masked_fill(~keep, 0.0), new_bins.masked_fill(~keep, 0))
    ]
    new_pad = torch.nn.functional.pad(~keep, (0, extra), value=True)
    rows_apply = apply[:, None]
    return (
        torch.where(rows_apply, new[0].to(gene_ids.dtype), gene_ids),
        torch.where(rows_apply, new[1], values),
        torch.where(rows_apply, new[2].to(bins.dtype), bins),
        torch.where(rows_apply, new_pad, pad),
    )


def value_probes(
    gene_ids: torch.Tensor,
    values: torch.Tensor,
    bins: torch.Tensor,
    pad: torch.Tensor,
    n_genes: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One-gene prompts "g at v_i(g)" for ``n_genes`` genes of a batch, one per spot.

    ``n_genes`` genes are drawn without replacement (uniformly) among the genes that occur in
    the batch's sentences (all of them when fewer occur). For gene ``g_k`` and spot ``i`` the
    value is ``g_k``'s value in spot ``i``'s sentence and its bin, or 0 and bin 0 when ``g_k``
    is not in that sentence (not expressed, or cut by ``genes.max_len``: the lowest values).
    Pass the sentences *before* sub-sampling, so that a gene is not read as 0 only because a
    sub-sentence dropped it. Returns ``genes`` (K,), ``probe_values`` (K, B), ``probe_bins``
    (K, B), K = min(n_genes, distinct genes in the batch); K = 0 when the batch has no token.
    """
    if n_genes < 1:
        raise ValueError(f"n_genes must be >= 1, got {n_genes}")
    pad = pad.bool()
    present = torch.unique(gene_ids[~pad])
    order = torch.randperm(len(present), device=present.device, generator=generator)
    genes = present[order[:n_genes]]
    match = (gene_ids[None, :, :] == genes[:, None, None]) & ~pad[None]  # (K, B, L)
    probe_values = (match * values[None]).sum(dim=2).to(values.dtype)
    probe_bins = (match * bins[None]).sum(dim=2).to(bins.dtype)
    return genes, probe_values, probe_bins

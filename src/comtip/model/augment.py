"""Sentence augmentation: random sub-sentences, so short (even single-gene) sentences are in
distribution. Zero-shot expression prediction scores an image against sentences of ONE gene at
different values; a model that only ever saw ~full sentences would embed those off-manifold."""

from __future__ import annotations

import torch


def subsample_sentences(gene_ids: torch.Tensor, values: torch.Tensor, bins: torch.Tensor, pad: torch.Tensor,
                        generator: torch.Generator | None = None, prob: float = 0.5,
                        min_len: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep a random subset of tokens in some sentences; returns (gene_ids, values, bins, pad).

    Each sentence with ``n >= min_len`` tokens is, with probability ``prob``, cut to a random
    subset of ``k`` tokens, ``k`` uniform in ``[min_len, n]``; the kept tokens keep their relative
    order (by value, descending) and are packed to the front, the rest becomes padding (gene id 0,
    value 0, bin 0, as in gene_sentences.npz). Other sentences are returned unchanged (re-packed to
    the front if their padding was not at the end). Shapes are kept; one pass, no loop over rows.
    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must be in [0, 1], got {prob}")
    if min_len < 1:
        raise ValueError(f"min_len must be >= 1, got {min_len}")
    pad = pad.bool()
    rows, length = pad.shape
    device = pad.device
    n = (~pad).sum(dim=1)
    draw = torch.rand(rows, 2, device=device, generator=generator)
    apply = (draw[:, 0] < prob) & (n >= min_len)
    k = min_len + (draw[:, 1] * (n - min_len + 1).clamp(min=1)).floor().long()
    k = torch.where(apply, k, n)
    # rank the non-pad slots in a random order; the first k of that order survive
    keys = torch.rand(rows, length, device=device, generator=generator).masked_fill(pad, 2.0)
    rank = keys.argsort(dim=1).argsort(dim=1)
    keep = ~pad & (rank < k[:, None])
    # re-pack: kept slots first, in their original order
    position = torch.arange(length, device=device)[None, :]
    order = (position + (~keep).long() * length).argsort(dim=1)
    keep = keep.gather(1, order)
    out_ids = gene_ids.gather(1, order).masked_fill(~keep, 0)
    out_values = values.gather(1, order).masked_fill(~keep, 0.0)
    out_bins = bins.gather(1, order).masked_fill(~keep, 0)
    return out_ids, out_values, out_bins, ~keep

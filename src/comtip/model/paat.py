"""Pair-aware Adversarial Training (PAAT): make the text encoder care *which* gene has *which* value.

A bag-of-genes encoder can match images well while ignoring the gene–value pairing (the set of
expressed genes alone is informative). PAAT attacks exactly that shortcut, in three parts that
``ModelConfig`` switches independently:

1. **Shuffled hard negatives** (:func:`shuffle_values`): the same genes and the same values,
   re-paired. Appended as extra text negatives of the image→text InfoNCE, an image must prefer its
   true sentence over the re-paired one.
2. **Pair discriminator** (:class:`PairDiscriminator`): an MLP on the sentence representation
   predicts true (1) vs shuffled (0); its BCE gradient flows into the encoder, which must keep
   the pairing in the representation.
3. **Adversarial token perturbation** (:func:`adversarial_delta`): FGSM (``steps == 1``) or PGD
   (``steps > 1``) on the token embeddings, inside an L∞ ball of radius ``ε × RMS(tokens)``,
   maximising the contrastive loss; the InfoNCE of the perturbed sentences is added to the loss,
   so small changes of the (gene + value) embeddings cannot flip the match.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def shuffle_values(
    values: torch.Tensor, bins: torch.Tensor, pad: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Re-pair genes and values within each sentence; returns (values, bins, changed).

    Each sentence's non-pad slots are put in a random order and each slot takes the value (and
    its bin) of the next slot in that order, cyclically: a random n-cycle, so no slot keeps its
    own value. Gene multiset and value multiset are unchanged. If a sentence has ≥ 2 distinct
    values, at least one gene's value changes (if none did, all values along the cycle would be
    equal); ``changed`` (B,) is True exactly for those rows — length-0/1 sentences and sentences
    of equal values are unchanged and must not be used as negatives. Vectorised, no loop over rows.
    """
    pad = pad.bool()
    rows, length = values.shape
    keys = torch.rand(rows, length, device=values.device, generator=generator)
    keys = keys.masked_fill(pad, 2.0)  # pad slots sort last
    order = keys.argsort(dim=1)  # first n_i entries: the non-pad slots of row i, random order
    n = (~pad).sum(dim=1, keepdim=True)
    nxt = torch.arange(1, length + 1, device=values.device).expand(rows, -1)
    nxt = torch.where(nxt >= n, torch.zeros_like(nxt), nxt)  # cycle back to the first slot
    in_cycle = torch.arange(length, device=values.device)[None, :] < n
    # slot order[:, j] receives the entry of slot source[:, j]; pad slots keep their own
    source = torch.where(in_cycle, order.gather(1, nxt), order)
    new_values = torch.empty_like(values).scatter_(1, order, values.gather(1, source))
    new_bins = torch.empty_like(bins).scatter_(1, order, bins.gather(1, source))
    changed = ((new_values != values) | (new_bins != bins)).any(dim=1)
    return new_values, new_bins, changed


class PairDiscriminator(nn.Module):
    """MLP on the sentence representation (before projection): true pairing vs shuffled."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 1))

    def forward(self, representation: torch.Tensor) -> torch.Tensor:
        """(B, dim) → (B,) logits of "true pairing"."""
        return self.mlp(representation).squeeze(-1)

    def loss(self, true_rep: torch.Tensor, shuffled_rep: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """BCE over the rows whose shuffle changed something (true → 1, shuffled → 0); 0 if none
        (then still a function of the parameters, so DDP sees them used)."""
        true_logits, shuffled_logits = self(true_rep[valid]), self(shuffled_rep[valid])
        if true_logits.numel() == 0:
            return true_logits.sum()
        logits = torch.cat([true_logits, shuffled_logits])
        labels = torch.cat([torch.ones_like(true_logits), torch.zeros_like(shuffled_logits)])
        return F.binary_cross_entropy_with_logits(logits, labels)


def adversarial_delta(
    tokens: torch.Tensor, pad: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor], epsilon: float, steps: int
) -> torch.Tensor:
    """Perturbation of ``tokens`` (B, L, C) that increases ``loss_fn(tokens + delta)``; detached.

    L∞ ball of radius ``epsilon × RMS`` (RMS over the non-pad token entries of the batch,
    detached): every coordinate moves by at most that much, which bounds the change of each token
    relative to the typical token size whatever the embedding width. ``steps == 1`` is FGSM
    (``delta = r·sign(∇)``); ``steps > 1`` is PGD with step ``2.5·r / steps`` and projection
    back onto the ball after each step, started at 0 so that one step is exactly FGSM. Pad
    positions are never perturbed. The model parameters get no gradient from this search,
    which also runs under ``torch.no_grad`` (validation) so that the loss means the same there.
    """
    keep = (~pad.bool()).unsqueeze(-1).to(tokens.dtype)
    base = tokens.detach()
    n_entries = keep.sum() * tokens.shape[-1]
    rms = ((base.square() * keep).sum() / n_entries.clamp(min=1)).sqrt()
    radius = epsilon * rms
    step = radius if steps == 1 else 2.5 * radius / steps
    delta = torch.zeros_like(base)
    with torch.enable_grad():  # also under no_grad (validation): the attack needs ∇ wrt delta
        for _ in range(steps):
            delta.requires_grad_(True)
            (grad,) = torch.autograd.grad(loss_fn(base + delta), delta)
            delta = (delta.detach() + step * grad.sign() * keep).clamp(-radius, radius)
    return delta

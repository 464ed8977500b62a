"""Contrastive loss (symmetric InfoNCE) with negatives gathered from every process.

Notation: a process holds ``B`` L2-normalised image embeddings ``u_i`` and sentence embeddings
``v_i``; gathered over ``W`` processes they are ``U`` and ``V`` (``W·B`` rows, this process's
rows at offset ``r·B``, ``r`` = rank). With logit scale ``s`` (= 1 / temperature)::

    L_i2t = -(1/B) Σ_i log( exp(s u_i·v_{rB+i}) / (Σ_j exp(s u_i·V_j) + Σ_k m_k exp(s u_i·N_k)) )
    L_t2i = -(1/B) Σ_i log( exp(s v_i·u_{rB+i}) /  Σ_j exp(s v_i·U_j) )
    L     = (L_i2t + L_t2i) / 2

``N_k`` are optional extra text negatives (PAAT's shuffled sentences, gathered too) with a 0/1
mask ``m_k``; they enter only the image→text direction because they are not the caption of any
image. The mean of ``L`` over the processes is exactly the loss of the whole global batch
computed in one process, so a single process and ``W`` processes train the same objective.

The sigmoid loss (SigLIP, Zhai et al. 2023; HESCAPE's alternative to InfoNCE) scores every
pair on its own, with a learnable bias ``b``, label ``z = +1`` for a spot's own pair and ``-1``
for every other (and for every kept extra negative)::

    L = -(1/B) Σ_i [ Σ_j log σ(z_ij (s u_i·V_j + b)) + Σ_k m_k log σ(-(s u_i·N_k + b)) ]

Each pair of the global batch is scored once, by the process that holds its image, so the mean
over processes is again the whole batch's loss.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward returns this process's slice of the summed gradient.

    Written here instead of ``torch.distributed.nn.functional.all_gather`` because that function
    is deprecated in torch 2.14 (FutureWarning) and its gloo backward needs all-to-all; this one
    uses only ``all_gather`` and ``all_reduce`` (every backend). The all-reduce sends ``W``× more
    than a reduce-scatter would, which is negligible for (B, D) embeddings.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.rows = x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all processes (rank order) keeping gradients; identity when not
    distributed. Every process must pass the same shape (use ``drop_last`` in the sampler)."""
    if not _distributed():
        return x
    return _GatherWithGrad.apply(x)


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def in_fp32(loss: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Compute ``loss`` (its similarities, logits, softmax) in float32 with autocast off, whatever
    precision the embeddings come in: under bf16 autocast a logit of scale ~14-100 keeps 2-3
    significant digits, too few to rank a batch's negatives. A no-op for float32 inputs outside
    autocast (the CPU path), so CPU results are unchanged."""

    @functools.wraps(loss)
    def wrapper(*args: Any, **kwargs: Any) -> torch.Tensor:
        def up(x: Any) -> Any:
            return x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x

        device = next(a for a in args if isinstance(a, torch.Tensor)).device.type
        with torch.autocast(device_type=device, enabled=False):
            return loss(*map(up, args), **{k: up(v) for k, v in kwargs.items()})

    return wrapper


@in_fp32
def info_nce(
    img: torch.Tensor,
    txt: torch.Tensor,
    logit_scale: torch.Tensor | float,
    extra_txt_negatives: torch.Tensor | None = None,
    extra_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE of paired, L2-normalised ``img`` (B, D) and ``txt`` (B, D).

    See the module docstring for the formula. ``extra_txt_negatives`` (K, D) are appended to the
    text candidates of every image (image→text direction only); ``extra_mask`` (K,) bool drops
    some of them (e.g. single-gene sentences, whose shuffle equals the original) while keeping
    the shapes equal across processes. Under torch.distributed all inputs are gathered with
    gradients and the labels are offset by ``rank × B``.
    """
    if img.shape != txt.shape:
        raise ValueError(f"img {tuple(img.shape)} and txt {tuple(txt.shape)} must have the same shape")
    rows = img.shape[0]
    labels = torch.arange(rows, device=img.device) + _rank() * rows
    all_img, all_txt = gather_with_grad(img), gather_with_grad(txt)
    logits_i2t = logit_scale * img @ all_txt.T
    if extra_txt_negatives is not None:
        extra = logit_scale * img @ gather_with_grad(extra_txt_negatives).T
        if extra_mask is not None:
            if extra_mask.shape != extra_txt_negatives.shape[:1]:
                raise ValueError("extra_mask must have one entry per extra negative")
            keep = gather_with_grad(extra_mask.to(extra.dtype)) > 0.5
            extra = extra.masked_fill(~keep[None, :], float("-inf"))
        logits_i2t = torch.cat([logits_i2t, extra], dim=1)
    logits_t2i = logit_scale * txt @ all_img.T
    return 0.5 * (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels))


@in_fp32
def siglip(
    img: torch.Tensor,
    txt: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    extra_txt_negatives: torch.Tensor | None = None,
    extra_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sigmoid contrastive loss of paired, L2-normalised ``img`` (B, D) and ``txt`` (B, D): the
    module docstring's formula, with the same extra negatives, mask and gathering as
    :func:`info_nce`."""
    if img.shape != txt.shape:
        raise ValueError(f"img {tuple(img.shape)} and txt {tuple(txt.shape)} must have the same shape")
    rows = img.shape[0]
    logits = logit_scale * img @ gather_with_grad(txt).T + logit_bias
    signs = -torch.ones_like(logits)
    signs[torch.arange(rows, device=img.device), torch.arange(rows, device=img.device) + _rank() * rows] = 1.0
    total = -F.logsigmoid(signs * logits).sum()
    if extra_txt_negatives is not None:
        extra = logit_scale * img @ gather_with_grad(extra_txt_negatives).T + logit_bias
        terms = -F.logsigmoid(-extra)
        if extra_mask is not None:
            if extra_mask.shape != extra_txt_negatives.shape[:1]:
                raise ValueError("extra_mask must have one entry per extra negative")
            terms = terms * gather_with_grad(extra_mask.to(terms.dtype))[None, :]
        total = total + terms.sum()
    return total / rows


@in_fp32
def value_contrast(
    img: torch.Tensor, probe_txt: torch.Tensor, probe_values: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    """Gene-value contrast: for each probed gene, each image picks the prompt with its own value.

    ``img`` (B, D) and ``probe_txt`` (K, B, D) are L2-normalised; ``probe_txt[k, j]`` embeds the
    one-gene sentence "g_k at probe_values[k, j]" (spot j's value of gene k). With
    ``s_kij = scale · img_i · probe_txt[k, j]``::

        L = mean over (k, i) with a negative of  −log( exp(s_kii) / Σ_{j ∈ C_ki} exp(s_kij) )

    where ``C_ki`` = {i} ∪ {j : probe_values[k, j] ≠ probe_values[k, i]}: prompts with the same
    value as the true one are not negatives (they are the same sentence), prompts with another
    value count once per spot that has it (negatives drawn from the batch's value distribution).
    A row whose gene has the same value in every spot has no negative and is left out; with
    none left the loss is 0 (still a function of the inputs). This is the image→text InfoNCE of
    the zero-shot prompts themselves, local to the process (no gather: K·B prompts per step).
    """
    if probe_txt.ndim != 3 or probe_txt.shape[1:] != img.shape or probe_values.shape != probe_txt.shape[:2]:
        raise ValueError(
            f"img {tuple(img.shape)}, probe_txt {tuple(probe_txt.shape)} and probe_values "
            f"{tuple(probe_values.shape)} do not match: need (B, D), (K, B, D), (K, B)"
        )
    logits = logit_scale * torch.einsum("bd,kjd->kbj", img, probe_txt)  # (K, B, B)
    same = probe_values[:, :, None] == probe_values[:, None, :]  # (K, i, j)
    eye = torch.eye(img.shape[0], dtype=torch.bool, device=img.device)[None]
    logits = logits.masked_fill(same & ~eye, float("-inf"))
    has_negative = (~same).any(dim=2)  # (K, B)
    log_p = logits.diagonal(dim1=1, dim2=2) - torch.logsumexp(logits, dim=2)
    if not has_negative.any():
        return logits.new_zeros(()) + 0.0 * probe_txt.sum()
    return -log_p[has_negative].mean()

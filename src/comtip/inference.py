"""Inference with a pretrained CoMTIP: image embeddings and backbone features of spot patches,
and zero-shot expression from gene-value prompts.

Patches are read from the (memory-mapped) ``spot_patches.npy`` one batch at a time, so a slide
never has to fit in memory. The model runs in eval mode under ``no_grad`` and its previous
mode (and vocabulary, for zero-shot) is restored afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from comtip.genes import value_bins
from comtip.model import CoMTIP, preprocess_images

NORM_TOLERANCE = 1e-3


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd for the block; the previous mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _map_patches(model: CoMTIP, patches: np.ndarray, image_size: int, batch_size: int, device: str | torch.device,
                 fn: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
    """Apply ``fn`` (preprocessed images → (B, K)) to uint8 (N, H, W, 3) patches in batches."""
    if len(patches.shape) != 4 or patches.shape[-1] != 3:
        raise ValueError(f"patches must be (N, H, W, 3), got shape {tuple(patches.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model.to(device)
    out = []
    with _eval_mode(model):
        for lo in range(0, len(patches), batch_size):
            chunk = torch.from_numpy(np.array(patches[lo:lo + batch_size])).to(device)  # a copy: memmaps are read-only
            out.append(fn(preprocess_images(chunk, image_size)).float().cpu().numpy())
    if not out:
        raise ValueError("no patches to embed")
    return np.concatenate(out)


def image_embeddings(model: CoMTIP, patches: np.ndarray, image_size: int, *, batch_size: int = 256,
                     device: str | torch.device = "cpu") -> np.ndarray:
    """uint8 (N, H, W, 3) patches (an array or a read-only memmap) → (N, D) L2-normalised
    embeddings in the shared image-gene space (``model.encode_image``). Moves ``model`` to
    ``device``."""
    return _map_patches(model, patches, image_size, batch_size, device, model.encode_image)


def _pooled_features(model: CoMTIP, images: torch.Tensor) -> torch.Tensor:
    vit = model.vision.vit
    return vit.forward_head(vit.forward_features(images), pre_logits=True)


def image_features(model: CoMTIP, patches: np.ndarray, image_size: int, *, batch_size: int = 256,
                   device: str | torch.device = "cpu") -> np.ndarray:
    """uint8 (N, H, W, 3) patches → (N, C) pooled ViT features BEFORE the projection to the shared
    space (timm ``forward_features`` + ``forward_head(pre_logits=True)``: the class token after the
    final norm for these ViTs), not normalised. These are the encoder features a HEST-style
    linear probe uses; ``model.vision.proj`` of them, L2-normalised, is :func:`image_embeddings`."""
    return _map_patches(model, patches, image_size, batch_size, device, lambda x: _pooled_features(model, x))


def default_value_grid(train_values: np.ndarray, n: int = 16) -> np.ndarray:
    """``n`` evenly spaced values from 0 to the largest training value of the panel (float32):
    the candidate expression levels of zero-shot prediction. Only training values set the range."""
    top = float(np.max(train_values))
    if not np.isfinite(top) or top <= 0:
        raise ValueError(f"training values must have a finite positive maximum, got {top}")
    if n < 2:
        raise ValueError(f"the value grid needs at least 2 points, got {n}")
    return np.linspace(0.0, top, n, dtype=np.float32)


def zero_shot(model: CoMTIP, image_emb: np.ndarray, genes: Sequence[str], value_grid: np.ndarray,
              bin_edges: np.ndarray, *, temperature: float | None = None, batch_size: int = 1024,
              device: str | torch.device = "cpu") -> np.ndarray:
    """Zero-shot expression (N, G) from image embeddings and gene-value prompts.

    For gene g and grid value v_j the prompt is the one-token sentence "g at v_j": gene id of g in
    the vocabulary ``genes`` (set with ``model.set_vocabulary``, so genes unseen in pretraining
    get embeddings from their names), value v_j, bin ``value_bins(v_j, bin_edges)``, no padding.
    Its embedding t_{g,j} = ``encode_sentences`` (L2-normalised). For spot i with embedding x_i:

        s_{i,g,j} = scale · x_i · t_{g,j},   p_{i,g,j} = softmax_j(s_{i,g,j}),   ŷ_{i,g} = Σ_j p_{i,g,j} · v_j

    with scale = the model's learned, clamped logit scale (``model.scale()``) when ``temperature``
    is None, else 1 / temperature. So ŷ lies within [min v, max v]. ``image_emb`` must be
    L2-normalised (as :func:`image_embeddings` returns). The model's vocabulary and train/eval
    mode are restored afterwards; it is moved to ``device``.

    Caveat: the grid's value 0 falls in bin 0, and pretraining sentences never contain zeros, so
    "g at 0" is a prompt the text encoder has not been trained on.
    """
    grid = np.asarray(value_grid, dtype=np.float32)
    if grid.ndim != 1 or len(grid) < 2:
        raise ValueError(f"value_grid must be 1-D with at least 2 values, got shape {grid.shape}")
    if len(genes) == 0:
        raise ValueError("no genes to predict")
    if temperature is not None and temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    x = torch.as_tensor(np.asarray(image_emb), dtype=torch.float32)
    if x.ndim != 2:
        raise ValueError(f"image_emb must be (N, D), got shape {tuple(x.shape)}")
    norms = x.norm(dim=1)
    if not torch.allclose(norms, torch.ones_like(norms), atol=NORM_TOLERANCE):
        raise ValueError("image_emb rows must be L2-normalised (use image_embeddings)")
    n_genes, n_values = len(genes), len(grid)
    gene_ids = torch.arange(n_genes).repeat_interleave(n_values).unsqueeze(1)  # prompt r = g · V + j
    values = torch.from_numpy(np.tile(grid, n_genes)).unsqueeze(1)
    bins = torch.from_numpy(value_bins(values.numpy(), np.asarray(bin_edges)).astype(np.int64))
    pad = torch.zeros_like(gene_ids, dtype=torch.bool)

    model.to(device)
    previous = list(model.vocabulary)
    model.set_vocabulary(list(genes))
    try:
        with _eval_mode(model):
            text = torch.cat([model.encode_sentences(gene_ids[lo:lo + batch_size].to(device),
                                                     values[lo:lo + batch_size].to(device),
                                                     bins[lo:lo + batch_size].to(device),
                                                     pad[lo:lo + batch_size].to(device)).float()
                              for lo in range(0, len(gene_ids), batch_size)])
            scale = model.scale().float() if temperature is None else torch.tensor(1.0 / temperature)
    finally:
        model.set_vocabulary(previous)
    text = text.reshape(n_genes, n_values, -1)
    if text.shape[-1] != x.shape[1]:
        raise ValueError(f"image_emb has width {x.shape[1]}, the text embeddings {text.shape[-1]}")
    grid_t = torch.from_numpy(grid).to(device)
    out = []
    for lo in range(0, len(x), batch_size):
        scores = torch.einsum("nd,gvd->ngv", x[lo:lo + batch_size].to(device), text) * scale.to(device)
        out.append((F.softmax(scores, dim=-1) * grid_t).sum(dim=-1).cpu())
    return torch.cat(out).numpy()

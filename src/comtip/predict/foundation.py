"""Frozen pathology foundation models (``model.presets``) on spot patches: the rule
``embed_foundation`` that writes each sample's features for the ``ridge_<preset>`` methods.

The model is built at its own input size with random weights and then loaded, strictly, from the
local file that config key ``foundation_models.<preset>`` names
(:func:`comtip.model.foundation.load_foundation_weights`); patches are resized to that size and
normalised with the model's own mean/std, read from the memory-mapped ``spot_patches.npy`` one
batch at a time.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from comtip._core.atomic import atomic_path
from comtip._core.errors import PipelineInputError
from comtip._core.npzmap import open_npz
from comtip.model.foundation import build_foundation_vit, load_foundation_weights, pooled_features
from comtip.model.presets import FoundationPreset, preset
from comtip.model.vision import preprocess_images

log = logging.getLogger(__name__)


def load_foundation_encoder(name: str, weights: str | Path) -> tuple[torch.nn.Module, FoundationPreset]:
    """Preset ``name``'s ViT with the weights of its published file, in eval mode."""
    recipe = preset(name)
    vit = build_foundation_vit(recipe)
    load_foundation_weights(vit, weights, recipe, key=f"foundation_models.{name}")
    return vit.eval(), recipe


def foundation_features(
    vit: torch.nn.Module,
    recipe: FoundationPreset,
    patches: np.ndarray,
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """uint8 (N, H, W, 3) patches (an array or a read-only memmap) → (N, ``recipe.embed_dim``)
    float32 features (:func:`comtip.model.foundation.pooled_features`)."""
    if len(patches.shape) != 4 or patches.shape[-1] != 3:
        raise ValueError(f"patches must be (N, H, W, 3), got shape {tuple(patches.shape)}")
    if len(patches) == 0:
        raise ValueError("no patches to embed")
    vit.to(device)
    out = []
    with torch.no_grad():
        for lo in range(0, len(patches), batch_size):
            chunk = torch.from_numpy(np.array(patches[lo : lo + batch_size])).to(device)
            images = preprocess_images(chunk, recipe.input_size, recipe.mean, recipe.std)
            out.append(pooled_features(vit, recipe, images).float().cpu().numpy())
    return np.concatenate(out)


def embed_foundation_sample(
    name: str,
    weights: str | Path,
    patches_npy: str | Path,
    sentences_npz: str | Path,
    out_npz: str | Path,
    *,
    batch_size: int = 64,
    device: str = "cpu",
    sample: str | None = None,
) -> None:
    """``features`` (the model's own, unprojected), ``image_embeddings`` (the same, L2-normalised:
    what batch mixing reads of every encoder) and the spots' ``barcodes`` of one sample."""
    vit, recipe = load_foundation_encoder(name, weights)
    patches = np.load(patches_npy, mmap_mode="r")
    barcodes = np.asarray(open_npz(sentences_npz)["barcodes"])
    if len(barcodes) != len(patches):
        raise PipelineInputError(
            f"{len(barcodes)} spots, but {len(patches)} patches in {Path(patches_npy).absolute()}",
            sample=sample,
            path=sentences_npz,
        )
    log.info("embedding %d spots with %s on %s", len(patches), recipe.title, device)
    features = foundation_features(vit, recipe, patches, batch_size=batch_size, device=device)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    with atomic_path(out_npz) as tmp, open(tmp, "wb") as fh:
        np.savez(
            fh,
            barcodes=barcodes,
            features=features.astype(np.float32),
            image_embeddings=(features / np.maximum(norms, 1e-12)).astype(np.float32),
        )

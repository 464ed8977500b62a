"""Frozen encoders on spot patches: image embeddings and backbone features of a pretrained (or
seeded random) CoMTIP, and the rule ``embed_spots`` that writes them per sample.

Patches are read from the (memory-mapped) ``spot_patches.npy`` one batch at a time, so a slide
never has to fit in memory. The model runs in eval mode under ``no_grad`` and its previous mode
is restored afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from comtip._core.atomic import atomic_path
from comtip._core.errors import PipelineInputError
from comtip._core.npzmap import open_npz
from comtip.model import CoMTIP, ModelConfig, preprocess_images
from comtip.predict.registry import COMTIP_ENCODERS
from comtip.training.checkpoint import load_pretrained

log = logging.getLogger(__name__)


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd for the block; the previous mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _map_patches(
    model: CoMTIP,
    patches: np.ndarray,
    image_size: int,
    batch_size: int,
    device: str | torch.device,
    fn: Callable[[torch.Tensor], torch.Tensor],
) -> np.ndarray:
    """Apply ``fn`` (preprocessed images → (B, K)) to uint8 (N, H, W, 3) patches in batches."""
    if len(patches.shape) != 4 or patches.shape[-1] != 3:
        raise ValueError(f"patches must be (N, H, W, 3), got shape {tuple(patches.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model.to(device)
    out = []
    with eval_mode(model):
        for lo in range(0, len(patches), batch_size):
            chunk = torch.from_numpy(np.array(patches[lo : lo + batch_size])).to(
                device
            )  # a copy: memmaps are read-only
            out.append(
                fn(preprocess_images(chunk, image_size, model.cfg.image_mean, model.cfg.image_std))
                .float()
                .cpu()
                .numpy()
            )
    if not out:
        raise ValueError("no patches to embed")
    return np.concatenate(out)


def image_embeddings(
    model: CoMTIP, patches: np.ndarray, image_size: int, *, batch_size: int = 256, device: str | torch.device = "cpu"
) -> np.ndarray:
    """uint8 (N, H, W, 3) patches (an array or a read-only memmap) → (N, D) L2-normalised
    embeddings in the shared image-gene space (``model.encode_image``). Moves ``model`` to
    ``device``."""
    return _map_patches(model, patches, image_size, batch_size, device, model.encode_image)


def _pooled_features(model: CoMTIP, images: torch.Tensor) -> torch.Tensor:
    vit = model.vision.vit
    return vit.forward_head(vit.forward_features(images), pre_logits=True)


def image_features(
    model: CoMTIP, patches: np.ndarray, image_size: int, *, batch_size: int = 256, device: str | torch.device = "cpu"
) -> np.ndarray:
    """uint8 (N, H, W, 3) patches → (N, C) pooled ViT features BEFORE the projection to the shared
    space (timm ``forward_features`` + ``forward_head(pre_logits=True)``: the class token after the
    final norm for these ViTs), not normalised. These are the encoder features a HEST-style
    linear probe uses; ``model.vision.proj`` of them, L2-normalised, is :func:`image_embeddings`."""
    return _map_patches(model, patches, image_size, batch_size, device, lambda x: _pooled_features(model, x))


def image_features_and_embeddings(
    model: CoMTIP, patches: np.ndarray, image_size: int, *, batch_size: int = 256, device: str | torch.device = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`image_features` and :func:`image_embeddings` of the same patches from ONE pass of
    the ViT over them (the embedding is the projection of the pooled features): half the encoder
    cost of calling both."""
    width = model.vision.proj.in_features

    def both(images: torch.Tensor) -> torch.Tensor:
        pooled = _pooled_features(model, images)
        return torch.cat([pooled, F.normalize(model.vision.proj(pooled), dim=-1)], dim=1)

    joined = _map_patches(model, patches, image_size, batch_size, device, both)
    return joined[:, :width], joined[:, width:]


def load_encoder(checkpoint: str | Path, encoder: str, seed: int) -> tuple[CoMTIP, dict]:
    """The pretrained model, or a seeded random initialisation of the same architecture (never
    from the config's ``pretrained_weights``: ``random`` means random)."""
    model, info = load_pretrained(checkpoint)
    if encoder == "random":
        torch.manual_seed(seed)
        model = CoMTIP(ModelConfig.architecture(info["model_config"]), info["vocabulary"]).eval()
    elif encoder not in COMTIP_ENCODERS:  # comtip or an ablation: the checkpoint as trained
        raise ValueError(f"encoder must be one of {COMTIP_ENCODERS}, got {encoder!r}")
    return model, info


def embed_sample(
    checkpoint: str | Path,
    patches_npy: str | Path,
    sentences_npz: str | Path,
    out_npz: str | Path,
    *,
    encoder: str,
    seed: int,
    batch_size: int = 128,
    device: str = "cpu",
    sample: str | None = None,
) -> None:
    """Image features (pre-projection), image embeddings and sentence embeddings of one sample."""
    model, info = load_encoder(checkpoint, encoder, seed)
    image_size = int(info["model_config"]["image_size"])
    patches = np.load(patches_npy, mmap_mode="r")
    sentences = open_npz(sentences_npz)  # memory-mapped: each batch reads its own rows only
    if list(sentences["vocabulary"]) != list(info["vocabulary"]):
        raise PipelineInputError(
            f"gene vocabulary differs from that of {Path(checkpoint).absolute()}; build the "
            "gene sentences and the checkpoint from the same gene_panel.tsv",
            sample=sample,
            path=sentences_npz,
        )
    log.info("embedding %d spots with the %s encoder on %s", len(patches), encoder, device)
    features, embeddings = image_features_and_embeddings(
        model, patches, image_size, batch_size=batch_size, device=device
    )
    text = []
    with eval_mode(model):
        for start in range(0, len(patches), batch_size):
            part = slice(start, start + batch_size)
            text.append(
                model.encode_sentences(
                    torch.as_tensor(np.array(sentences["gene_ids"][part]), dtype=torch.long, device=device),
                    torch.as_tensor(np.array(sentences["values"][part]), dtype=torch.float32, device=device),
                    torch.as_tensor(np.array(sentences["bins"][part]), dtype=torch.long, device=device),
                    torch.as_tensor(np.array(sentences["pad"][part]), dtype=torch.bool, device=device),
                )
                .cpu()
                .numpy()
            )
    with atomic_path(out_npz) as tmp, open(tmp, "wb") as fh:
        np.savez(
            fh,
            barcodes=sentences["barcodes"],
            features=features.astype(np.float32),
            image_embeddings=embeddings.astype(np.float32),
            sentence_embeddings=np.concatenate(text).astype(np.float32),
        )

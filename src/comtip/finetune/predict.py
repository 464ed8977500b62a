"""Prediction with a fine-tuned model: the checkpoint rebuilt as a callable on uint8 patches, and
the predictions of every patch of a sample (rule ``predict_finetuned``)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from comtip._core.devices import deterministic_on_cpu, resolve_device
from comtip._core.errors import PipelineInputError
from comtip._core.provenance import file_sha256
from comtip.finetune.head import CHECKPOINT_KIND, FORMAT_VERSION, ExpressionHead, build_vit, pooled_features
from comtip.training.checkpoint import load_pretrained

log = logging.getLogger(__name__)


class FinetunedPredictor:
    """A fine-tuned model as a callable: uint8 (B, H, W, 3) patches → (B, P) float32 predictions
    (normalised log1p CP10k of ``genes``), usable by :func:`comtip.predict.slides.predict_slide`."""

    def __init__(
        self, vit: nn.Module, head: ExpressionHead, image_size: int, genes: list[str], device: torch.device
    ) -> None:
        self.vit, self.head, self.image_size = vit.eval(), head.eval(), image_size
        self.genes, self.device = genes, device

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        batch = torch.from_numpy(np.array(images, dtype=np.uint8)).to(self.device)  # a copy: may be a read-only memmap
        return self.head(pooled_features(self.vit, batch, self.image_size)).float().cpu().numpy()


def load_finetuned(
    ckpt: str | Path, *, pretrained_ckpt: str | Path | None = None, device: str = "auto"
) -> FinetunedPredictor:
    """Rebuild the predictor of a :func:`finetune` checkpoint.

    A ``full`` checkpoint holds its encoder. A ``linear`` one holds only the head and names the
    pretrained checkpoint whose frozen encoder it was trained on (``pretrained_ckpt`` overrides
    that path, e.g. after moving ``results/``); the file must be byte-identical to the one used
    for training (sha256), because a head on another encoder's features predicts nonsense.
    """
    where = resolve_device(device)
    state = torch.load(ckpt, map_location=where, weights_only=True)
    if state.get("kind") != CHECKPOINT_KIND or state.get("format_version") != FORMAT_VERSION:
        raise PipelineInputError(
            f"not a fine-tuning checkpoint of format {FORMAT_VERSION} (kind "
            f"{state.get('kind')!r}, format_version {state.get('format_version')!r})",
            path=ckpt,
        )
    if state["encoder_state"] is not None:
        vit = build_vit(state["model_config"])
        vit.load_state_dict(state["encoder_state"])
    else:
        source = Path(pretrained_ckpt if pretrained_ckpt is not None else state["pretrained"]["path"])
        if not source.is_file():
            raise PipelineInputError(
                f"a linear probe on the encoder of {source.absolute()}, which does not exist; pass pretrained_ckpt",
                path=ckpt,
            )
        if file_sha256(source) != state["pretrained"]["sha256"]:
            raise PipelineInputError(
                f"not the pretrained checkpoint the linear probe {Path(ckpt).absolute()} "
                "was trained on (sha256 differs); fine-tune again",
                path=source,
            )
        vit = load_pretrained(source, map_location=where)[0].vision.vit
    head_state = state["head_state"]
    head = ExpressionHead(head_state["feature_mean"], head_state["feature_std"], head_state["linear.bias"])
    head.load_state_dict(head_state)
    log.info("fine-tuned head %s (%d genes) on %s", Path(ckpt).name, len(state["panel_genes"]), where)
    return FinetunedPredictor(
        vit.to(where), head.to(where), int(state["model_config"]["image_size"]), list(state["panel_genes"]), where
    )


def predict_images(predictor: Callable[[np.ndarray], np.ndarray], images: np.ndarray, batch_size: int) -> np.ndarray:
    """Run ``predictor`` over a (possibly memory-mapped) uint8 (N, H, W, 3) array in batches."""
    return np.concatenate(
        [
            np.asarray(predictor(np.asarray(images[start : start + batch_size])), np.float32)
            for start in range(0, len(images), batch_size)
        ]
    )


def predict_finetuned(
    ckpt: str | Path,
    patches_npy: str | Path,
    *,
    batch_size: int = 64,
    pretrained_ckpt: str | Path | None = None,
    device: str = "auto",
) -> np.ndarray:
    """(N, P) predictions of the fine-tuned model for every patch of ``patches_npy`` (row order
    kept), P = the checkpoint's panel genes; patches are read in batches from the memory map."""
    predictor = load_finetuned(ckpt, pretrained_ckpt=pretrained_ckpt, device=device)
    images = np.load(patches_npy, mmap_mode="r")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise PipelineInputError(
            f"expected uint8 patches of shape (N, H, W, 3), found {images.dtype} {images.shape}", path=patches_npy
        )
    with deterministic_on_cpu(predictor.device):
        return predict_images(predictor, images, batch_size)

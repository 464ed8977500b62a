"""Tiny fine-tuning slides whose expression is a function of patch brightness, and a randomly
initialised tiny pretrained checkpoint (test_finetune, test_predict)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from comtip.model import CoMTIP, ModelConfig
from comtip.training import TrainConfig
from comtip.training.checkpoint import final_state

GENES = ["EPCAM", "PTPRC", "ACTB", "KRT19"]
VOCAB = ["EPCAM", "PTPRC", "KRT19"]  # ACTB held out of pretraining, still predicted
TINY_MODEL = {
    "image_size": 32,
    "vision_kwargs": {"depth": 2, "patch_size": 8, "embed_dim": 64, "num_heads": 2},
    "embed_dim": 32,
    "mfm_heads": 2,
    "text_dim": 32,
    "text_heads": 2,
    "text_ff": 64,
    "name_buckets": 1024,
    "paat": False,
}


def save_pretrained(path: Path, seed: int = 0) -> Path:
    """A randomly initialised tiny CoMTIP in the checkpoint format pretraining writes."""
    torch.manual_seed(seed)
    model = CoMTIP(ModelConfig.from_dict(TINY_MODEL), VOCAB)
    torch.save(
        final_state(
            model,
            model_config=ModelConfig.from_dict(TINY_MODEL).to_dict(),
            train_config=TrainConfig().to_dict(),
            vocabulary=VOCAB,
            bin_edges=[0.5, 1.0],
            step=0,
            fingerprint={},
        ),
        path,
    )
    return path


def expression(brightness: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Panel values that depend on brightness (two linearly, one quadratically) and one that
    does not (pure noise): what a probe can learn and what it cannot."""
    b = brightness
    return np.column_stack(
        [2 * b + 0.5, 2 * (1 - b), 1 + 0.1 * rng.standard_normal(len(b)), 4 * (b - 0.55) ** 2]
    ).astype(np.float32)


def write_sample(
    root: Path, name: str, n: int, seed: int, *, invert: bool = False, size: int = 32, genes: list[str] = GENES
) -> tuple[Path, Path]:
    """``spot_patches.npy`` + ``gene_sentences.npz`` of one synthetic slide: pinkish patches of
    random brightness with pixel noise. ``invert`` pairs dark patches with bright expression."""
    rng = np.random.default_rng(seed)
    brightness = rng.uniform(0.2, 0.9, n)
    tint = np.array([235.0, 160.0, 210.0])
    pixels = brightness[:, None, None, None] * tint + rng.normal(0, 12, (n, size, size, 3))
    patches = np.clip(pixels, 0, 255).astype(np.uint8)
    values = expression(1.1 - brightness if invert else brightness, rng)
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "spot_patches.npy", patches)
    np.savez(
        folder / "gene_sentences.npz",
        panel_values=values,
        panel_genes=np.asarray(genes),
        barcodes=np.asarray([f"{name}-{i}" for i in range(n)]),
    )
    return folder / "spot_patches.npy", folder / "gene_sentences.npz"

"""Tiny pretraining cohorts (an easy, learnable image-sentence pairing) and the model and
training configs small enough for them (test_train, test_launch; the ``cohort`` fixture of
conftest.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

EDGES = [0.5, 1.0, 2.0]
N_GENES = 10
# A model small enough for a step to take milliseconds on 2 CPU cores, with every part switched on.
TINY_MODEL = {
    "image_size": 16,
    "vision_kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2, "patch_size": 8},
    "embed_dim": 16,
    "text_dim": 16,
    "text_layers": 1,
    "text_heads": 2,
    "text_ff": 32,
    "n_bins": len(EDGES) + 2,
    "name_buckets": 128,
}
# 2 samples x 40 spots (the last of each empty) = 78 spots -> 4 steps of 2 x 8 per epoch, 12 steps.
TINY_TRAIN = {
    "epochs": 3,
    "batch_size": 8,
    "grad_accum": 2,
    "lr": 2e-3,
    "warmup_steps": 3,
    "log_every": 2,
    "checkpoint_every": 4,
    "seed": 3,
    "subsample_prob": 0.5,
    "subsample_min_len": 2,
    "retrieval_spots": 30,
}


def write_sample(
    root: Path, name: str, n: int, *, seed: int, size: int = 32, vocabulary: list[str] | None = None
) -> dict[str, Path]:
    """Patches whose colour is a 3-d latent and sentences that are a fixed function of it (an
    easy, learnable pairing); the last spot expresses nothing (all padding)."""
    rng = np.random.default_rng(seed)
    latent = rng.uniform(0, 1, (n, 3))
    images = latent[:, None, None, :] * 200 + 20 + rng.normal(0, 4, (n, size, size, 3))
    weights = np.random.default_rng(99).normal(0, 1, (3, N_GENES))
    values = np.maximum(0, (latent - 0.5) @ weights * 2 + 0.3)
    values[-1] = 0
    order = np.argsort(-values, axis=1, kind="stable")
    picked = np.take_along_axis(values, order, axis=1)
    pad = picked <= 0
    vocab = vocabulary or [f"GENE{i}" for i in range(N_GENES)]
    return _save_sample(root, name, images, order, picked, pad, vocab, values)


def _save_sample(
    root: Path,
    name: str,
    images: np.ndarray,
    order: np.ndarray,
    picked: np.ndarray,
    pad: np.ndarray,
    vocab: list[str],
    values: np.ndarray,
) -> dict[str, Path]:
    """Patches, patch index and gene sentences of one sample, as the pipeline writes them."""
    barcodes = np.array([f"{name}-{i:04d}" for i in range(len(images))])
    folder = root / name
    folder.mkdir(parents=True)
    files = {
        "patches": folder / "spot_patches.npy",
        "index": folder / "spot_patches.parquet",
        "sentences": folder / "gene_sentences.npz",
    }
    np.save(files["patches"], images.clip(0, 255).astype(np.uint8))
    pd.DataFrame({"barcode": barcodes}).to_parquet(files["index"])
    np.savez(
        files["sentences"],
        barcodes=barcodes,
        gene_ids=np.where(pad, 0, order).astype(np.int32),
        values=np.where(pad, 0, picked).astype(np.float32),
        bins=np.where(pad, 0, np.digitize(picked, EDGES) + 1).astype(np.int16),
        pad=pad,
        vocabulary=np.array(vocab),
        panel_genes=np.array(vocab),
        panel_values=values.astype(np.float32),
    )
    return files


def write_dense_sample(
    root: Path, name: str, n: int, *, seed: int, size: int = 32, n_genes: int = 32
) -> dict[str, Path]:
    """As :func:`write_sample`, but every gene is expressed in every spot (base level + a small
    latent-driven change): all sentences hold the same genes and differ only in their values, as
    Visium sentences of the most expressed genes do. Here the sentence-level differences are
    small next to the token embeddings, which is where PAAT's adversarial term can win over the
    alignment."""
    rng = np.random.default_rng(seed)
    latent = rng.uniform(0, 1, (n, 3))
    images = latent[:, None, None, :] * 200 + 20 + rng.normal(0, 4, (n, size, size, 3))
    base = np.random.default_rng(98).uniform(1, 3, n_genes)
    values = np.maximum(base + 0.3 * (latent - 0.5) @ np.random.default_rng(99).normal(0, 1, (3, n_genes)), 0.05)
    order = np.argsort(-values, axis=1, kind="stable")
    picked = np.take_along_axis(values, order, axis=1)
    vocab = [f"GENE{i}" for i in range(n_genes)]
    return _save_sample(root, name, images, order, picked, np.zeros(picked.shape, bool), vocab, values)


def make_cohort(root: Path, n: int = 40, writer=write_sample) -> dict:
    """Two samples ``s0``, ``s1`` of ``n`` spots (``writer`` writes each) and the value bins: the
    keyword arguments of ``pretrain`` that name its inputs."""
    files = [writer(root, f"s{i}", n, seed=i) for i in range(2)]
    bins = root / "genes" / "value_bins.tsv"
    bins.parent.mkdir(parents=True)
    pd.DataFrame({"edge": EDGES}).to_csv(bins, sep="\t", index=False)
    return {
        "samples": ["s0", "s1"],
        "patches": [f["patches"] for f in files],
        "indexes": [f["index"] for f in files],
        "sentences": [f["sentences"] for f in files],
        "bins_tsv": bins,
    }

"""Fine-tuning data: memory-mapped patches and ``panel_values`` targets of whole samples, and the
pooled features of every spot."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from comtip._core.errors import PipelineInputError
from comtip.finetune.head import pooled_features


@dataclass
class ExpressionData:
    """Spots of several samples: memory-mapped patches, in-memory targets, one global index."""

    patches: list[np.ndarray]  # per sample, uint8 (N_k, H, W, 3), memory-mapped
    targets: np.ndarray  # (N, P) float32, all samples concatenated
    sample_of: np.ndarray  # (N,) sample index
    row_of: np.ndarray  # (N,) row within the sample
    genes: list[str]

    def __len__(self) -> int:
        return len(self.targets)

    def images(self, indices: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W, 3) patches of the global ``indices``, in that order."""
        shape = self.patches[0].shape[1:]
        out = np.empty((len(indices), *shape), np.uint8)
        owners = self.sample_of[indices]
        for k in np.unique(owners):
            where = np.flatnonzero(owners == k)
            rows = self.row_of[indices[where]]
            order = np.argsort(rows, kind="stable")  # ascending rows: sequential reads of the mmap
            out[where[order]] = self.patches[int(k)][rows[order]]
        return out


def load_samples(
    pairs: Sequence[tuple[str | Path, str | Path]], genes: list[str] | None = None
) -> ExpressionData | None:
    """Patches and ``panel_values`` of (patches_npy, sentences_npz) pairs; None for no pair.

    Rows must be aligned (both files are in spots.h5ad order by construction, so the counts are
    checked); every sample must have the same panel (``genes`` when given) and patch shape.
    """
    if not pairs:
        return None
    patches, targets, sample_of, rows = [], [], [], []
    reference = "the training samples"
    for k, (patches_npy, sentences_npz) in enumerate(pairs):
        images = np.load(patches_npy, mmap_mode="r")
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
            raise PipelineInputError(
                f"expected uint8 patches of shape (N, H, W, 3), found {images.dtype} {images.shape}", path=patches_npy
            )
        with np.load(sentences_npz) as npz:
            values = npz["panel_values"].astype(np.float32)
            panel = [str(g) for g in npz["panel_genes"]]
        if genes is None:
            genes, reference = panel, str(Path(sentences_npz).absolute())
        elif panel != genes:
            raise PipelineInputError(
                f"panel genes differ from those of {reference}; build every sample's gene "
                "sentences from the same gene_panel.tsv",
                path=sentences_npz,
            )
        if len(values) != len(images):
            raise PipelineInputError(
                f"{len(values)} spots but {patches_npy} holds {len(images)} patches; "
                "rebuild both from the same spots.h5ad",
                path=sentences_npz,
            )
        if patches and images.shape[1:] != patches[0].shape[1:]:
            raise PipelineInputError(
                f"patches of {images.shape[1:]} differ from {pairs[0][0]}'s {patches[0].shape[1:]}", path=patches_npy
            )
        patches.append(images)
        targets.append(values)
        sample_of.append(np.full(len(values), k, np.int32))
        rows.append(np.arange(len(values)))
    return ExpressionData(
        patches, np.concatenate(targets), np.concatenate(sample_of), np.concatenate(rows), list(genes)
    )


def batches(n: int, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, n, batch_size):
        yield np.arange(start, min(n, start + batch_size))


@torch.no_grad()
def extract_features(
    vit: nn.Module, data: ExpressionData, image_size: int, batch_size: int, device: torch.device
) -> torch.Tensor:
    """Pooled features of every spot (eval mode, no augmentation), (N, C) float32 on ``device``."""
    vit.eval()
    parts = [
        pooled_features(vit, torch.from_numpy(data.images(idx)).to(device), image_size).float()
        for idx in batches(len(data), batch_size)
    ]
    return torch.cat(parts)

"""Training spots of several samples: memory-mapped patches + gene sentences, and the batch order.

Patches stay on disk (``np.load(mmap_mode="r")``; the page cache does the rest) and are read
per batch; sentences (a few bytes per token) are held in memory. The batch order is a pure
function of (seed, epoch, step, rank), so a resumed run reads exactly the batches an
uninterrupted run would have read, and each process of a distributed run reads its own share.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from comtip._core.errors import PipelineInputError
from comtip._core.seeds import derive_seed
from comtip.data.barcodes import first_mismatch, value_at
from comtip.training.config import STREAM_EPOCH

log = logging.getLogger(__name__)

SENTENCE_KEYS = ("gene_ids", "values", "bins", "pad")
# every vocabulary gene's value at the spot, zeros included (pretrain.subsample_genes: vocabulary)
DENSE_KEY = "vocabulary_values"
# what each spot contributes to a batch besides its image
BATCH_KEYS = (*SENTENCE_KEYS, DENSE_KEY)
# dtypes the model takes (batch dict of CoMTIP.forward)
TORCH_DTYPES = {
    "gene_ids": torch.long,
    "values": torch.float32,
    "bins": torch.long,
    "pad": torch.bool,
    DENSE_KEY: torch.float32,
}


@dataclass(frozen=True)
class SampleFiles:
    """The three per-sample files pretraining reads (rows aligned by construction)."""

    name: str
    patches: Path  # spot_patches.npy
    index: Path  # spot_patches.parquet
    sentences: Path  # gene_sentences.npz


def sample_files(
    samples: Sequence[str],
    patches: Sequence[str | Path],
    indexes: Sequence[str | Path],
    sentences: Sequence[str | Path],
) -> list[SampleFiles]:
    if not len(samples) == len(patches) == len(indexes) == len(sentences):
        raise ValueError(
            f"{len(samples)} samples but {len(patches)} patch files, {len(indexes)} patch "
            f"indexes and {len(sentences)} sentence files"
        )
    if not samples:
        raise PipelineInputError("no training sample: pretraining needs at least one sample with split = train")
    return [SampleFiles(s, Path(p), Path(i), Path(t)) for s, p, i, t in zip(samples, patches, indexes, sentences)]


def _open_patches(files: SampleFiles) -> np.ndarray:
    patches = np.load(files.patches, mmap_mode="r")
    if patches.dtype != np.uint8 or patches.ndim != 4 or patches.shape[3] != 3:
        raise PipelineInputError(
            f"expected uint8 patches of shape (N, H, W, 3), found {patches.dtype} {patches.shape}",
            sample=files.name,
            path=files.patches,
        )
    return patches


def _read_sentences(files: SampleFiles, n_patches: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Sentence arrays of one sample, after checking that row i is the spot of patch i."""
    with np.load(files.sentences) as npz:
        arrays = {k: npz[k] for k in (*SENTENCE_KEYS, "barcodes", "vocabulary")}
        panel = [str(g) for g in npz["panel_genes"]]
        column = {g: j for j, g in enumerate(panel)}
        missing = [str(g) for g in arrays["vocabulary"] if str(g) not in column]
        if missing:
            raise PipelineInputError(
                f"vocabulary genes {missing[:3]} are not among panel_genes; rerun build_gene_sentences",
                sample=files.name,
                path=files.sentences,
            )
        arrays[DENSE_KEY] = npz["panel_values"][:, [column[str(g)] for g in arrays["vocabulary"]]].astype(np.float32)
    index_barcodes = pd.read_parquet(files.index, columns=["barcode"])["barcode"].to_numpy(dtype=str)
    if len(index_barcodes) != n_patches:
        raise PipelineInputError(
            f"{len(index_barcodes)} rows but {files.patches.name} holds {n_patches} patches; rerun extract_patches",
            sample=files.name,
            path=files.index,
        )
    barcodes = arrays.pop("barcodes").astype(str)
    if len(barcodes) != n_patches or not np.array_equal(barcodes, index_barcodes):
        mismatch = first_mismatch(barcodes, index_barcodes)
        raise PipelineInputError(
            f"gene sentences are not aligned with the patches: row {mismatch} is barcode "
            f"{value_at(barcodes, mismatch)!r} here but {value_at(index_barcodes, mismatch)!r} in {files.index} "
            f"({len(barcodes)} vs {len(index_barcodes)} rows); rerun build_gene_sentences and "
            "extract_patches from the same spots.h5ad",
            sample=files.name,
            path=files.sentences,
        )
    return arrays, barcodes


class SpotData:
    """Every usable training spot of every sample, addressable by one global index.

    ``data[indices]`` returns a batch: ``images`` uint8 (B, H, W, 3) plus the sentence tensors in
    the dtypes the model takes. Patch files are opened lazily in each process, so the object can
    be handed to DataLoader workers without copying the arrays.
    """

    def __init__(self, samples: Sequence[SampleFiles]):
        self.samples = list(samples)
        shapes, vocabulary, parts, sample_of, rows, digests = [], None, [], [], [], []
        for k, files in enumerate(self.samples):
            patches = _open_patches(files)
            arrays, barcodes = _read_sentences(files, len(patches))
            vocab = [str(g) for g in arrays.pop("vocabulary")]
            if vocabulary is None:
                vocabulary, first = vocab, files
            elif vocab != vocabulary:
                raise PipelineInputError(
                    f"vocabulary differs from the one of sample {first.name} "
                    f"({first.sentences}); rebuild every sample's gene sentences from "
                    "the same gene_panel.tsv",
                    sample=files.name,
                    path=files.sentences,
                )
            if shapes and (patches.shape[1:], arrays["pad"].shape[1]) != shapes[0]:
                raise PipelineInputError(
                    f"patches {patches.shape[1:]} / sentence length {arrays['pad'].shape[1]} differ from sample "
                    f"{self.samples[0].name}'s {shapes[0]}",
                    sample=files.name,
                    path=files.patches,
                )
            shapes.append((patches.shape[1:], arrays["pad"].shape[1]))
            keep = ~arrays["pad"].all(axis=1)
            if not keep.all():
                log.info(
                    "[%s] %d of %d spots express no pretraining gene: skipped",
                    files.name,
                    int((~keep).sum()),
                    len(keep),
                )
            parts.append({key: arrays[key][keep] for key in BATCH_KEYS})
            sample_of.append(np.full(int(keep.sum()), k, np.int32))
            rows.append(np.flatnonzero(keep))
            digests.append(hashlib.sha256("\n".join(barcodes[keep]).encode()).hexdigest())
        assert vocabulary is not None
        self.vocabulary: list[str] = vocabulary
        self.patch_shape: tuple[int, int, int] = tuple(int(v) for v in shapes[0][0])
        self.sentences = {key: np.concatenate([p[key] for p in parts]) for key in BATCH_KEYS}
        self.sample_of = np.concatenate(sample_of)
        self.row_of = np.concatenate(rows)
        if len(self) == 0:
            raise PipelineInputError(
                "no training spot expresses any pretraining gene",
                sample=self.samples[0].name,
                path=self.samples[0].sentences,
            )
        # What a resume checkpoint must have been trained on (cheap to compute, changes whenever
        # a sample, its spots or the gene vocabulary change).
        self.fingerprint = {
            "samples": [f.name for f in self.samples],
            "spots": [int(len(r)) for r in rows],
            "barcodes_sha256": digests,
            "patch_shape": list(self.patch_shape),
            "vocabulary_sha256": hashlib.sha256("\n".join(vocabulary).encode()).hexdigest(),
        }
        self._patches: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.row_of)

    def patches(self, k: int) -> np.ndarray:
        """Memory-mapped patches of sample ``k`` (opened on first use in this process)."""
        if self._patches is None:
            self._patches = [np.load(f.patches, mmap_mode="r") for f in self.samples]
        return self._patches[k]

    def images(self, indices: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W, 3) patches of the global ``indices``, in that order."""
        out = np.empty((len(indices), *self.patch_shape), np.uint8)
        owners = self.sample_of[indices]
        for k in np.unique(owners):
            where = np.flatnonzero(owners == k)
            rows = self.row_of[indices[where]]
            order = np.argsort(rows, kind="stable")  # ascending rows: sequential reads of the mmap
            out[where[order]] = self.patches(int(k))[rows[order]]
        return out

    def __getitem__(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        indices = np.asarray(indices)
        batch = {"images": torch.from_numpy(self.images(indices))}
        for key in BATCH_KEYS:
            batch[key] = torch.from_numpy(self.sentences[key][indices]).to(TORCH_DTYPES[key])
        return batch

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_patches"] = None  # memory maps are reopened by each worker, never pickled
        return state


@dataclass(frozen=True)
class BatchPlan:
    """How the spots are cut into optimiser steps (drop-last: the contrastive loss wants full
    batches), and which slice of a step each process reads."""

    n_spots: int
    batch_size: int
    grad_accum: int
    world_size: int
    seed: int

    @property
    def spots_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        steps = self.n_spots // self.spots_per_step
        if steps == 0:
            raise PipelineInputError(
                f"{self.n_spots} training spots are fewer than one optimiser step needs "
                f"({self.spots_per_step} = batch_size {self.batch_size} x grad_accum {self.grad_accum} x "
                f"{self.world_size} processes); lower pretrain.batch_size"
            )
        return steps

    def permutation(self, epoch: int) -> np.ndarray:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, STREAM_EPOCH, epoch))
        return torch.randperm(self.n_spots, generator=generator).numpy()

    def micro_batch(self, perm: np.ndarray, step_in_epoch: int, micro: int, rank: int) -> np.ndarray:
        start = step_in_epoch * self.spots_per_step + (micro * self.world_size + rank) * self.batch_size
        return perm[start : start + self.batch_size]


class MicroBatches(torch.utils.data.Sampler):
    """Index arrays of this process's micro-batches for optimiser steps ``start..stop-1``."""

    def __init__(self, plan: BatchPlan, rank: int, start: int, stop: int):
        self.plan, self.rank, self.start, self.stop = plan, rank, start, stop

    def __len__(self) -> int:
        return (self.stop - self.start) * self.plan.grad_accum

    def __iter__(self) -> Iterator[np.ndarray]:
        epoch, perm = -1, None
        for step in range(self.start, self.stop):
            step_epoch, step_in_epoch = divmod(step, self.plan.steps_per_epoch)
            if step_epoch != epoch:
                epoch, perm = step_epoch, self.plan.permutation(step_epoch)
            for micro in range(self.plan.grad_accum):
                yield self.plan.micro_batch(perm, step_in_epoch, micro, self.rank)

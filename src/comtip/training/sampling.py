"""The order in which pretraining reads its spots: optimiser steps, each process's share, and
an epoch's permutation that reads patches in contiguous runs.

``pretrain.sampler: uniform`` is one random permutation of all spots per epoch: every batch a
uniform sample of the cohort, and every patch read a random 150 KB read anywhere in the
cohort's patch files (at 200 slides, ~120 GB: more than the page cache holds, so the reads go
to disk one patch at a time).

``pretrain.sampler: blocks`` (the default) keeps batches mixed while the reads become runs:

1. each sample's spots (in patch-file order) are cut into blocks of ``block_size`` consecutive
   spots, and the blocks of all samples are shuffled together;
2. the shuffled sequence is cut into windows of ``shuffle_window`` spots (a shuffle buffer) and
   the spots are shuffled within each window;
3. batches are taken in order.

A batch is thus a random draw from ``shuffle_window / block_size`` random blocks of the whole
cohort — up to that many slides per batch, so InfoNCE's negatives still come from many slides —
and a window's blocks are read whole while its batches are drawn (the data path advises the
kernel to read each block at once: ``comtip.training.data``). On a cohort smaller than one
window (the demo) the order is a uniform permutation. Every spot is seen once per epoch either
way, and the order is a pure function of (seed, epoch), so a resumed run reads the batches an
uninterrupted run would have read. The defaults are argued in ``docs/pretraining.md``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from comtip._core.errors import PipelineInputError
from comtip._core.seeds import derive_seed
from comtip.training.config import SAMPLERS, STREAM_EPOCH, TrainConfig


def block_starts(sample_sizes: Sequence[int], block_size: int) -> np.ndarray:
    """Global index of the first spot of every block (blocks never cross samples), plus the end."""
    starts, offset = [], 0
    for size in sample_sizes:
        starts.append(np.arange(offset, offset + size, block_size))
        offset += size
    return np.concatenate([*starts, [offset]]).astype(np.int64)


def block_permutation(
    sample_sizes: Sequence[int], block_size: int, shuffle_window: int, generator: torch.Generator
) -> np.ndarray:
    """One epoch's order of the global spot indices: shuffled blocks, shuffled within windows."""
    edges = block_starts(sample_sizes, block_size)
    order = torch.randperm(len(edges) - 1, generator=generator).numpy()
    lengths = np.diff(edges)[order]
    # the spots of the blocks in shuffled order, without a Python loop over blocks
    first = np.repeat(edges[:-1][order] - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    sequence = first + np.arange(int(lengths.sum()))
    for lo in range(0, len(sequence), shuffle_window):
        window = sequence[lo : lo + shuffle_window]
        sequence[lo : lo + shuffle_window] = window[torch.randperm(len(window), generator=generator).numpy()]
    return sequence


@dataclass(frozen=True)
class BatchPlan:
    """How the spots are cut into optimiser steps (drop-last: the contrastive loss wants full
    batches), which slice of a step each process reads, and each epoch's order.

    ``sample_sizes`` (spots per sample, in global-index order) is needed by the ``blocks``
    sampler; ``uniform`` reads only ``n_spots``.
    """

    n_spots: int
    batch_size: int
    grad_accum: int
    world_size: int
    seed: int
    sampler: str = "uniform"
    sample_sizes: tuple[int, ...] = ()
    block_size: int = 16
    shuffle_window: int = 4096

    @classmethod
    def for_run(cls, cfg: TrainConfig, sample_sizes: Sequence[int], world_size: int) -> BatchPlan:
        """The plan of a pretraining run with options ``cfg`` on samples of ``sample_sizes`` spots."""
        sizes = tuple(int(n) for n in sample_sizes)
        return cls(
            sum(sizes),
            cfg.batch_size,
            cfg.grad_accum,
            world_size,
            cfg.seed,
            sampler=cfg.sampler,
            sample_sizes=sizes,
            block_size=cfg.block_size,
            shuffle_window=cfg.shuffle_window,
        )

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.sampler == "blocks" and sum(self.sample_sizes) != self.n_spots:
            raise ValueError(f"sample_sizes sum to {sum(self.sample_sizes)}, not n_spots {self.n_spots}")

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
        if self.sampler == "uniform":
            return torch.randperm(self.n_spots, generator=generator).numpy()
        return block_permutation(self.sample_sizes, self.block_size, self.shuffle_window, generator)

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

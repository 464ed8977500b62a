"""mclSTExp trained as itself (rule ``train_mclstexp``), on CoMTIP's pretraining data path and budget.

BLEEP's trainer (``bleep_train.BleepTrainer``: CoMTIP's training spots, batch order, flips and
90° rotations, resume checkpoints, seed streams and DDP) with mclSTExp's model
(``mclstexp_model.MclSTExp``), its optimiser (Adam, lr 1e-4, weight decay 1e-3 as an L2 term, on
every parameter, constant lr, no clipping), its colour jitter (0.5) and no ImageNet
normalisation. What mclSTExp adds to the data is each spot's array row and column, read from the
sample's ``spots.h5ad`` (``obs["array_row"]``, ``obs["array_col"]``, as ingest writes them) and
matched to the gene sentences by barcode.

``mclstexp.batch_from``: ``mixed`` (default, as mclSTExp's ``train.py``, which concatenates the
slides and shuffles) takes pretraining's sampler over all training slides; ``slide`` makes every
batch the spots of one slide (each slide's spots shuffled and cut into batches, the batches of all
slides shuffled; a slide's last incomplete batch is dropped), so a spot attends only to spots of
its own slide.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import torch

from comtip._core.errors import ConfigError, PipelineInputError
from comtip._core.seeds import derive_seed
from comtip.baselines.bleep_train import BleepSpots, BleepTrainer, run_trainer
from comtip.baselines.mclstexp_config import SECTION, MclstexpConfig
from comtip.baselines.mclstexp_model import MclSTExp
from comtip.model.config import ModelConfig
from comtip.training.config import STREAM_EPOCH, TrainConfig
from comtip.training.data import SampleFiles, sample_files
from comtip.training.sampling import BatchPlan

KIND = "mclstexp"
POSITION_COLUMNS = ("array_row", "array_col")


def read_array_positions(
    spots_h5ad: str | Path, barcodes: Sequence[str], cfg: MclstexpConfig, *, sample: str | None = None
) -> np.ndarray:
    """(len(barcodes), 2) int64 (array_row, array_col) of the given spots, from ``spots.h5ad``; a
    PipelineInputError if a column or a barcode is missing, a ConfigError if a row or column has
    no position embedding (``mclstexp.array_rows`` / ``array_cols`` too small)."""
    spots = ad.read_h5ad(spots_h5ad, backed="r")
    try:
        obs = spots.obs
        missing = [c for c in POSITION_COLUMNS if c not in obs.columns]
        if missing:
            raise PipelineInputError(
                f"spots.h5ad has no obs column {missing[0]!r}: mclSTExp's position embeddings need the "
                "spots' array row and column (Visium's array_row / array_col)",
                sample=sample,
                path=spots_h5ad,
            )
        table = obs.loc[:, list(POSITION_COLUMNS)]
        where = table.index.get_indexer(np.asarray(barcodes, dtype=str))
        if (where < 0).any():
            raise PipelineInputError(
                f"{int((where < 0).sum())} spots of the gene sentences are not in spots.h5ad (first "
                f"{np.asarray(barcodes)[where < 0][0]!r}); rerun the sample from ingest",
                sample=sample,
                path=spots_h5ad,
            )
        positions = table.to_numpy()[where].astype(np.int64)
    finally:
        spots.file.close()
    for axis, key in enumerate(("array_rows", "array_cols")):
        size, values = getattr(cfg, key), positions[:, axis]
        if len(values) and (values.min() < 0 or values.max() >= size):
            raise ConfigError(
                f"config key '{SECTION}.{key}' = {size}: sample {sample}'s {POSITION_COLUMNS[axis]} runs "
                f"{values.min()}..{values.max()}, beyond the position embeddings; set it above {values.max()}"
            )
    return positions


class MclstexpSpots(BleepSpots):
    """BLEEP's training spots with each spot's (array_row, array_col)."""

    def __init__(self, samples: Sequence[SampleFiles], spots_h5ad: Sequence[str | Path], cfg: MclstexpConfig):
        super().__init__(samples)
        if len(spots_h5ad) != len(self.samples):
            raise ValueError(f"{len(self.samples)} samples but {len(spots_h5ad)} spots.h5ad files")
        per_sample = [
            read_array_positions(path, np.asarray(self.sentence_file(k)["barcodes"]).astype(str), cfg, sample=f.name)
            for k, (f, path) in enumerate(zip(self.samples, spots_h5ad, strict=True))
        ]
        # the global index's (sample, row) → its position, once (2 integers a spot)
        self.positions = np.stack([per_sample[k][r] for k, r in zip(self.sample_of, self.row_of, strict=True)])
        self.fingerprint = {
            **self.fingerprint,
            "positions_sha256": hashlib.sha256(self.positions.tobytes()).hexdigest(),
        }

    def __getitem__(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        batch = super().__getitem__(indices)
        batch["positions"] = torch.from_numpy(self.positions[np.asarray(indices, dtype=np.int64)])
        return batch


@dataclass(frozen=True)
class SlideBatchPlan(BatchPlan):
    """``mclstexp.batch_from: slide``: every micro-batch is ``batch_size`` spots of one slide.

    An epoch: each slide's spots shuffled and cut into full batches (the rest dropped), the
    batches of all slides shuffled together; a pure function of (seed, epoch), as BatchPlan."""

    def _batches(self) -> int:
        return sum(size // self.batch_size for size in self.sample_sizes)

    @property
    def steps_per_epoch(self) -> int:
        steps = self._batches() // (self.grad_accum * self.world_size)
        if steps == 0:
            raise PipelineInputError(
                f"with {SECTION}.batch_from = slide a batch is {self.batch_size} spots of one slide: the "
                f"training slides ({', '.join(str(n) for n in self.sample_sizes)} spots) give "
                f"{self._batches()} such batches, fewer than one optimiser step needs "
                f"({self.grad_accum * self.world_size}); lower the batch size"
            )
        return steps

    def permutation(self, epoch: int) -> np.ndarray:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, STREAM_EPOCH, epoch))
        batches, start = [], 0
        for size in self.sample_sizes:
            order = start + torch.randperm(size, generator=generator).numpy()
            full = size // self.batch_size * self.batch_size
            batches.extend(order[:full].reshape(-1, self.batch_size))
            start += size
        if not batches:
            return np.zeros(0, np.int64)
        shuffled = torch.randperm(len(batches), generator=generator).numpy()
        return np.concatenate([batches[i] for i in shuffled]).astype(np.int64)


class MclstexpTrainer(BleepTrainer):
    """One mclSTExp run: BLEEP's trainer with mclSTExp's model, optimiser and batches."""

    NAME = "mclSTExp"
    SECTION = SECTION
    KIND = KIND

    def _batch_plan(self) -> BatchPlan:
        plan = super()._batch_plan()
        if self.cfg.batch_from == "mixed":
            return plan
        return SlideBatchPlan(
            plan.n_spots,
            plan.batch_size,
            plan.grad_accum,
            plan.world_size,
            plan.seed,
            sampler=plan.sampler,
            sample_sizes=plan.sample_sizes,
        )

    def _build_model(self) -> torch.nn.Module:
        return MclSTExp(self.cfg, self.model_cfg, len(self.data.panel_genes), self.image_size)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        # mclSTExp's train.py: Adam(model.parameters(), lr=1e-4, weight_decay=1e-3), no scheduler
        return torch.optim.Adam(self.model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def _model_inputs(self, raw: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        device = self.procs.device
        return raw["expression"].to(device, non_blocking=True), raw["positions"].to(device, non_blocking=True)


def train_mclstexp(
    samples: Sequence[str],
    patches: Sequence[str | Path],
    indexes: Sequence[str | Path],
    sentences: Sequence[str | Path],
    spots: Sequence[str | Path],
    out_checkpoint: str | Path,
    out_metrics: str | Path,
    *,
    mclstexp_config: Mapping,
    model_config: Mapping,
    train_config: Mapping,
    threads: int | None = None,
) -> None:
    """Train mclSTExp on the training samples (``spots``: their spots.h5ad, for the array
    positions); outputs and resume state as :func:`comtip.baselines.bleep_train.train_bleep`.
    ``train_config`` is :meth:`MclstexpConfig.train_config`'s."""
    cfg = MclstexpConfig.from_dict(dict(mclstexp_config))
    model_cfg = ModelConfig.from_dict(dict(model_config))
    train_cfg = TrainConfig.from_dict(dict(train_config))

    def load_data() -> MclstexpSpots:
        return MclstexpSpots(sample_files(samples, patches, indexes, sentences), spots, cfg)

    run_trainer(MclstexpTrainer, load_data, cfg, model_cfg, train_cfg, out_checkpoint, out_metrics, threads)

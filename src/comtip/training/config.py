"""Pretraining options (config key ``pretrain``), the learning-rate schedule and seed derivation."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from comtip._core.devices import DEVICES
from comtip._core.errors import ConfigError
from comtip._core.seeds import derive_seed  # noqa: F401 (re-exported: the streams below are its keys)
from comtip.model.config import GENE_POOLS, LENGTH_DISTRIBUTIONS, ModelConfig

SAMPLERS = ("blocks", "uniform")  # comtip.training.sampling

# Options that change how a run is executed but not what it computes: a resume checkpoint written
# with other values of these is still a valid starting point.
RUN_ONLY_KEYS = ("checkpoint_every", "checkpoint_minutes", "num_workers", "compile")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a pretraining run besides the model and the data.

    ``batch_size`` is per process; one optimiser step sees ``batch_size × grad_accum × processes``
    spots. ``max_steps``, when set, replaces ``epochs`` as the length of the run. Steps count
    optimiser steps.
    """

    epochs: int = 8
    max_steps: int | None = None
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    clip_grad_norm: float | None = 1.0
    checkpoint_every: int | None = None
    checkpoint_minutes: float | None = 20.0
    log_every: int = 5
    seed: int = 0
    num_workers: int | str = "auto"
    compile: bool = False
    sampler: str = "blocks"
    block_size: int = 16
    shuffle_window: int = 4096
    flip: bool = True
    rot90: bool = True
    color_jitter: float = 0.1
    subsample_prob: float = 0.5
    subsample_min_len: int = 1
    subsample_length: str = "uniform"
    subsample_genes: str = "vocabulary"
    # PAAT switches on after this many optimiser steps; None = paat_warmup_fraction of the run.
    paat_warmup_steps: int | None = None
    paat_warmup_fraction: float = 0.15
    bf16: bool = True
    device: str = "auto"
    retrieval_spots: int = 1000
    retrieval_pool_spots: int = 20000

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from the config mapping; an unknown key or an impossible value is a ConfigError
        naming the key (``pretrain.<key>``), so a typo never silently falls back to a default."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"config key 'pretrain.{unknown[0]}': unknown option (known: {', '.join(sorted(names))})")
        cfg = cls(**values)
        cfg.check()
        return cfg

    def check(self) -> None:
        """Range checks that the schema also states, repeated here for callers outside Snakemake."""
        minimum = {
            "epochs": 1,
            "batch_size": 1,
            "grad_accum": 1,
            "log_every": 1,
            "retrieval_spots": 1,
            "retrieval_pool_spots": 1,
            "subsample_min_len": 1,
            "warmup_steps": 0,
            "block_size": 1,
            "shuffle_window": 1,
            "seed": 0,
            "weight_decay": 0,
            "min_lr_ratio": 0,
            "color_jitter": 0,
            "subsample_prob": 0,
        }
        if self.paat_warmup_steps is not None and self.paat_warmup_steps < 0:
            raise ConfigError(
                f"config key 'pretrain.paat_warmup_steps': must be >= 0 or null, got {self.paat_warmup_steps}"
            )
        if not 0 <= self.paat_warmup_fraction <= 1:
            raise ConfigError(
                f"config key 'pretrain.paat_warmup_fraction': must be in [0, 1], got {self.paat_warmup_fraction}"
            )
        maximum = {"min_lr_ratio": 1, "color_jitter": 0.99, "subsample_prob": 1}
        for key, low in minimum.items():
            if getattr(self, key) < low:
                raise ConfigError(f"config key 'pretrain.{key}': must be >= {low}, got {getattr(self, key)}")
        for key, high in maximum.items():
            if getattr(self, key) > high:
                raise ConfigError(f"config key 'pretrain.{key}': must be <= {high}, got {getattr(self, key)}")
        if not (self.num_workers == "auto" or (isinstance(self.num_workers, int) and self.num_workers >= 0)):
            raise ConfigError(f"config key 'pretrain.num_workers': must be 'auto' or >= 0, got {self.num_workers!r}")
        for key in ("max_steps", "clip_grad_norm", "checkpoint_every", "checkpoint_minutes"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise ConfigError(f"config key 'pretrain.{key}': must be > 0 or null, got {getattr(self, key)}")
        if self.lr <= 0:
            raise ConfigError(f"config key 'pretrain.lr': must be > 0, got {self.lr}")
        if self.subsample_length not in LENGTH_DISTRIBUTIONS:
            raise ConfigError(
                f"config key 'pretrain.subsample_length': must be one of {LENGTH_DISTRIBUTIONS}, "
                f"got {self.subsample_length!r}"
            )
        if self.subsample_genes not in GENE_POOLS:
            raise ConfigError(
                f"config key 'pretrain.subsample_genes': must be one of {GENE_POOLS}, got {self.subsample_genes!r}"
            )
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"config key 'pretrain.sampler': must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.device not in DEVICES:
            raise ConfigError(f"config key 'pretrain.device': must be one of {DEVICES}, got {self.device!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def model_config_from_yaml(values: dict[str, Any] | None, *, gene_bins: int) -> ModelConfig:
    """Config key ``model`` as a ModelConfig, or a ConfigError naming the key; run when the
    workflow starts, so a typo fails before any job. ``gene_bins`` is ``genes.n_bins``: the
    model needs an embedding for every value bin the sentences can hold (0..gene_bins - 1)."""
    try:
        cfg = ModelConfig.from_dict(values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config key 'model': {err}") from err
    if cfg.n_bins < gene_bins:
        raise ConfigError(
            f"config key 'model.n_bins': {cfg.n_bins} is less than genes.n_bins ({gene_bins}); "
            f"value bins up to {gene_bins - 1} would have no embedding"
        )
    return cfg


def loader_workers(num_workers: int | str, device_type: str, threads: int) -> int:
    """DataLoader workers of one training process: ``auto`` = the process's threads but one (at
    most 8) on CUDA, where decoding and augmenting must keep up with the GPU, and none on CPU,
    where the workers would take the cores the model trains on."""
    if num_workers != "auto":
        return int(num_workers)
    return min(8, max(threads - 1, 0)) if device_type == "cuda" else 0


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    return cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch


def paat_start(cfg: TrainConfig, total: int) -> int:
    """The first optimiser step trained with PAAT: ``paat_warmup_steps``, or else
    ``paat_warmup_fraction`` of the ``total`` steps (rounded up)."""
    if cfg.paat_warmup_steps is not None:
        return cfg.paat_warmup_steps
    return math.ceil(cfg.paat_warmup_fraction * total)


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based).

    Linear warmup reaching 1 at step ``warmup_steps - 1``, then a cosine from 1 (step
    ``warmup_steps``) down to ``min_lr_ratio`` at the last step (``total_steps - 1``).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps - 1))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# Independent random streams, each a pure function of (seed, stream, ...): a resumed run draws
# exactly what the uninterrupted run drew at the same step.
STREAM_EPOCH = 0
STREAM_MODEL = 1
STREAM_AUGMENT = 2
STREAM_RETRIEVAL = 3
STREAM_INIT = 4
STREAM_VALIDATION = 5

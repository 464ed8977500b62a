"""Options of BLEEP trained as itself (config key ``bleep``), importable without torch: the
workflow checks them when it parses the config, before any job starts.

Two kinds of setting (``docs/evaluation.md``, "BLEEP trained as itself"):

* **BLEEP's own** (Xie et al. 2023, ``bowang-lab/BLEEP``: ``config.py``, ``modules.py``,
  ``BLEEP_main.py``), defaults here: the image encoder (timm ResNet-50), the projection head
  (256-d, dropout 0.1), temperature 1.0, AdamW lr 1e-3 and weight decay 1e-3 on every parameter
  with a constant learning rate and no gradient clipping, flips and 90° rotations without colour
  jitter.
* **Shared with CoMTIP's pretraining** (``pretrain.*``, ``model.image_size``, ``seed``), taken
  from there unless set under ``bleep``: the training samples and their spots (the same data
  path), the image size, the number of optimiser steps (``epochs`` / ``max_steps``), the batch
  size per process and ``grad_accum``, the sampler, the device, bf16, checkpointing and logging.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from comtip._core.errors import ConfigError

# CoMTIP's own vision backbone (model.vision_model + vision_kwargs at model.image_size) as BLEEP's
# image encoder: the same-backbone comparison
COMTIP_VIT = "comtip_vit"
# pretrain.* keys that decide the data, the budget and how the run executes: BLEEP takes them from
# pretrain unless its own section overrides the ones in OVERRIDABLE
SHARED_KEYS = (
    "epochs",
    "max_steps",
    "batch_size",
    "grad_accum",
    "sampler",
    "block_size",
    "shuffle_window",
    "flip",
    "rot90",
    "bf16",
    "device",
    "num_workers",
    "checkpoint_every",
    "checkpoint_minutes",
    "log_every",
    "compile",
)
OVERRIDABLE = ("epochs", "max_steps", "batch_size", "grad_accum")
# bleep = BLEEP's soft-target loss; siglip = HESCAPE's sigmoid loss (bleep_model.SiglipLoss)
LOSSES = ("bleep", "siglip")


@dataclass(frozen=True)
class BleepConfig:
    """BLEEP's model and optimiser (its paper's settings by default) and the budget overrides
    (``None`` = as ``pretrain``)."""

    image_encoder: str = "resnet50"  # a timm model name, or comtip_vit
    pretrained_weights: str | None = None  # a local state dict; None = random initialisation
    projection_dim: int = 256
    dropout: float = 0.1
    temperature: float = 1.0
    loss: str = "bleep"
    lr: float = 1e-3
    weight_decay: float = 1e-3
    image_size: int | None = None  # None = model.image_size (the patches CoMTIP sees)
    epochs: int | None = None
    max_steps: int | None = None
    batch_size: int | None = None
    grad_accum: int | None = None

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> BleepConfig:
        """Build from the config mapping; an unknown key or an impossible value is a ConfigError
        naming the key (``bleep.<key>``)."""
        values = dict(values or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"config key 'bleep.{unknown[0]}': unknown option (known: {', '.join(sorted(names))})")
        cfg = cls(**values)
        cfg.check()
        return cfg

    def check(self) -> None:
        if not isinstance(self.image_encoder, str) or not self.image_encoder:
            raise ConfigError(f"config key 'bleep.image_encoder': a timm model name or {COMTIP_VIT!r}")
        for key in ("projection_dim", "image_size", "epochs", "max_steps", "batch_size", "grad_accum"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"config key 'bleep.{key}': must be an integer >= 1, got {value!r}")
        if self.image_size is not None and self.image_size < 8:
            raise ConfigError(f"config key 'bleep.image_size': must be >= 8, got {self.image_size}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"config key 'bleep.dropout': must be in [0, 1), got {self.dropout}")
        for key in ("temperature", "lr"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"config key 'bleep.{key}': must be > 0, got {getattr(self, key)}")
        if self.weight_decay < 0:
            raise ConfigError(f"config key 'bleep.weight_decay': must be >= 0, got {self.weight_decay}")
        if self.loss not in LOSSES:
            raise ConfigError(f"config key 'bleep.loss': must be one of {', '.join(LOSSES)}, got {self.loss!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def train_config(self, pretrain: dict[str, Any], seed: int) -> dict[str, Any]:
        """The ``comtip.training.TrainConfig`` options of the BLEEP run: the shared ``pretrain``
        keys (overridden where this config sets them), BLEEP's optimiser, and no CoMTIP-only
        schedule: constant lr (no warmup, ``min_lr_ratio`` 1), no clipping, no colour jitter."""
        shared = {key: pretrain[key] for key in SHARED_KEYS if key in pretrain}
        shared.update({key: getattr(self, key) for key in OVERRIDABLE if getattr(self, key) is not None})
        if self.epochs is not None and self.max_steps is None:
            shared["max_steps"] = None  # bleep.epochs names the length: pretrain.max_steps does not replace it
        return {
            **shared,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "warmup_steps": 0,
            "min_lr_ratio": 1.0,
            "clip_grad_norm": None,
            "color_jitter": 0.0,
            "seed": seed,
        }

    def resolved_image_size(self, model_image_size: int) -> int:
        return self.image_size if self.image_size is not None else int(model_image_size)

"""Options of mclSTExp trained as itself (config key ``mclstexp``), importable without torch: the
workflow checks them when it parses the config, before any job starts.

Two kinds of setting (``docs/evaluation.md``, "mclSTExp trained as itself"):

* **mclSTExp's own** (Min et al. 2024, ``ZhicengShi/mclSTExp``: ``model.py``, ``train.py``,
  ``dataset.py``, ``evel_her2st.py``), defaults here: its DenseNet-121 image encoder (``train.py``'s
  ``--encoder_name``; ``resnet50`` is its other CNN), BLEEP's projection-head module (256-d,
  dropout 0 as ``--dropout``), the spot-level Transformer (2 pre-norm layers, 8 heads x 64,
  learnable array row / column embeddings, 128 entries each here), the CLIP loss with identity
  targets at temperature 1.0 (``loss: bleep`` = BLEEP's soft targets instead), Adam lr 1e-4 and
  weight decay 1e-3, colour jitter 0.5, batches that mix the slides (``batch_from: mixed``), and
  reference embeddings computed in batches of 32 consecutive spots (``embed_batch_size``).
* **Shared with CoMTIP's pretraining** (``pretrain.*``, ``model.image_size``, ``seed``), taken
  from there unless set under ``mclstexp``: as BLEEP's (``bleep_config.SHARED_KEYS``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from comtip._core.errors import ConfigError
from comtip.baselines.bleep_config import COMTIP_VIT, OVERRIDABLE, SHARED_KEYS

SECTION = "mclstexp"
# where a batch's spots come from: mixed = pretrain's sampler over all training slides (as
# mclSTExp's train.py, which concatenates the slides' datasets and shuffles); slide = one slide
BATCH_FROM = ("mixed", "slide")
# clip = mclSTExp's model.py (cross-entropy against identity targets); bleep = BLEEP's soft targets;
LOSSES = ("clip", "bleep", "siglip")  # siglip: HESCAPE's sigmoid loss (bleep_model.SiglipLoss)


@dataclass(frozen=True)
class MclstexpConfig:
    """mclSTExp's model and optimiser (its code's settings by default) and the budget overrides
    (``None`` = as ``pretrain``)."""

    image_encoder: str = "densenet121"  # a timm model name, or comtip_vit (as bleep.image_encoder)
    pretrained_weights: str | None = None  # a local state dict; None = random initialisation
    projection_dim: int = 256
    dropout: float = 0.0  # of the projection heads (mclSTExp: 0, as everywhere in its model)
    temperature: float = 1.0
    loss: str = "clip"
    heads: int = 8
    head_dim: int = 64
    layers: int = 2
    array_rows: int = 128  # entries of the array-row position embedding (array_row < array_rows)
    array_cols: int = 128  # entries of the array-column position embedding
    lr: float = 1e-4
    weight_decay: float = 1e-3
    color_jitter: float = 0.5
    batch_from: str = "mixed"
    embed_batch_size: int = 32  # the spot encoder's context when embedding (evel_her2st.py's loader)
    image_size: int | None = None  # None = model.image_size (the patches CoMTIP sees)
    epochs: int | None = None
    max_steps: int | None = None
    batch_size: int | None = None
    grad_accum: int | None = None

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> MclstexpConfig:
        """Build from the config mapping; an unknown key or an impossible value is a ConfigError
        naming the key (``mclstexp.<key>``)."""
        values = dict(values or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(
                f"config key '{SECTION}.{unknown[0]}': unknown option (known: {', '.join(sorted(names))})"
            )
        cfg = cls(**values)
        cfg.check()
        return cfg

    def check(self) -> None:
        if not isinstance(self.image_encoder, str) or not self.image_encoder:
            raise ConfigError(f"config key '{SECTION}.image_encoder': a timm model name or {COMTIP_VIT!r}")
        required = ("projection_dim", "heads", "head_dim", "layers", "array_rows", "array_cols", "embed_batch_size")
        for key in (*required, "image_size", "epochs", "max_steps", "batch_size", "grad_accum"):
            value = getattr(self, key)
            if (value is not None or key in required) and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ConfigError(f"config key '{SECTION}.{key}': must be an integer >= 1, got {value!r}")
        if self.image_size is not None and self.image_size < 8:
            raise ConfigError(f"config key '{SECTION}.image_size': must be >= 8, got {self.image_size}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"config key '{SECTION}.dropout': must be in [0, 1), got {self.dropout}")
        for key in ("temperature", "lr"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"config key '{SECTION}.{key}': must be > 0, got {getattr(self, key)}")
        if self.weight_decay < 0:
            raise ConfigError(f"config key '{SECTION}.weight_decay': must be >= 0, got {self.weight_decay}")
        if not 0 <= self.color_jitter <= 0.99:
            raise ConfigError(f"config key '{SECTION}.color_jitter': must be in [0, 0.99], got {self.color_jitter}")
        if self.loss not in LOSSES:
            raise ConfigError(f"config key '{SECTION}.loss': must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.batch_from not in BATCH_FROM:
            raise ConfigError(
                f"config key '{SECTION}.batch_from': must be one of {', '.join(BATCH_FROM)}, got {self.batch_from!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def train_config(self, pretrain: dict[str, Any], seed: int) -> dict[str, Any]:
        """The ``comtip.training.TrainConfig`` options of the mclSTExp run: the shared
        ``pretrain`` keys (overridden where this config sets them), mclSTExp's optimiser and
        colour jitter, and no CoMTIP-only schedule: constant lr, no clipping (as BLEEP's)."""
        shared = {key: pretrain[key] for key in SHARED_KEYS if key in pretrain}
        shared.update({key: getattr(self, key) for key in OVERRIDABLE if getattr(self, key) is not None})
        if self.epochs is not None and self.max_steps is None:
            shared["max_steps"] = None  # mclstexp.epochs names the length: pretrain.max_steps does not replace it
        return {
            **shared,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "warmup_steps": 0,
            "min_lr_ratio": 1.0,
            "clip_grad_norm": None,
            "color_jitter": self.color_jitter,
            "seed": seed,
        }

    def resolved_image_size(self, model_image_size: int) -> int:
        return self.image_size if self.image_size is not None else int(model_image_size)

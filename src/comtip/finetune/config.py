"""Options of a fine-tuning run (config key ``finetune``), importable without torch: the
Snakefile checks them when it parses the config, before any job starts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from comtip._core.devices import DEVICES
from comtip._core.errors import ConfigError

MODES = ("linear", "full")


@dataclass(frozen=True)
class FinetuneConfig:
    """Options of a fine-tuning run (config key ``finetune``); the seed is the config's ``seed``."""

    mode: str = "linear"
    epochs: int = 50
    batch_size: int = 64
    lr: float = 1e-3  # head
    encoder_lr: float = 1e-5  # encoder, "full" mode only
    weight_decay: float = 1e-4
    patience: int = 5  # epochs without a better validation MSE before stopping
    seed: int = 0
    augment: bool = True  # flips / 90° rotations, "full" mode only (linear features are fixed)
    device: str = "auto"

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> FinetuneConfig:
        """Build from the config mapping; an unknown key or an impossible value is a ConfigError
        naming the key (``finetune.<key>``), so a typo never silently runs with a default."""
        values = dict(values or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"config key 'finetune.{unknown[0]}': unknown option (known: {', '.join(sorted(names))})")
        cfg = cls(**values)
        cfg.check()
        return cfg

    def check(self) -> None:
        """Range checks, also for callers that build the dataclass directly."""
        for key, low in {"epochs": 1, "batch_size": 1, "patience": 1, "seed": 0, "weight_decay": 0}.items():
            if getattr(self, key) < low:
                raise ConfigError(f"config key 'finetune.{key}': must be >= {low}, got {getattr(self, key)}")
        for key in ("lr", "encoder_lr"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"config key 'finetune.{key}': must be > 0, got {getattr(self, key)}")
        if self.mode not in MODES:
            raise ConfigError(f"config key 'finetune.mode': must be one of {MODES}, got {self.mode!r}")
        if self.device not in DEVICES:
            raise ConfigError(f"config key 'finetune.device': must be one of {DEVICES}, got {self.device!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

"""CoMTIP pretraining: data from the patch and sentence files, the (DDP-capable, resumable) training
loop, checkpoints and the retrieval check. Entry point: :func:`pretrain`."""

# Names resolve on first use (PEP 562): importing a light submodule (e.g. the config
# dataclasses, which the Snakefile reads at parse time) does not import torch and timm.
from __future__ import annotations

import importlib

_EXPORTS = {
    "FORMAT_VERSION": "comtip.training.checkpoint",
    "load_pretrained": "comtip.training.checkpoint",
    "resume_dir": "comtip.training.checkpoint",
    "TrainConfig": "comtip.training.config",
    "derive_seed": "comtip.training.config",
    "lr_factor": "comtip.training.config",
    "BatchPlan": "comtip.training.data",
    "SpotData": "comtip.training.data",
    "sample_files": "comtip.training.data",
    "pretrain": "comtip.training.loop",
    "retrieval_accuracy": "comtip.training.retrieval",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

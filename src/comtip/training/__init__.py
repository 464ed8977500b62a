"""CoMTIP pretraining: data from the patch and sentence files, the (DDP-capable, resumable) training
loop, checkpoints and the retrieval check. Entry point: :func:`pretrain`."""

# Names resolve on first use (comtip._core.lazy): importing a light submodule does not import torch.
from __future__ import annotations

from comtip._core.lazy import lazy_exports

_EXPORTS = {
    "FORMAT_VERSION": "comtip.training.checkpoint",
    "load_pretrained": "comtip.training.checkpoint",
    "resume_dir": "comtip.training.checkpoint",
    "TrainConfig": "comtip.training.config",
    "derive_seed": "comtip.training.config",
    "lr_factor": "comtip.training.config",
    "BatchPlan": "comtip.training.sampling",
    "SpotData": "comtip.training.data",
    "sample_files": "comtip.training.data",
    "pretrain": "comtip.training.loop",
    "retrieval_accuracy": "comtip.training.retrieval",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

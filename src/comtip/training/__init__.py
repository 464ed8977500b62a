"""CoMTIP pretraining: data from the patch and sentence files, the (DDP-capable, resumable) training
loop, checkpoints and the retrieval check. Entry point: :func:`pretrain`."""

from comtip.training.checkpoint import FORMAT_VERSION, load_pretrained, resume_dir
from comtip.training.config import TrainConfig, derive_seed, lr_factor
from comtip.training.data import BatchPlan, SpotData, sample_files
from comtip.training.loop import pretrain
from comtip.training.retrieval import retrieval_accuracy

__all__ = [
    "FORMAT_VERSION",
    "BatchPlan",
    "SpotData",
    "TrainConfig",
    "derive_seed",
    "load_pretrained",
    "lr_factor",
    "pretrain",
    "resume_dir",
    "retrieval_accuracy",
    "sample_files",
]

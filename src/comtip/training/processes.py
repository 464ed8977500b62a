"""The processes of a pretraining run: one, or several under ``torchrun`` (DDP), each on its device."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from comtip._core.devices import resolve_device


@dataclass(frozen=True)
class Processes:
    """Where this process sits in the run (torchrun's RANK / WORLD_SIZE / LOCAL_RANK)."""

    rank: int
    world_size: int
    device: torch.device
    owns_group: bool  # this call initialised the process group, so it also tears it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def start_processes(device: str) -> Processes:
    """Read torchrun's environment (absent = one process) and join the process group: NCCL on
    GPUs, gloo on CPU. ``device="cuda"`` without a visible GPU is an error, not a CPU run."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = resolve_device(device, key="pretrain.device").type == "cuda"
    where = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(where)
    owns_group = world_size > 1 and not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Processes(rank, world_size, where, owns_group)

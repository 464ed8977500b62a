"""Devices: the ``device`` config values, their resolution to a torch device, deterministic CPU runs.

Importable without torch (the config checks read :data:`DEVICES` when the workflow is parsed);
the functions import it when called.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from comtip._core.errors import ConfigError

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str, key: str = "finetune.device") -> torch.device:
    """``auto`` = CUDA when torch sees a GPU; ``cuda`` without one is an error naming the config
    ``key``, not a CPU run."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config key '{key}' is 'cuda' but torch sees no CUDA device on this node")
    return torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")


@contextlib.contextmanager
def deterministic_on_cpu(device: torch.device) -> Iterator[None]:
    """Enforce deterministic kernels for a CPU run (GPU kernels would need CUBLAS workspace
    settings and cost speed; there bit-identity is not promised), restoring the previous mode."""
    import torch

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(previous or device.type == "cpu")
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)

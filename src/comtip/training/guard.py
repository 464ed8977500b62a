"""The non-finite loss guard of pretraining: a diverged run stops with an error naming the step and
its loss terms, before anything of that step is written, so the resume checkpoint on disk stays
the last good one."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from comtip.training.metrics import LOSS_COLUMNS


class NonFiniteGuard:
    """Remembers, on the device, the first step whose loss terms were not all finite and those
    terms, so that watching every step adds no host-device sync to it; :meth:`check` reads it
    (one sync) before every metrics row and resume checkpoint."""

    def __init__(self, device: torch.device) -> None:
        self.first = torch.full((1 + len(LOSS_COLUMNS),), -1.0, device=device)  # step (-1: none), terms

    def update(self, step: int, losses: dict[str, torch.Tensor]) -> None:
        terms = torch.stack([losses[k] for k in LOSS_COLUMNS])
        new = (self.first[0] < 0) & ~torch.isfinite(terms).all()
        here = torch.cat([torch.full((1,), float(step), device=terms.device), terms])
        self.first = torch.where(new, here, self.first)

    def check(self, world_size: int, resume_folder: Path, saved_step: int) -> None:
        """Raise if a step so far had a non-finite loss (a collective: all processes stop together)."""
        bad = self.first.tolist()
        if world_size > 1:
            flag = self.first[:1].clone()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() >= 0 and bad[0] < 0:
                raise RuntimeError(f"pretraining diverged on another process at step {int(flag.item())}")
        if bad[0] < 0:
            return
        terms = ", ".join(f"{k} {v:.4g}" for k, v in zip(LOSS_COLUMNS, bad[1:], strict=True))
        kept = (
            f"the resume checkpoint in {resume_folder} keeps step {saved_step}"
            if saved_step
            else "no resume checkpoint was written"
        )
        raise RuntimeError(
            f"pretraining diverged: non-finite loss at step {int(bad[0])} ({terms}); {kept}. Lower "
            "pretrain.lr, raise pretrain.warmup_steps or pretrain.paat_warmup_steps, or keep pretrain.bf16 off"
        )

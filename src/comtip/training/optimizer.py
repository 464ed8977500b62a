"""The pretraining optimiser: AdamW with the warmup + cosine schedule of :func:`lr_factor`."""

from __future__ import annotations

import torch

from comtip.training.config import TrainConfig, lr_factor


def build_optimizer(
    model: torch.nn.Module, cfg: TrainConfig, total: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW without weight decay on biases, norms, embeddings' scales and the logit scale
    (every parameter with fewer than 2 dimensions), and the warmup + cosine schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)

    def factor(step: int) -> float:
        return lr_factor(step, warmup_steps=cfg.warmup_steps, total_steps=total, min_lr_ratio=cfg.min_lr_ratio)

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

"""The pretraining optimiser: AdamW with the warmup + cosine schedule of :func:`lr_factor`.

Weight decay (standard ViT / CLIP practice, as in timm's ``param_groups_weight_decay`` and
``no_weight_decay``) applies to the weight matrices of linear, convolution and attention layers
only. It is not applied to biases and norm scales (every parameter with fewer than 2 dimensions),
position embeddings, CLS / register / mask tokens and learnable queries (timm's
``no_weight_decay()`` names and ours), embedding tables (``nn.Embedding``, ``nn.EmbeddingBag``:
a row is decayed only by being looked up rarely, so decay would shrink rare genes' and bins'
vectors towards 0) and the logit scale. Decaying these pulls them to 0, which for a position
embedding or a token means erasing it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from comtip.training.config import TrainConfig, lr_factor

# parameter names (last part) that are tokens, queries or position tables, whatever their shape
NO_DECAY_NAMES = frozenset({"pos_embed", "cls_token", "reg_token", "dist_token", "mask_token", "cls", "mask_query"})


def no_decay_names(model: nn.Module) -> set[str]:
    """Full names of ``model``'s parameters that get no weight decay (see the module docstring)."""
    names: set[str] = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        listed = module.no_weight_decay() if callable(getattr(module, "no_weight_decay", None)) else set()
        for name, param in module.named_parameters(recurse=False):
            if (
                param.ndim < 2
                or name in NO_DECAY_NAMES
                or name in listed
                or isinstance(module, (nn.Embedding, nn.EmbeddingBag))
            ):
                names.add(prefix + name)
    return names


def decay_groups(model: nn.Module, weight_decay: float, **extra: Any) -> list[dict[str, Any]]:
    """Two AdamW parameter groups of ``model``'s trainable parameters: decayed and not decayed."""
    skip = no_decay_names(model)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in params if n not in skip], "weight_decay": weight_decay, **extra},
        {"params": [p for n, p in params if n in skip], "weight_decay": 0.0, **extra},
    ]


def build_optimizer(
    model: torch.nn.Module, cfg: TrainConfig, total: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with weight decay on weight matrices only (:func:`decay_groups`), fused when the
    model is on CUDA, and the warmup + cosine schedule."""
    # the fused CUDA kernel: one launch for all parameters instead of several per tensor
    fused = all(p.is_cuda for p in model.parameters())
    optimizer = torch.optim.AdamW(decay_groups(model, cfg.weight_decay), lr=cfg.lr, fused=fused or None)

    def factor(step: int) -> float:
        return lr_factor(step, warmup_steps=cfg.warmup_steps, total_steps=total, min_lr_ratio=cfg.min_lr_ratio)

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

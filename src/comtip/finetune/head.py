"""The fine-tuning head on the pretrained ViT, the pooled feature it reads, the encoder rebuilt
from a checkpoint's config, and the identity of a fine-tuning checkpoint."""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn

from comtip.model import ModelConfig, preprocess_images
from comtip.model.foundation import timm_create_kwargs
from comtip.model.vision import resolve_normalisation, vit_normalisation

FORMAT_VERSION = 1
CHECKPOINT_KIND = "comtip_finetune"
# Features are standardised with the training features' std; this floor keeps a constant
# feature (dead unit) from being divided by zero.
MIN_FEATURE_STD = 1e-6


class ExpressionHead(nn.Module):
    """Standardise the pooled feature (fixed training statistics), then one linear layer.

    Standardising makes one learning rate fit any backbone's feature scale. The layer starts at
    zero weights and the training mean as bias: epoch 0 predicts the mean, the baseline the head
    has to beat.
    """

    def __init__(self, feature_mean: torch.Tensor, feature_std: torch.Tensor, target_mean: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("feature_mean", feature_mean.clone().float())
        self.register_buffer("feature_std", feature_std.clone().float().clamp(min=MIN_FEATURE_STD))
        self.linear = nn.Linear(feature_mean.shape[0], target_mean.shape[0])
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.bias.copy_(target_mean.float())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear((features - self.feature_mean) / self.feature_std)


def pooled_features(vit: nn.Module, images: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 (B, H, W, 3) → (B, C) pooled ViT features before CoMTIP's projection (the same
    computation as ``VisionEncoder.embed`` up to the projection, through timm's public API)."""
    return vit.forward_head(
        vit.forward_features(preprocess_images(images, image_size, *vit_normalisation(vit))), pre_logits=True
    )


def build_vit(model_config: dict[str, Any]) -> nn.Module:
    """The pretrained model's ViT architecture, uninitialised weights (a checkpoint fills them):
    built without ``pretrained_weights``, which may name a file absent where predictions run."""
    cfg = ModelConfig.architecture(model_config)
    kwargs = timm_create_kwargs(cfg.vision_kwargs)
    vit = timm.create_model(cfg.vision_model, pretrained=False, img_size=cfg.image_size, num_classes=0, **kwargs)
    resolve_normalisation(cfg, vit)  # the checkpoint's normalisation, recorded on the ViT
    return vit

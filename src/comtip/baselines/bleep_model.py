"""BLEEP's bi-encoder and loss (Xie et al., NeurIPS 2023; ``bowang-lab/BLEEP`` ``models.py`` and
``modules.py``), written from its code's arithmetic.

* Image side: a timm CNN (ResNet-50 by default) with ``num_classes=0`` and global average pooling
  (2048-d for ResNet-50), then a projection head. ``comtip_vit`` puts CoMTIP's ViT (the
  ``model:`` backbone, pooled features) in its place, for a same-backbone comparison.
* Expression side: the projection head alone, on the spot's expression vector.
* Projection head: Linear(in → 256) → GELU → Linear(256 → 256) → Dropout(0.1) → + the first
  Linear's output (residual) → LayerNorm(256).
* Loss: ``logits = spot @ imageᵀ / T``; ``targets = softmax((image @ imageᵀ + spot @ spotᵀ) / 2 · T)``
  row-wise; the mean over the batch of (CE(logits, targets) + CE(logitsᵀ, targetsᵀ)) / 2, CE with
  soft targets along the rows. BLEEP does **not** L2-normalise before the logits: the embeddings
  are the LayerNorm outputs (norm ≈ √256 at initialisation), and T multiplies (not divides) the
  similarities of the targets, as in its code. Embeddings are normalised only for retrieval.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import load_state_dict
from torch import nn

from comtip._core.errors import ConfigError
from comtip.baselines.bleep_config import COMTIP_VIT, BleepConfig
from comtip.baselines.mclstexp_config import MclstexpConfig
from comtip.model.config import ModelConfig
from comtip.model.foundation import timm_create_kwargs
from comtip.model.losses import siglip
from comtip.model.vision import load_vit_weights

log = logging.getLogger(__name__)


class ProjectionHead(nn.Module):
    """BLEEP's ``ProjectionHead``: Linear → GELU → Linear → Dropout → residual → LayerNorm."""

    def __init__(self, in_dim: int, dim: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.projection = nn.Linear(in_dim, dim)
        self.gelu = nn.GELU()
        self.fc = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = self.projection(x)
        return self.layer_norm(self.dropout(self.fc(self.gelu(projected))) + projected)


def bleep_loss(image_emb: torch.Tensor, spot_emb: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """BLEEP's contrastive loss with soft targets (``CLIPModel.forward``) of (B, D) embeddings,
    un-normalised as BLEEP passes them."""
    logits = spot_emb @ image_emb.T / temperature
    targets = F.softmax((image_emb @ image_emb.T + spot_emb @ spot_emb.T) / 2 * temperature, dim=-1)
    spots_loss = -(targets * F.log_softmax(logits, dim=-1)).sum(dim=1)
    images_loss = -(targets.T * F.log_softmax(logits.T, dim=-1)).sum(dim=1)
    return ((images_loss + spots_loss) / 2.0).mean()


# HESCAPE's SigLIP start (its T = 0.1) and SigLIP's bias (-10, so that the many negative pairs
# start near sigmoid = 0); the logit scale is capped as CoMTIP's (model.max_logit_scale default).
SIGLIP_TEMPERATURE_INIT = 0.1
SIGLIP_BIAS_INIT = -10.0
SIGLIP_MAX_LOGIT_SCALE = 100.0


class SiglipLoss(nn.Module):
    """HESCAPE's alternative loss for a baseline (``loss: siglip``): the sigmoid loss
    (:func:`comtip.model.losses.siglip`, negatives gathered over processes) of the L2-normalised
    embeddings, with a learnable logit scale (log-parametrised, from 1 / 0.1) and bias (from -10).
    The baseline's ``temperature`` is not used."""

    def __init__(self) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / SIGLIP_TEMPERATURE_INIT)))
        self.bias = nn.Parameter(torch.tensor(SIGLIP_BIAS_INIT))

    def forward(self, image_emb: torch.Tensor, spot_emb: torch.Tensor) -> torch.Tensor:
        scale = self.log_scale.exp().clamp(max=SIGLIP_MAX_LOGIT_SCALE)
        return siglip(F.normalize(image_emb, dim=-1), F.normalize(spot_emb, dim=-1), scale, self.bias)


def _load_weights(encoder: nn.Module, path: str | Path, section: str = "bleep") -> None:
    """A local timm state dict, strictly (a classifier head in the file is dropped)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config key '{section}.pretrained_weights': no such file {path.resolve()}")
    state = {k: v for k, v in load_state_dict(str(path), use_ema=False).items() if not k.startswith(("fc.", "head."))}
    try:
        result = encoder.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise ConfigError(
            f"config key '{section}.pretrained_weights': {path} does not match the encoder: {err}"
        ) from err
    if result.missing_keys or result.unexpected_keys:
        raise ConfigError(
            f"config key '{section}.pretrained_weights': {path} does not match the encoder (missing "
            f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}, first 5 of each)"
        )
    log.info("%s image encoder: loaded pretrained weights from %s", section, path)


def build_image_encoder(
    cfg: BleepConfig | MclstexpConfig, model_cfg: ModelConfig, image_size: int, section: str = "bleep"
) -> nn.Module:
    """The timm backbone (pooled features, no classifier); random init unless weights are given.
    ``section`` (``bleep`` or ``mclstexp``, whose image encoder is BLEEP's) names the config keys."""
    if cfg.image_encoder == COMTIP_VIT:
        kwargs = {"img_size": image_size, "num_classes": 0, **timm_create_kwargs(model_cfg.vision_kwargs)}
        encoder = timm.create_model(model_cfg.vision_model, pretrained=False, **kwargs)
        name = f"{COMTIP_VIT} ({model_cfg.vision_model})"
        if cfg.pretrained_weights is not None:
            load_vit_weights(encoder, cfg.pretrained_weights)
    else:
        try:
            encoder = timm.create_model(cfg.image_encoder, pretrained=False, num_classes=0, global_pool="avg")
        except RuntimeError as err:  # timm: "Unknown model"
            raise ConfigError(f"config key '{section}.image_encoder': {err}") from err
        name = cfg.image_encoder
        if cfg.pretrained_weights is not None:
            _load_weights(encoder, cfg.pretrained_weights, section)
    log.debug("%s image encoder %s built", section, name)
    return encoder


def image_normalisation(encoder: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The backbone's own mean/std (timm ``pretrained_cfg``; ImageNet's if it names none)."""
    own = dict(getattr(encoder, "pretrained_cfg", None) or {})
    mean = tuple(float(v) for v in own.get("mean", IMAGENET_DEFAULT_MEAN))
    std = tuple(float(v) for v in own.get("std", IMAGENET_DEFAULT_STD))
    return mean, std


class BLEEP(nn.Module):
    """BLEEP's ``CLIPModel``: an image encoder and two projection heads; ``forward`` is the loss."""

    def __init__(self, cfg: BleepConfig, model_cfg: ModelConfig, n_genes: int, image_size: int) -> None:
        super().__init__()
        self.cfg, self.image_size = cfg, image_size
        self.image_encoder = build_image_encoder(cfg, model_cfg, image_size)
        self.image_mean, self.image_std = image_normalisation(self.image_encoder)
        width = int(self.image_encoder.num_features)
        self.image_projection = ProjectionHead(width, cfg.projection_dim, cfg.dropout)
        self.spot_projection = ProjectionHead(n_genes, cfg.projection_dim, cfg.dropout)
        self.temperature = cfg.temperature
        if cfg.loss == "siglip":
            self.siglip = SiglipLoss()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images → (B, C) pooled backbone features."""
        return self.image_encoder(images)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_projection(self.features(images))

    def encode_expression(self, expression: torch.Tensor) -> torch.Tensor:
        return self.spot_projection(expression)

    def forward(self, images: torch.Tensor, expression: torch.Tensor) -> torch.Tensor:
        """The loss of a batch. Under bf16 autocast the encoders run in bf16, the loss in float32:
        at T = 1 the logits of un-normalised 256-d embeddings reach the hundreds, where bf16 keeps
        two significant digits."""
        image_emb, spot_emb = self.encode_image(images), self.encode_expression(expression)
        with torch.autocast(images.device.type, enabled=False):
            if self.cfg.loss == "siglip":
                return self.siglip(image_emb.float(), spot_emb.float())
            return bleep_loss(image_emb.float(), spot_emb.float(), self.temperature)

"""mclSTExp's bi-encoder (Min et al. 2024; ``shizhiceng/mclSTExp`` ``model.py``), written from its
code's arithmetic.

* Image side: a timm CNN built as BLEEP's (``bleep_model.build_image_encoder``: pooled features,
  no classifier), DenseNet-121 by default as mclSTExp's ``train.py`` (1024-d; torchvision's there,
  the same architecture), and the projection-head module BLEEP and mclSTExp share, to 256-d.
* Spot side, the "spot-level Transformer" (spots as words): a spot's token is its expression
  vector over the panel genes plus two learnable position embeddings of the same width, looked
  up by the spot's ``array_row`` and ``array_col``. The spots of one batch form one sequence
  (``(B, G)`` → ``(1, B, G)``), so each spot attends to every other spot of its batch. 2 pre-norm
  layers ``x + Attention(LN(x))``, ``x + FeedForward(LN(x))``: hand-written multi-head attention
  (8 heads x 64, no qkv bias, an output projection back to the panel width), a feed-forward of
  the panel width with GELU, dropout 0, no final norm; then BLEEP's projection head.
* Loss: mclSTExp's (``mclstexp_loss``): logits = spot · imageᵀ / T, cross-entropy against the
  identity in both directions, averaged; no normalisation before the logits (as BLEEP's).
  ``mclstexp.loss: bleep`` puts BLEEP's soft targets (``bleep_model.bleep_loss``) in its place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from comtip.baselines.bleep_model import ProjectionHead, SiglipLoss, bleep_loss, build_image_encoder
from comtip.baselines.mclstexp_config import SECTION, MclstexpConfig
from comtip.model.config import ModelConfig

# mclSTExp feeds its images as torchvision's ToTensor makes them (0-1, no ImageNet normalisation)
IMAGE_MEAN = (0.0, 0.0, 0.0)
IMAGE_STD = (1.0, 1.0, 1.0)


def mclstexp_loss(image_emb: torch.Tensor, spot_emb: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """mclSTExp's loss (``mclSTExp_Attention.forward``) of (B, D) un-normalised embeddings: the
    spot-to-image logits against identity targets, both directions, averaged."""
    logits = spot_emb @ image_emb.T / temperature
    targets = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2.0


class Attention(nn.Module):
    """mclSTExp's ``Attention``: one qkv projection without bias, softmax(q kᵀ / √d) v per head, and
    an output projection back to the token width."""

    def __init__(self, dim: int, heads: int = 8, head_dim: int = 64) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads, self.scale = heads, head_dim**-0.5
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in self.to_qkv(x).chunk(3, dim=-1))
        weights = torch.softmax(q @ k.transpose(-1, -2) * self.scale, dim=-1)
        return self.to_out((weights @ v).transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Module):
    """mclSTExp's ``FeedForward``: Linear → GELU → Linear, hidden width = token width."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SpotBlock(nn.Module):
    """One pre-norm Transformer layer (mclSTExp's ``attn_block``)."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = Attention(dim, heads, head_dim)
        self.feed_forward_norm = nn.LayerNorm(dim)
        self.feed_forward = FeedForward(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.feed_forward_norm(x))


class SpotEncoder(nn.Module):
    """Expression + row/column embeddings → the Transformer over the batch's spots (no final norm)."""

    def __init__(self, cfg: MclstexpConfig, n_genes: int) -> None:
        super().__init__()
        self.row_embedding = nn.Embedding(cfg.array_rows, n_genes)
        self.col_embedding = nn.Embedding(cfg.array_cols, n_genes)
        self.layers = nn.Sequential(*(SpotBlock(n_genes, cfg.heads, cfg.head_dim) for _ in range(cfg.layers)))

    def forward(self, expression: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(B, G) expression and (B, 2) long (array_row, array_col) → (B, G): one sequence of B spots."""
        tokens = expression + self.row_embedding(positions[:, 0]) + self.col_embedding(positions[:, 1])
        return self.layers(tokens.unsqueeze(0)).squeeze(0)


class MclSTExp(nn.Module):
    """mclSTExp's ``mclSTExp_Attention``: image encoder + projection, spot Transformer + projection;
    ``forward`` is the loss."""

    def __init__(self, cfg: MclstexpConfig, model_cfg: ModelConfig, n_genes: int, image_size: int) -> None:
        super().__init__()
        self.cfg, self.image_size = cfg, image_size
        self.image_encoder = build_image_encoder(cfg, model_cfg, image_size, section=SECTION)
        self.image_mean, self.image_std = IMAGE_MEAN, IMAGE_STD
        self.image_projection = ProjectionHead(int(self.image_encoder.num_features), cfg.projection_dim, cfg.dropout)
        self.spot_encoder = SpotEncoder(cfg, n_genes)
        self.spot_projection = ProjectionHead(n_genes, cfg.projection_dim, cfg.dropout)
        self.temperature = cfg.temperature
        if cfg.loss == "siglip":
            self.siglip = SiglipLoss()
            self.loss = lambda image_emb, spot_emb, _temperature: self.siglip(image_emb, spot_emb)
        else:
            self.loss = bleep_loss if cfg.loss == "bleep" else mclstexp_loss

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) preprocessed images → (B, C) pooled backbone features."""
        return self.image_encoder(images)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_projection(self.features(images))

    def encode_expression(self, expression: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The spots' embeddings, each in the context of the others of the same call (the batch)."""
        return self.spot_projection(self.spot_encoder(expression, positions))

    def forward(self, images: torch.Tensor, expression: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The loss of a batch; the loss itself in float32 under bf16 autocast (as BLEEP's)."""
        image_emb, spot_emb = self.encode_image(images), self.encode_expression(expression, positions)
        with torch.autocast(images.device.type, enabled=False):
            return self.loss(image_emb.float(), spot_emb.float(), self.temperature)

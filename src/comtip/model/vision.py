"""Vision encoder: a timm ViT with Masked Feature Modeling (MFM), and the shared image preprocessing.

Two branches share one ViT:

* **full branch** — every patch token (+ class token) through the ViT: token features ``F``
  (B, N, C) and the pooled (class-token) feature, projected to the shared space. This is the
  only branch used to embed an image (``embed``) and the one aligned with the gene sentences.
* **masked branch** (training objective, when ``mfm``) — a random ``1 - mask_ratio`` of the
  patch tokens per image is kept (exactly ``round(N·(1 - mask_ratio))``), the same ViT blocks run
  on [class token + visible tokens], and a *mask feature generator* rebuilds the features of the
  hidden positions: a learnable mask query plus the positional embedding of each hidden position
  attends, through ONE cross-attention layer, to the masked branch's outputs, then an MLP. The MFM
  loss is the mean squared error to the full branch's features at those positions, detached
  (stop-gradient: the full branch is the teacher, so the loss cannot be lowered by collapsing
  the targets) and layer-normalised without affine parameters (as MAE's normalised-pixel target:
  every token counts with the same scale, whatever its norm).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import load_state_dict
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from comtip._core.errors import ConfigError
from comtip.model.config import ModelConfig
from comtip.model.foundation import load_foundation_weights, timm_create_kwargs
from comtip.model.presets import PRESETS

log = logging.getLogger(__name__)


def resolve_normalisation(cfg: ModelConfig, vit: nn.Module) -> None:
    """Fix ``cfg.image_mean``/``image_std`` (the backbone's own from timm's ``pretrained_cfg``
    when unset; ImageNet's if it names none) and record them in ``vit.pretrained_cfg``, where
    :func:`vit_normalisation` (and timm's ``resolve_data_config``) read them."""
    if cfg.image_mean is None:
        own = dict(getattr(vit, "pretrained_cfg", None) or {})
        cfg.image_mean = tuple(float(v) for v in own.get("mean", IMAGENET_DEFAULT_MEAN))
        cfg.image_std = tuple(float(v) for v in own.get("std", IMAGENET_DEFAULT_STD))
    vit.pretrained_cfg = {
        **dict(getattr(vit, "pretrained_cfg", None) or {}),
        "mean": cfg.image_mean,
        "std": cfg.image_std,
    }


def vit_normalisation(vit: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) recorded in a ViT's ``pretrained_cfg`` by :func:`resolve_normalisation`."""
    own = getattr(vit, "pretrained_cfg", None) or {}
    if "mean" not in own or "std" not in own:
        raise ValueError("the ViT carries no image normalisation (build it through resolve_normalisation)")
    return tuple(own["mean"]), tuple(own["std"])


def preprocess_images(
    images: torch.Tensor,
    image_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> torch.Tensor:
    """uint8 (B, H, W, 3) patches → float (B, 3, image_size, image_size), normalised.

    Resized with antialiased bilinear interpolation (patches are usually larger than the model
    input, and plain bilinear downsampling aliases nuclei texture), then normalised per channel
    with the model's ``image_mean``/``image_std`` (:func:`resolve_normalisation`).
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 (B, H, W, 3) images, got {images.dtype} {tuple(images.shape)}")
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def n_visible_tokens(n_tokens: int, mask_ratio: float) -> int:
    """``round(n_tokens · (1 - mask_ratio))``, kept in [1, n_tokens - 1] so that both the visible
    and the masked set are non-empty (matters only for tiny grids, e.g. 2 × 2 patches)."""
    if n_tokens < 2:
        raise ValueError(f"MFM needs at least 2 patch tokens, the ViT has {n_tokens}")
    return min(max(round(n_tokens * (1.0 - mask_ratio)), 1), n_tokens - 1)


def random_masking(
    batch: int,
    n_tokens: int,
    mask_ratio: float,
    *,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample random split of ``n_tokens`` positions into (visible, masked) index tensors.

    ``n_visible_tokens(n_tokens, mask_ratio)`` positions stay visible, the rest are masked; the
    choice uses the torch RNG (or ``generator``). Shapes (B, n_visible) and (B, n_masked), each
    row sorted ascending.
    """
    n_visible = n_visible_tokens(n_tokens, mask_ratio)
    noise = torch.rand(batch, n_tokens, device=device, generator=generator)
    order = noise.argsort(dim=1)
    visible = order[:, :n_visible].sort(dim=1).values
    masked = order[:, n_visible:].sort(dim=1).values
    return visible, masked


def _gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, N, C), idx (B, K) → (B, K, C)."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class MaskFeatureGenerator(nn.Module):
    """Rebuilds hidden-token features: (mask query + position) → one cross-attention → MLP.

    Pre-norm residual layout (as a ViT block, but cross-attention instead of self-attention), so
    the generator is shallow on purpose: the encoder, not the generator, must carry the context.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.mask_query = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.mask_query, std=0.02)
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, masked_pos: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """masked_pos (B, M, C): positional embeddings of hidden positions; context (B, K, C)."""
        q = self.mask_query + masked_pos
        kv = self.norm_kv(context)
        h = q + self.cross_attn(self.norm_q(q), kv, kv, need_weights=False)[0]
        return h + self.mlp(self.norm_mlp(h))


@dataclass
class VisionOutput:
    """Result of :meth:`VisionEncoder.forward`."""

    embedding: torch.Tensor  # (B, D) L2-normalised, full branch
    tokens: torch.Tensor  # (B, N, C) full-branch patch features (after the ViT's final norm)
    loss_mfm: torch.Tensor  # scalar; 0 when MFM is off
    masked_idx: torch.Tensor | None  # (B, M) hidden patch positions; None when MFM is off
    projected: torch.Tensor | None = None  # (B, D) the projection before L2 normalisation


class VisionEncoder(nn.Module):
    """timm ViT + projection to the shared space + (optional) MFM generator."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        kwargs = {"img_size": cfg.image_size, "num_classes": 0, **timm_create_kwargs(cfg.vision_kwargs)}
        self.vit = timm.create_model(cfg.vision_model, pretrained=False, **kwargs)
        if not isinstance(self.vit, VisionTransformer):
            raise ValueError(
                f"vision_model {cfg.vision_model!r} is not a timm VisionTransformer "
                f"(got {type(self.vit).__name__}); MFM needs ViT patch tokens"
            )
        if self.vit.pos_embed is None or getattr(self.vit, "dynamic_img_size", False):
            raise ValueError(f"vision_model {cfg.vision_model!r} needs a fixed absolute pos_embed for MFM")
        if cfg.pretrained_weights is not None and cfg.vision_preset is not None:
            load_foundation_weights(self.vit, cfg.pretrained_weights, PRESETS[cfg.vision_preset])
        elif cfg.pretrained_weights is not None:
            load_vit_weights(self.vit, cfg.pretrained_weights)
        else:
            log.info("vision encoder %s: no pretrained_weights given, random initialisation", cfg.vision_model)
        resolve_normalisation(cfg, self.vit)
        width = self.vit.num_features
        self.proj = nn.Linear(width, cfg.embed_dim)
        self.mask_ratio = cfg.mask_ratio
        self.generator = MaskFeatureGenerator(width, cfg.mfm_heads) if cfg.mfm else None

    @property
    def num_patches(self) -> int:
        return self.vit.patch_embed.num_patches

    @property
    def effective_mask_ratio(self) -> float:
        """Fraction of patch tokens actually hidden (``mask_ratio`` rounded to whole tokens)."""
        return 1.0 - n_visible_tokens(self.num_patches, self.mask_ratio) / self.num_patches

    def _patch_pos_embed(self) -> torch.Tensor:
        """(N, C) positional embeddings of the patch positions (without prefix tokens)."""
        pos = self.vit.pos_embed[0]
        return pos if self.vit.no_embed_class else pos[self.vit.num_prefix_tokens :]

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embedding + positions: (B, P + N, C), the P prefix (class/register) tokens first."""
        return self.vit._pos_embed(self.vit.patch_embed(images))

    def _encode_tokens(self, x: torch.Tensor) -> torch.Tensor:
        x = self.vit.norm_pre(self.vit.patch_drop(x))
        return self.vit.norm(self.vit.blocks(x))

    def _project_raw(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(self.vit.forward_head(features, pre_logits=True))

    def _project(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self._project_raw(features), dim=-1)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Full branch only: (B, 3, H, W) normalised → (B, D) L2-normalised."""
        return self._project(self._encode_tokens(self._embed(images)))

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> VisionOutput:
        """Full branch, plus the masked branch and its MFM loss when ``mfm`` is on."""
        x = self._embed(images)
        full = self._encode_tokens(x)
        prefix = self.vit.num_prefix_tokens
        tokens = full[:, prefix:]
        projected = self._project_raw(full)
        embedding = F.normalize(projected, dim=-1)
        if self.generator is None:
            return VisionOutput(embedding, tokens, images.new_zeros(()), None, projected)
        batch, n_tokens = tokens.shape[:2]
        visible, masked = random_masking(batch, n_tokens, self.mask_ratio, device=images.device, generator=generator)
        kept = torch.cat([x[:, :prefix], _gather_tokens(x[:, prefix:], visible)], dim=1)
        context = self._encode_tokens(kept)
        pos = self._patch_pos_embed().unsqueeze(0).expand(batch, -1, -1)
        predicted = self.generator(_gather_tokens(pos, masked), context)
        target = _gather_tokens(tokens.detach(), masked)
        target = F.layer_norm(target, target.shape[-1:])
        loss = F.mse_loss(predicted, target)
        return VisionOutput(embedding, tokens, loss, masked, projected)


def load_vit_weights(vit: VisionTransformer, path: str | Path) -> None:
    """Load a local timm ViT state_dict (.pt/.pth, or .safetensors) into ``vit``, strictly.

    Uses timm's own checkpoint filter, so a checkpoint made at another input size has its
    position embedding resampled to this ``image_size``; a classifier head in the file is
    dropped (this model has none). Any other missing or unexpected key is an error: a
    half-loaded backbone would train silently from a wrong start.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config key 'model.pretrained_weights': no such file {path.resolve()}")
    if path.suffix == ".safetensors":
        try:
            import safetensors.torch  # noqa: F401  (timm loads it; fail here with a clear message)
        except ImportError as err:
            raise ImportError(
                f"pretrained_weights {path}: reading .safetensors needs the "
                "'safetensors' package (pip install safetensors)"
            ) from err
    state = load_state_dict(str(path), use_ema=False)
    state = checkpoint_filter_fn(state, vit)
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    try:
        result = vit.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatch: another width/depth/patch size
        raise ValueError(f"pretrained_weights {path}: does not match the vision model: {err}") from err
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"pretrained_weights {path}: does not match the vision model "
            f"(missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}, "
            "first 5 of each shown)"
        )
    log.info("vision encoder: loaded pretrained weights from %s", path)

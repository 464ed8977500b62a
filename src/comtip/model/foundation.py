"""Pathology foundation models (:mod:`comtip.model.presets`) built in timm and loaded from their
published local files, strictly.

``build_foundation_vit`` makes a preset's architecture with random weights (``pretrained=False``:
nothing is downloaded); ``load_foundation_weights`` reads the official file, converts its key
layout (:mod:`comtip.model.foundation_keys`) and loads it so that every parameter of the ViT
comes from the file: a missing or unexpected key, or a shape that differs, is one
:class:`~comtip._core.errors.ConfigError` naming the config key and the file and listing the keys
(first few of each) — never a half-random backbone. ``pooled_features`` is the feature each model
is used with (the class token, or Virchow's class token + patch-token mean).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import GluMlp, Mlp, SwiGLU, SwiGLUPacked, get_act_layer
from timm.models import load_state_dict
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from comtip._core.errors import ConfigError
from comtip.model.foundation_keys import TO_TIMM
from comtip.model.presets import FoundationPreset

log = logging.getLogger(__name__)

# timm MLP classes a recipe (or model.vision_kwargs) may name.
MLP_LAYERS = {"Mlp": Mlp, "GluMlp": GluMlp, "SwiGLU": SwiGLU, "SwiGLUPacked": SwiGLUPacked}
SHOWN_KEYS = 8  # keys listed per kind in a mismatch error


def timm_create_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``vision_kwargs`` for ``timm.create_model``: ``mlp_layer`` named by its timm class name
    (:data:`MLP_LAYERS`) and ``act_layer`` by timm's activation name (``"silu"``) become the
    classes; everything else is passed as it is."""
    out = dict(kwargs)
    if isinstance(out.get("mlp_layer"), str):
        name = out["mlp_layer"]
        if name not in MLP_LAYERS:
            raise ValueError(f"vision_kwargs mlp_layer {name!r}: must be one of {sorted(MLP_LAYERS)}")
        out["mlp_layer"] = MLP_LAYERS[name]
    if isinstance(out.get("act_layer"), str):
        out["act_layer"] = get_act_layer(out["act_layer"])
    return out


def build_foundation_vit(recipe: FoundationPreset, *, image_size: int | None = None) -> VisionTransformer:
    """The preset's timm architecture with random weights, at ``image_size`` (default: the
    model's own input size), without classifier, with a fixed position embedding."""
    size = recipe.input_size if image_size is None else image_size
    kwargs = timm_create_kwargs(recipe.backbone_kwargs)
    return timm.create_model(recipe.vision_model, pretrained=False, img_size=size, num_classes=0, **kwargs)


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN_KEYS])
    more = len(keys) - SHOWN_KEYS
    return f"[{shown}{f', ... and {more} more' if more > 0 else ''}]"


def read_weights_file(path: str | Path, *, key: str) -> dict[str, torch.Tensor]:
    """The state dict of a local ``.bin``/``.pt``/``.pth`` (a ``{"state_dict": ...}`` or
    ``{"model": ...}`` wrapper works) or ``.safetensors`` file; a ConfigError naming ``key`` when
    the file is absent or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config key '{key}': no such file {path.absolute()}")
    try:
        return load_state_dict(str(path), use_ema=False)
    except Exception as err:  # a truncated download, an HTML error page saved as .bin, ...
        raise ConfigError(f"config key '{key}': cannot read {path.absolute()} as weights: {err}") from err


def load_foundation_weights(
    vit: VisionTransformer, path: str | Path, recipe: FoundationPreset, *, key: str = "model.pretrained_weights"
) -> None:
    """Load ``recipe``'s official file at ``path`` into ``vit`` (built by
    :func:`build_foundation_vit`, or CoMTIP's backbone with ``model.vision_preset``).

    The file's keys are converted from the preset's layout to timm's; a position embedding made
    at another input size is resampled to ``vit``'s (timm's ``checkpoint_filter_fn``); a
    classifier head is dropped. Then every parameter and buffer of ``vit`` must come from the file
    and every key of the file must be used, or a ConfigError names ``key``, the file, the layout
    and the missing/unexpected keys (first :data:`SHOWN_KEYS` of each)."""
    path = Path(path)
    where = f"config key '{key}': {path.absolute()}"
    state = TO_TIMM[recipe.layout](read_weights_file(path, key=key))
    what = f"{recipe.title}'s weights in its published layout '{recipe.layout}'"
    try:
        state = checkpoint_filter_fn(state, vit)
    except Exception as err:  # e.g. a position embedding of a shape no grid explains
        raise ConfigError(f"{where}: does not hold {what}: {err}") from err
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    expected = vit.state_dict()
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    if missing or unexpected:
        raise ConfigError(
            f"{where}: does not hold {what} (architecture {recipe.vision_model}): "
            f"{len(missing)} missing keys {_listed(missing)}, {len(unexpected)} unexpected keys {_listed(unexpected)}"
        )
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape
    ]
    if wrong:
        raise ConfigError(f"{where}: does not hold {what}: {len(wrong)} shapes differ {_listed(wrong)}")
    vit.load_state_dict(state, strict=True)
    log.info("vision encoder %s: loaded %s from %s", recipe.vision_model, recipe.title, path)


def pooled_features(vit: VisionTransformer, recipe: FoundationPreset, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) normalised images → (B, ``recipe.embed_dim``): the class token after the
    final norm, or (``token_patch_mean``, Virchow) that and the mean of the patch tokens
    (register tokens excluded) side by side."""
    tokens = vit.forward_features(images)
    if recipe.pooling == "token":
        return tokens[:, 0]
    return torch.cat([tokens[:, 0], tokens[:, vit.num_prefix_tokens :].mean(dim=1)], dim=-1)

"""Pathology foundation models as vision backbones: one recipe per model, declared once.

Standard library only: the workflow reads this table when Snakemake parses it (the
``ridge_<preset>`` methods of :mod:`comtip.predict.registry`, the ``model.vision_preset`` check),
so it must not import torch. The torch side — the key layouts of the published files and the
loader — is :mod:`comtip.model.foundation_keys` and :mod:`comtip.model.foundation`.

Each recipe is what the model's card (or its ``hf_hub`` timm ``config.json``) gives: the timm
architecture and its keyword arguments, the input size, the per-channel mean/std, the width of
the feature the model is used with, the file as published and its key layout. ``mlp_layer`` and
``act_layer`` are written by name (``"SwiGLUPacked"``, ``"silu"``) so that a recipe stays plain
data (YAML, checkpoints); :func:`comtip.model.foundation.timm_create_kwargs` turns them into the
timm classes. What could not be checked against the published files here (no network) is said in
``unverified`` and in ``docs/model.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)

# How the keys of the published file are named (comtip.model.foundation_keys converts each to timm's).
LAYOUTS = ("timm", "hf_vit", "hf_dinov2", "open_clip_trunk")
# The feature of one image: the class token after the final norm (timm's "token" pooling), or
# Virchow's class token concatenated with the mean of the patch tokens (register tokens excluded).
POOLINGS = ("token", "token_patch_mean")
# timm.create_model arguments that the pipeline sets itself, never from a recipe's backbone kwargs:
# the input size (model.image_size / the preset's input size), no classifier, a fixed position
# embedding (Masked Feature Modeling indexes it) and the class-token pooling.
PIPELINE_SET = ("img_size", "num_classes", "dynamic_img_size", "global_pool")


@dataclass(frozen=True)
class FoundationPreset:
    """One pathology foundation model: its timm recipe, its preprocessing and its published file."""

    name: str
    title: str
    source: str  # where the file is published (Hugging Face repository)
    weights_file: str  # the file's name as published
    layout: str  # key layout of that file (LAYOUTS)
    vision_model: str  # timm architecture
    timm_kwargs: dict[str, Any]  # as the model card / hf_hub config gives them
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    embed_dim: int  # width of the feature (after pooling)
    pooling: str = "token"
    unverified: str = ""  # what could not be checked against the published file here
    notes: str = ""

    def __post_init__(self) -> None:
        # programming errors in this file, caught by its tests
        assert self.layout in LAYOUTS, self.layout
        assert self.pooling in POOLINGS, self.pooling

    @property
    def backbone_kwargs(self) -> dict[str, Any]:
        """The recipe's timm kwargs without those the pipeline sets itself (:data:`PIPELINE_SET`)."""
        return {k: v for k, v in self.timm_kwargs.items() if k not in PIPELINE_SET}


_UNI2_KWARGS = {
    "img_size": 224,
    "patch_size": 14,
    "depth": 24,
    "num_heads": 24,
    "init_values": 1e-5,
    "embed_dim": 1536,
    "mlp_ratio": 2.66667 * 2,
    "num_classes": 0,
    "no_embed_class": True,
    "mlp_layer": "SwiGLUPacked",
    "act_layer": "silu",
    "reg_tokens": 8,
    "dynamic_img_size": True,
}
_HOPTIMUS_KWARGS = {
    "img_size": 224,
    "num_classes": 0,
    "global_pool": "token",
    "init_values": 1e-5,
    "dynamic_img_size": False,
}

_HOPTIMUS_0 = FoundationPreset(
    "h_optimus_0",
    "H-optimus-0",
    "bioptimus/H-optimus-0",
    "pytorch_model.bin",
    "timm",
    "vit_giant_patch14_reg4_dinov2",
    _HOPTIMUS_KWARGS,
    224,
    HOPTIMUS_MEAN,
    HOPTIMUS_STD,
    1536,
    notes="ViT-g/14, SwiGLU, 4 register tokens",
)

PRESETS: dict[str, FoundationPreset] = {
    p.name: p
    for p in (
        FoundationPreset(
            "uni",
            "UNI",
            "MahmoodLab/UNI",
            "pytorch_model.bin",
            "timm",
            "vit_large_patch16_224",
            {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": True},
            224,
            IMAGENET_MEAN,
            IMAGENET_STD,
            1024,
        ),
        FoundationPreset(
            "uni2_h",
            "UNI2-h",
            "MahmoodLab/UNI2-h",
            "pytorch_model.bin",
            "timm",
            "vit_giant_patch14_224",
            _UNI2_KWARGS,
            224,
            IMAGENET_MEAN,
            IMAGENET_STD,
            1536,
            notes="ViT-H/14-sized (24 blocks, width 1536) with SwiGLU, 8 register tokens",
        ),
        FoundationPreset(
            "phikon",
            "Phikon",
            "owkin/phikon",
            "model.safetensors",
            "hf_vit",
            "vit_base_patch16_224",
            {"img_size": 224, "num_classes": 0},
            224,
            IMAGENET_MEAN,
            IMAGENET_STD,
            768,
            unverified="the published file's name (model.safetensors or pytorch_model.bin; both read) and "
            "that its keys carry no 'vit.' prefix; HF ViT's LayerNorm eps is 1e-12, timm's 1e-6",
        ),
        FoundationPreset(
            "phikon_v2",
            "Phikon-v2",
            "owkin/phikon-v2",
            "model.safetensors",
            "hf_dinov2",
            "vit_large_patch16_224",
            {"img_size": 224, "init_values": 1e-5, "num_classes": 0},
            224,
            IMAGENET_MEAN,
            IMAGENET_STD,
            1024,
            unverified="the published file's name, and that its config is a plain Dinov2 (no SwiGLU, no "
            "register tokens) at patch 16",
        ),
        _HOPTIMUS_0,
        replace(
            _HOPTIMUS_0,
            name="h_optimus_1",
            title="H-optimus-1",
            source="bioptimus/H-optimus-1",
            notes="ViT-g/14, SwiGLU, 4 register tokens (H-optimus-0's architecture)",
        ),
        FoundationPreset(
            "virchow2",
            "Virchow2",
            "paige-ai/Virchow2",
            "pytorch_model.bin",
            "timm",
            "vit_huge_patch14_224",
            {
                "img_size": 224,
                "init_values": 1e-5,
                "num_classes": 0,
                "reg_tokens": 4,
                "mlp_ratio": 5.3375,
                "global_pool": "",
                "dynamic_img_size": True,
                "mlp_layer": "SwiGLUPacked",
                "act_layer": "silu",
            },
            224,
            IMAGENET_MEAN,
            IMAGENET_STD,
            2560,
            pooling="token_patch_mean",
            notes="ViT-H/14, SwiGLU, 4 register tokens; the feature is the class token and the mean of "
            "the patch tokens concatenated (2 × 1280), as the model card embeds a tile",
        ),
        FoundationPreset(
            "gigapath",
            "Prov-GigaPath tile encoder",
            "prov-gigapath/prov-gigapath",
            "pytorch_model.bin",
            "timm",
            "vit_giant_patch14_dinov2",
            {
                "img_size": 224,
                "in_chans": 3,
                "patch_size": 16,
                "embed_dim": 1536,
                "depth": 40,
                "num_heads": 24,
                "init_values": 1e-5,
                "mlp_ratio": 5.33334,
                "num_classes": 0,
            },
            224,
            IMAGENET_MEAN,
            IMAGENET_STD,
            1536,
            notes="ViT-g (timm's vit_giant_patch14_dinov2: SwiGLU) with patch_size 16 as its hf_hub config "
            "sets it, so 14 × 14 patches at 224 px",
        ),
        FoundationPreset(
            "conch",
            "CONCH (vision tower)",
            "MahmoodLab/CONCH",
            "pytorch_model.bin",
            "open_clip_trunk",
            "vit_base_patch16_224",
            {"img_size": 448, "num_classes": 0},
            448,
            OPENAI_CLIP_MEAN,
            OPENAI_CLIP_STD,
            768,
            unverified="CONCH's mean/std (OpenAI CLIP's, from CONCH's open_clip_custom transform, not read "
            "here) and that the trunk keeps timm's final norm",
            notes="only the ViT-B/16 trunk (visual.trunk.*) at 448 px; the feature is its class token, "
            "not CONCH's 512-d attention-pooled contrastive embedding (visual.attn_pool_contrast, not loaded)",
        ),
    )
}
PRESET_NAMES = tuple(PRESETS)
# model: keys a preset fills when the user leaves them out (an explicit value wins).
PRESET_KEYS = ("vision_model", "vision_kwargs", "image_size", "image_mean", "image_std")


def preset(name: str) -> FoundationPreset:
    """The recipe of ``name``; a ``ValueError`` listing the known names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown vision_preset {name!r}; known: {', '.join(PRESETS)}") from None


def apply_vision_preset(values: dict[str, Any]) -> dict[str, Any]:
    """``model:`` values with their ``vision_preset`` filled in: the preset's architecture, its
    backbone kwargs (under the user's ``vision_kwargs``, which win key by key), its input size and
    its mean/std, each only where the user did not set it. A ``vision_model`` other than the
    preset's is refused: the preset's loader converts that model's file, no other. Without a
    preset the values are returned unchanged."""
    name = values.get("vision_preset")
    if name is None:
        return dict(values)
    if name not in PRESETS:
        raise ValueError(f"model config key 'vision_preset': {name!r} must be one of {PRESET_NAMES}")
    recipe = PRESETS[name]
    given = values.get("vision_model")
    if given is not None and given != recipe.vision_model:
        raise ValueError(
            f"model config key 'vision_model': {given!r} conflicts with vision_preset {name!r} "
            f"({recipe.vision_model}); leave vision_model out"
        )
    out = dict(values)
    out["vision_model"] = recipe.vision_model
    out["vision_kwargs"] = {**recipe.backbone_kwargs, **dict(values.get("vision_kwargs") or {})}
    out.setdefault("image_size", recipe.input_size)
    if values.get("image_mean") is None and values.get("image_std") is None:
        out["image_mean"], out["image_std"] = recipe.mean, recipe.std
    return out

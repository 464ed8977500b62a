"""Key layouts of the published foundation-model files, each converted to timm's ViT keys.

One pair of pure functions per layout (:data:`comtip.model.presets.LAYOUTS`): ``*_to_timm`` turns
the official state dict into the timm ``VisionTransformer`` one, ``timm_to_*`` is its inverse
(what the tests write as "the official file", and a way to export). Neither mutates its input.
A key a conversion does not know is passed through under its own name, so that the strict load
(:func:`comtip.model.foundation.load_foundation_weights`) lists it as unexpected instead of
dropping it; only keys a layout documents as unused are dropped (:data:`DROPPED`).

* ``timm`` — the file is a timm state dict as it is (UNI, UNI2-h, H-optimus-0/1, Virchow2,
  Prov-GigaPath).
* ``hf_vit`` — Hugging Face ``transformers`` ``ViTModel`` (Phikon): ``embeddings.*``,
  ``encoder.layer.{i}.attention.attention.{query,key,value}``, ``layernorm_before/after``,
  ``intermediate.dense``/``output.dense``, ``layernorm``; query, key and value are stacked into
  timm's fused ``qkv``.
* ``hf_dinov2`` — ``transformers`` ``Dinov2Model`` (Phikon-v2): as ``hf_vit`` with ``norm1/2``,
  ``mlp.fc1/fc2`` and LayerScale ``layer_scale{1,2}.lambda1`` (timm ``ls{1,2}.gamma``).
* ``open_clip_trunk`` — an open_clip model whose image tower is a timm ViT under
  ``visual.trunk.*`` (CONCH): the trunk's keys with the prefix removed; the rest of the file
  (text tower, attention poolers, projections, logit scale) is not the trunk and is dropped.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

State = dict[str, torch.Tensor]

# What each layout's file holds that the ViT trunk does not use (dropped, documented).
DROPPED = {
    "timm": (),
    "hf_vit": ("pooler.dense.weight", "pooler.dense.bias"),  # ViTModel's tanh pooler: not the CLS feature
    "hf_dinov2": ("embeddings.mask_token",),  # only used by masked-image pretraining
    "open_clip_trunk": ("everything outside visual.trunk.",),
}
OPEN_CLIP_TRUNK = "visual.trunk."

# (official block-local name, timm block-local name), per HF layout; q/k/v handled apart.
_HF_VIT_BLOCK = (
    ("layernorm_before", "norm1"),
    ("attention.output.dense", "attn.proj"),
    ("layernorm_after", "norm2"),
    ("intermediate.dense", "mlp.fc1"),
    ("output.dense", "mlp.fc2"),
)
_HF_DINOV2_BLOCK = (
    ("norm1", "norm1"),
    ("attention.output.dense", "attn.proj"),
    ("layer_scale1.lambda1", "ls1.gamma"),
    ("norm2", "norm2"),
    ("mlp.fc1", "mlp.fc1"),
    ("mlp.fc2", "mlp.fc2"),
    ("layer_scale2.lambda1", "ls2.gamma"),
)
_HF_EMBEDDINGS = (
    ("embeddings.cls_token", "cls_token"),
    ("embeddings.position_embeddings", "pos_embed"),
    ("embeddings.patch_embeddings.projection.weight", "patch_embed.proj.weight"),
    ("embeddings.patch_embeddings.projection.bias", "patch_embed.proj.bias"),
    ("layernorm.weight", "norm.weight"),
    ("layernorm.bias", "norm.bias"),
)
_HF_QKV = re.compile(r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)")
_TIMM_QKV = re.compile(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)")


def _rename_block(key: str, pairs: tuple[tuple[str, str], ...], src: str, dst: str) -> str | None:
    """``{src}{i}.{a}.{w}`` → ``{dst}{i}.{b}.{w}`` for the pair (a, b); None when no pair fits."""
    match = re.fullmatch(re.escape(src) + r"(\d+)\.(.+)", key)
    if match is None:
        return None
    index, rest = match.groups()
    for a, b in pairs:
        if rest.startswith(a + "."):
            return f"{dst}{index}.{b}{rest[len(a) :]}"
        if rest == a:  # a parameter without .weight/.bias (LayerScale's lambda1)
            return f"{dst}{index}.{b}"
    return None


def _hf_to_timm(state: State, block: tuple[tuple[str, str], ...], dropped: tuple[str, ...]) -> State:
    out: State = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    embeddings = dict(_HF_EMBEDDINGS)
    for key, value in state.items():
        if key in dropped:
            continue
        if key in embeddings:
            out[embeddings[key]] = value
            continue
        match = _HF_QKV.fullmatch(key)
        if match is not None:
            index, part, kind = match.groups()
            qkv.setdefault((index, kind), {})[part] = value
            continue
        renamed = _rename_block(key, block, "encoder.layer.", "blocks.")
        out[renamed if renamed is not None else key] = value
    for (index, kind), parts in qkv.items():
        if set(parts) == {"query", "key", "value"}:
            out[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
        else:  # an incomplete triple stays under its own names: the strict load names it
            out.update({f"encoder.layer.{index}.attention.attention.{p}.{kind}": v for p, v in parts.items()})
    return out


def _timm_to_hf(state: State, block: tuple[tuple[str, str], ...]) -> State:
    out: State = {}
    embeddings = {b: a for a, b in _HF_EMBEDDINGS}
    inverse = tuple((b, a) for a, b in block)
    for key, value in state.items():
        if key in embeddings:
            out[embeddings[key]] = value
            continue
        match = _TIMM_QKV.fullmatch(key)
        if match is not None:
            index, kind = match.groups()
            for part, chunk in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                out[f"encoder.layer.{index}.attention.attention.{part}.{kind}"] = chunk.clone()
            continue
        renamed = _rename_block(key, inverse, "blocks.", "encoder.layer.")
        out[renamed if renamed is not None else key] = value
    return out


def timm_to_timm(state: State) -> State:
    """The ``timm`` layout: the file is already a timm state dict."""
    return dict(state)


def hf_vit_to_timm(state: State) -> State:
    """``transformers`` ``ViTModel`` keys → timm (Phikon); the pooler is dropped."""
    return _hf_to_timm(state, _HF_VIT_BLOCK, DROPPED["hf_vit"])


def timm_to_hf_vit(state: State) -> State:
    """timm → ``transformers`` ``ViTModel`` keys (without a pooler)."""
    return _timm_to_hf(state, _HF_VIT_BLOCK)


def hf_dinov2_to_timm(state: State) -> State:
    """``transformers`` ``Dinov2Model`` keys → timm (Phikon-v2); the mask token is dropped."""
    return _hf_to_timm(state, _HF_DINOV2_BLOCK, DROPPED["hf_dinov2"])


def timm_to_hf_dinov2(state: State) -> State:
    """timm → ``transformers`` ``Dinov2Model`` keys, with a zero mask token as that model holds."""
    out = _timm_to_hf(state, _HF_DINOV2_BLOCK)
    width = state["cls_token"].shape[-1]
    out["embeddings.mask_token"] = torch.zeros(1, width, dtype=state["cls_token"].dtype)
    return out


def open_clip_trunk_to_timm(state: State) -> State:
    """open_clip ``visual.trunk.*`` keys → timm (CONCH); keys outside the trunk are dropped."""
    return {k[len(OPEN_CLIP_TRUNK) :]: v for k, v in state.items() if k.startswith(OPEN_CLIP_TRUNK)}


def timm_to_open_clip_trunk(state: State) -> State:
    """timm → open_clip ``visual.trunk.*`` keys (the trunk only)."""
    return {OPEN_CLIP_TRUNK + k: v for k, v in state.items()}


TO_TIMM: dict[str, Callable[[State], State]] = {
    "timm": timm_to_timm,
    "hf_vit": hf_vit_to_timm,
    "hf_dinov2": hf_dinov2_to_timm,
    "open_clip_trunk": open_clip_trunk_to_timm,
}
FROM_TIMM: dict[str, Callable[[State], State]] = {
    "timm": timm_to_timm,
    "hf_vit": timm_to_hf_vit,
    "hf_dinov2": timm_to_hf_dinov2,
    "open_clip_trunk": timm_to_open_clip_trunk,
}

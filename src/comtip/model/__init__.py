"""CoMTIP model (torch + timm): ViT with Masked Feature Modeling, Gene-Text Encoder with
Pair-aware Adversarial Training, InfoNCE alignment. Design choices: ``docs/model.md``."""

# Names resolve on first use (PEP 562): importing a light submodule (e.g. the config
# dataclasses, which the Snakefile reads at parse time) does not import torch and timm.
from __future__ import annotations

import importlib

_EXPORTS = {
    "subsample_sentences": "comtip.model.augment",
    "CoMTIP": "comtip.model.comtip",
    "ModelConfig": "comtip.model.config",
    "GeneTextEncoder": "comtip.model.gene_text",
    "HashNameEncoder": "comtip.model.gene_text",
    "MiniLMNameEncoder": "comtip.model.gene_text",
    "name_ngrams": "comtip.model.gene_text",
    "ngram_bucket": "comtip.model.gene_text",
    "gather_with_grad": "comtip.model.losses",
    "info_nce": "comtip.model.losses",
    "PairDiscriminator": "comtip.model.paat",
    "adversarial_delta": "comtip.model.paat",
    "shuffle_values": "comtip.model.paat",
    "MaskFeatureGenerator": "comtip.model.vision",
    "VisionEncoder": "comtip.model.vision",
    "VisionOutput": "comtip.model.vision",
    "load_vit_weights": "comtip.model.vision",
    "n_visible_tokens": "comtip.model.vision",
    "preprocess_images": "comtip.model.vision",
    "random_masking": "comtip.model.vision",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

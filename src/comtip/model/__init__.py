"""CoMTIP model (torch + timm): ViT with Masked Feature Modeling, Gene-Text Encoder with
Pair-aware Adversarial Training, InfoNCE alignment. Design choices: ``docs/model.md``."""

# Names resolve on first use (comtip._core.lazy): importing a light submodule does not import torch.
from __future__ import annotations

from comtip._core.lazy import lazy_exports

_EXPORTS = {
    "subsample_sentences": "comtip.model.sentence_cuts",
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

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

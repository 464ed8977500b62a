"""CoMTIP model (torch + timm): ViT with Masked Feature Modeling, Gene-Text Encoder with
Pair-aware Adversarial Training, InfoNCE alignment. Design choices: ``docs/model.md``."""

from comtip.model.augment import subsample_sentences
from comtip.model.comtip import CoMTIP
from comtip.model.config import ModelConfig
from comtip.model.gene_text import GeneTextEncoder, HashNameEncoder, MiniLMNameEncoder, name_ngrams, ngram_bucket
from comtip.model.losses import gather_with_grad, info_nce
from comtip.model.paat import PairDiscriminator, adversarial_delta, shuffle_values
from comtip.model.vision import (
    MaskFeatureGenerator,
    VisionEncoder,
    VisionOutput,
    load_vit_weights,
    n_visible_tokens,
    preprocess_images,
    random_masking,
)

__all__ = [
    "CoMTIP",
    "GeneTextEncoder",
    "HashNameEncoder",
    "MaskFeatureGenerator",
    "MiniLMNameEncoder",
    "ModelConfig",
    "PairDiscriminator",
    "VisionEncoder",
    "VisionOutput",
    "adversarial_delta",
    "gather_with_grad",
    "info_nce",
    "load_vit_weights",
    "n_visible_tokens",
    "name_ngrams",
    "ngram_bucket",
    "preprocess_images",
    "random_masking",
    "shuffle_values",
    "subsample_sentences",
]

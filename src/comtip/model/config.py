"""All options of the CoMTIP model in one dataclass, built from the config key ``model``.

Every option has a default, so ``ModelConfig()`` is a working (small, CPU-friendly) model; the
paper's settings differ where noted (ViT-B/32 backbone). ``ModelConfig.from_dict`` is the only
way the pipeline builds one from YAML: it rejects unknown keys so a typo fails before training
instead of silently running with the default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from comtip.model.presets import PRESETS, apply_vision_preset

NAME_ENCODERS = ("hash", "minilm")
# What a gene token is made of: name + value (CoMTIP), or one of them (the token ablations).
GENE_TOKENS = ("both", "value_only", "name_only")
TEXT_POOLINGS = ("cls", "mean")
CONTRASTIVE_LOSSES = ("infonce", "siglip")
# How training sentences are cut (pretraining options; the cuts are model.sentence_cuts).
LENGTH_DISTRIBUTIONS = ("uniform", "log_uniform")
GENE_POOLS = ("expressed", "vocabulary")
# What checkpoints written before the image normalisation was recorded were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ModelConfig:
    """Options of :class:`comtip.model.CoMTIP` (see ``docs/model.md`` for what each part does)."""

    # Vision encoder (timm). The paper uses "vit_base_patch32_224"; the default is small for CPU.
    vision_model: str = "vit_tiny_patch16_224"
    image_size: int = 112
    vision_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model kwargs
    pretrained_weights: str | None = None  # local .pt/.pth/.bin/.safetensors; None = random init
    # A pathology foundation model (comtip.model.presets: uni, phikon, ...): sets vision_model,
    # vision_kwargs, image_size and image_mean/std where they are not given (from_dict), and
    # pretrained_weights is then read in that model's published key layout. None = as before.
    vision_preset: str | None = None
    # Per-channel image normalisation (of RGB in [0, 1]); None = the backbone's own, from timm's
    # pretrained_cfg (0.5/0.5 for the augreg ViTs, ImageNet's for others). Resolved when the
    # model is built and stored in its checkpoint, so every later stage uses the same values.
    image_mean: tuple[float, float, float] | None = None
    image_std: tuple[float, float, float] | None = None
    embed_dim: int = 256  # shared image-text space
    # Masked Feature Modeling
    mfm: bool = True
    mask_ratio: float = 0.5
    mfm_heads: int = 4
    # Gene-Text Encoder
    name_encoder: str = "hash"  # "hash" (character n-grams) | "minilm" (frozen sentence model)
    name_ngrams: tuple[int, ...] = (2, 3, 4)
    name_buckets: int = 8192
    text_dim: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_ff: int = 256
    text_pooling: str = "cls"  # "cls" (CLS slot) | "mean" (mean of the gene tokens' outputs)
    # "both" = name + value embeddings; "value_only" drops the name embedding (a token no longer
    # knows its gene), "name_only" drops the value embedding (value MLP and bin embedding)
    gene_tokens: str = "both"
    dropout: float = 0.1
    n_bins: int = 16
    # Pair-aware Adversarial Training
    paat: bool = True
    paat_shuffle_negatives: bool = True
    paat_discriminator: bool = True
    paat_adversarial: bool = True
    paat_epsilon: float = 0.05  # L-inf radius, relative to the RMS of the token embeddings
    paat_steps: int = 1  # 1 = FGSM, > 1 = PGD
    # Gene-value contrast (ours, off by default: measured no better on the demo, docs/model.md):
    # one-gene prompts "g at v" for the spots of a batch, each image must pick its own value
    # (losses.value_contrast), so that the zero-shot prompts themselves are trained
    value_contrast: bool = False
    value_contrast_genes: int = 8  # genes probed per batch
    lambda_value: float = 1.0
    # Loss
    lambda_mfm: float = 1.0
    lambda_paat: float = 0.5
    temperature_init: float = 0.07
    max_logit_scale: float = 100.0
    # "infonce" (symmetric, CLIP) or "siglip" (sigmoid loss with a learnable bias; HESCAPE's
    # alternative), which starts at siglip_temperature_init (HESCAPE: 0.1) and siglip_bias_init
    # (SigLIP's -10, so that the many negative pairs start near σ = 0)
    contrastive_loss: str = "infonce"
    siglip_temperature_init: float = 0.1
    siglip_bias_init: float = -10.0
    # DELST's entailment option (arXiv 2503.00804, MERU-style; docs/model.md): the projections are
    # lifted to a Lorentz hyperboloid and the sentence's cone must hold its image (weight
    # entailment_lambda) and a half-cut sentence's cone its full sentence (entailment_beta)
    entailment: bool = False
    entailment_lambda: float = 0.2  # MERU's λ
    entailment_beta: float = 0.1
    entailment_curvature: float = 1.0  # initial c, learnable, clamped to [0.1, 10] (MERU)
    entailment_min_radius: float = 0.1  # K of the half-aperture (MERU)

    def __post_init__(self) -> None:
        self.name_ngrams = tuple(int(n) for n in self.name_ngrams)
        self.vision_kwargs = dict(self.vision_kwargs)
        if self.image_mean is not None:
            self.image_mean = tuple(float(v) for v in self.image_mean)
        if self.image_std is not None:
            self.image_std = tuple(float(v) for v in self.image_std)
        reserved = sorted({"img_size", "num_classes", "pretrained"} & set(self.vision_kwargs))
        recipe = PRESETS.get(self.vision_preset) if self.vision_preset is not None else None
        checks = [
            ("vision_preset", self.vision_preset is None or recipe is not None, f"must be one of {tuple(PRESETS)}"),
            (
                "vision_model",
                recipe is None or self.vision_model == recipe.vision_model,
                f"conflicts with vision_preset {self.vision_preset!r} (build the config with from_dict)",
            ),
            ("vision_kwargs", not reserved, f"must not set {reserved}: use image_size / pretrained_weights"),
            ("image_size", self.image_size >= 8, "must be >= 8"),
            ("image_mean", (self.image_mean is None) == (self.image_std is None), "and image_std: set both or neither"),
            ("image_mean", self.image_mean is None or len(self.image_mean) == 3, "must be 3 values (R, G, B)"),
            (
                "image_std",
                self.image_std is None or (len(self.image_std) == 3 and min(self.image_std) > 0),
                "must be 3 positive values (R, G, B)",
            ),
            ("embed_dim", self.embed_dim >= 1, "must be >= 1"),
            ("mask_ratio", 0.0 < self.mask_ratio < 1.0, "must be in (0, 1)"),
            ("mfm_heads", self.mfm_heads >= 1, "must be >= 1"),
            ("name_encoder", self.name_encoder in NAME_ENCODERS, f"must be one of {NAME_ENCODERS}"),
            ("name_ngrams", bool(self.name_ngrams) and min(self.name_ngrams) >= 1, "must be non-empty, each >= 1"),
            ("name_buckets", self.name_buckets >= 1, "must be >= 1"),
            ("text_dim", self.text_dim >= 1, "must be >= 1"),
            ("text_layers", self.text_layers >= 1, "must be >= 1"),
            (
                "text_heads",
                self.text_heads >= 1 and self.text_dim % self.text_heads == 0,
                "must be >= 1 and divide text_dim",
            ),
            ("text_ff", self.text_ff >= 1, "must be >= 1"),
            ("text_pooling", self.text_pooling in TEXT_POOLINGS, f"must be one of {TEXT_POOLINGS}"),
            ("gene_tokens", self.gene_tokens in GENE_TOKENS, f"must be one of {GENE_TOKENS}"),
            ("dropout", 0.0 <= self.dropout < 1.0, "must be in [0, 1)"),
            ("n_bins", self.n_bins >= 2, "must be >= 2 (bin 0 is zero expression)"),
            ("paat_epsilon", self.paat_epsilon >= 0.0, "must be >= 0"),
            ("paat_steps", self.paat_steps >= 1, "must be >= 1"),
            ("value_contrast_genes", self.value_contrast_genes >= 1, "must be >= 1"),
            ("lambda_value", self.lambda_value >= 0.0, "must be >= 0"),
            ("lambda_mfm", self.lambda_mfm >= 0.0, "must be >= 0"),
            ("lambda_paat", self.lambda_paat >= 0.0, "must be >= 0"),
            ("temperature_init", self.temperature_init > 0.0, "must be > 0"),
            ("max_logit_scale", self.max_logit_scale >= 1.0 / self.temperature_init, "must be >= 1 / temperature_init"),
            ("contrastive_loss", self.contrastive_loss in CONTRASTIVE_LOSSES, f"must be one of {CONTRASTIVE_LOSSES}"),
            ("siglip_temperature_init", self.siglip_temperature_init > 0.0, "must be > 0"),
            ("entailment_lambda", self.entailment_lambda >= 0.0, "must be >= 0"),
            ("entailment_beta", self.entailment_beta >= 0.0, "must be >= 0"),
            ("entailment_curvature", 0.1 <= self.entailment_curvature <= 10.0, "must be in [0.1, 10]"),
            ("entailment_min_radius", self.entailment_min_radius > 0.0, "must be > 0"),
            (
                "max_logit_scale",
                self.contrastive_loss != "siglip" or self.max_logit_scale >= 1.0 / self.siglip_temperature_init,
                "must be >= 1 / siglip_temperature_init",
            ),
        ]
        for key, ok, why in checks:
            if not ok:
                raise ValueError(f"model config key '{key}': {getattr(self, key)!r} {why}")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> ModelConfig:
        """Build from a plain dict (YAML); unknown keys raise ValueError naming them. A
        ``vision_preset`` fills the keys it sets that ``d`` leaves out
        (:func:`comtip.model.presets.apply_vision_preset`): an explicit value wins."""
        d = dict(d or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**apply_vision_preset(d))

    @classmethod
    def architecture(cls, d: dict[str, Any]) -> ModelConfig:
        """The architecture of a stored config without its ``pretrained_weights``: what rebuilding
        a model from a checkpoint needs (the checkpoint holds the weights; the weights file may
        not exist where the checkpoint is read, and a ``random`` encoder must not load it)."""
        d = {**d, "pretrained_weights": None}
        if "image_mean" not in d:  # a checkpoint from before the normalisation was stored: ImageNet's
            d.update(image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (lists for tuples) for checkpoints and YAML; ``from_dict`` reads it back."""
        d = dataclasses.asdict(self)
        d["name_ngrams"] = list(self.name_ngrams)
        for key in ("image_mean", "image_std"):
            d[key] = None if d[key] is None else list(d[key])
        return d

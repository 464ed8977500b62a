"""CoMTIP: image encoder (ViT + MFM) and Gene-Text Encoder (+ PAAT) aligned with InfoNCE.

Loss = InfoNCE + lambda_mfm · MFM + lambda_paat · PAAT + lambda_value · VALUE, where PAAT =
discriminator BCE + InfoNCE of adversarially perturbed sentences (each part only when switched
on); PAAT's shuffled hard negatives enter the InfoNCE term itself (image→text direction); VALUE
is the gene-value contrast of one-gene prompts (ours, ``losses.value_contrast``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from comtip.model.config import ModelConfig
from comtip.model.gene_text import GeneTextEncoder
from comtip.model.hyperbolic import entailment_loss, exp_map0
from comtip.model.losses import info_nce, siglip, value_contrast
from comtip.model.paat import PairDiscriminator, adversarial_delta, shuffle_values
from comtip.model.sentence_cuts import value_probes
from comtip.model.vision import VisionEncoder

BATCH_KEYS = ("images", "gene_ids", "values", "bins", "pad")
PROBE_KEYS = ("probe_genes", "probe_values", "probe_bins")  # optional; see CoMTIP.forward


def half_expressed_pad(values: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """Padding mask of each sentence cut to a random half (at least 1) of its expressed
    (non-zero, non-padded) genes; a sentence without expressed genes keeps its own mask."""
    expressed = (~pad) & (values != 0)
    n_expressed = expressed.sum(dim=1, keepdim=True)
    keep_n = (n_expressed // 2).clamp(min=1)
    scores = torch.rand(values.shape, device=values.device).masked_fill(~expressed, 2.0)
    ranks = scores.argsort(dim=1).argsort(dim=1)
    keep = expressed & (ranks < keep_n)
    return torch.where(n_expressed > 0, ~keep, pad)


class CoMTIP(nn.Module):
    """The pretraining model; ``forward`` returns the losses, ``encode_*`` the embeddings."""

    def __init__(self, cfg: ModelConfig, vocabulary: Sequence[str]) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision = VisionEncoder(cfg)
        self.text = GeneTextEncoder(cfg, vocabulary)
        # learnable log(1 / temperature), as CLIP; SigLIP adds a learnable bias
        siglip = cfg.contrastive_loss == "siglip"
        temperature = cfg.siglip_temperature_init if siglip else cfg.temperature_init
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
        self.logit_bias = nn.Parameter(torch.tensor(float(cfg.siglip_bias_init))) if siglip else None
        self.discriminator = PairDiscriminator(cfg.text_dim) if cfg.paat and cfg.paat_discriminator else None
        if cfg.entailment:  # DELST/MERU: log-parametrised lift scales and curvature
            log_alpha = math.log(1.0 / math.sqrt(cfg.embed_dim))
            self.entail_log_alpha_img = nn.Parameter(torch.tensor(log_alpha))
            self.entail_log_alpha_txt = nn.Parameter(torch.tensor(log_alpha))
            self.entail_log_curv = nn.Parameter(torch.tensor(math.log(cfg.entailment_curvature)))

    @property
    def vocabulary(self) -> list[str]:
        return self.text.vocabulary

    def set_vocabulary(self, names: Sequence[str]) -> None:
        """Switch the genes that ``gene_ids`` index (e.g. to held-out genes for zero-shot)."""
        self.text.set_vocabulary(names)

    def scale(self) -> torch.Tensor:
        """exp(logit_scale) clamped to ``max_logit_scale`` (no gradient beyond it, as CLIP)."""
        return self.logit_scale.exp().clamp(max=self.cfg.max_logit_scale)

    def contrastive(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        scale: torch.Tensor,
        extra: torch.Tensor | None = None,
        extra_mask: torch.Tensor | None = None,
        *,
        detach: bool = False,
    ) -> torch.Tensor:
        """``cfg.contrastive_loss`` of a batch: InfoNCE, or SigLIP with this model's bias
        (detached with ``detach``, as PAAT's attack holds the model's parameters fixed)."""
        if self.logit_bias is None:
            return info_nce(img, txt, scale, extra, extra_mask)
        bias = self.logit_bias.detach() if detach else self.logit_bias
        return siglip(img, txt, scale, bias, extra, extra_mask)

    def curvature(self) -> torch.Tensor:
        """The hyperboloid's curvature c = exp(log c) clamped to [0.1, 10] (MERU)."""
        return self.entail_log_curv.exp().clamp(0.1, 10.0)

    def lift(self, projected: torch.Tensor, modality: str) -> torch.Tensor:
        """Projection before L2 normalisation → space components on the hyperboloid."""
        log_alpha = self.entail_log_alpha_img if modality == "image" else self.entail_log_alpha_txt
        return exp_map0(projected * log_alpha.exp().clamp(max=1.0), self.curvature())

    def entailment_losses(
        self,
        img_projected: torch.Tensor,
        rep: torch.Tensor,
        tokens: torch.Tensor,
        values: torch.Tensor,
        pad: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """DELST's cross-modal (sentence ⊒ image) and intra-modal (half-cut sentence ⊒ sentence)
        entailment losses; the cut draws from the global torch RNG (only when entailment is on)."""
        curv, radius = self.curvature(), self.cfg.entailment_min_radius
        txt = self.lift(self.text.proj(rep), "text")
        cross = entailment_loss(txt, self.lift(img_projected, "image"), curv, radius)
        cut_pad = half_expressed_pad(values, pad)
        cut = self.lift(self.text.proj(self.text.encode_from_tokens(tokens, cut_pad)), "text")
        return cross, entailment_loss(cut, txt, curv, radius)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised float (B, 3, H, W) → (B, embed_dim) L2-normalised (full branch only)."""
        return self.vision.embed(images)

    def encode_sentences(
        self, gene_ids: torch.Tensor, values: torch.Tensor, bins: torch.Tensor, pad: torch.Tensor
    ) -> torch.Tensor:
        """Gene sentences (B, L) → (B, embed_dim) L2-normalised."""
        return self.text(gene_ids, values, bins, pad)

    def forward(self, batch: dict[str, torch.Tensor], *, paat: bool = True) -> dict[str, torch.Tensor]:
        """Losses of one batch: ``loss`` (total), ``loss_infonce`` (the contrastive term: InfoNCE,
        or SigLIP with ``contrastive_loss: siglip``), ``loss_mfm``, ``loss_paat``,
        ``loss_value``, ``loss_entail_cross``, ``loss_entail_intra`` (0-tensors for parts switched
        off) and ``logit_scale`` (the clamped scale, detached).

        ``paat=False`` skips every PAAT part for this batch even when ``cfg.paat`` is on (the
        training loop's PAAT warm-up, ``pretrain.paat_warmup_steps``): the loss is then
        InfoNCE + MFM (+ value contrast) and costs no extra text-encoder passes.

        The value contrast's prompts come from ``batch["probe_genes"/"probe_values"/"probe_bins"]``
        (:func:`comtip.model.sentence_cuts.value_probes` of the sentences before sub-sampling, as the
        training loop passes them); without those keys they are drawn here from the batch's
        own sentences with the global torch RNG."""
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise KeyError(f"batch lacks {missing}; needs {list(BATCH_KEYS)}")
        cfg = self.cfg
        use_paat = cfg.paat and paat
        gene_ids, values, bins, pad = (batch[k] for k in BATCH_KEYS[1:])
        vision = self.vision(batch["images"])
        img = vision.embedding
        tokens = self.text.token_embeddings(gene_ids, values, bins)
        rep = self.text.encode_from_tokens(tokens, pad)
        txt = self.text.project(rep)
        scale = self.scale()
        loss_paat = img.new_zeros(())
        extra = extra_mask = None
        if use_paat and (cfg.paat_shuffle_negatives or cfg.paat_discriminator):
            shuffled_values, shuffled_bins, changed = shuffle_values(values, bins, pad)
            shuffled_rep = self.text.encode_from_tokens(
                self.text.token_embeddings(gene_ids, shuffled_values, shuffled_bins), pad
            )
            if cfg.paat_shuffle_negatives:
                extra, extra_mask = self.text.project(shuffled_rep), changed
            if self.discriminator is not None:
                loss_paat = loss_paat + self.discriminator.loss(rep, shuffled_rep, changed)
        loss_infonce = self.contrastive(img, txt, scale, extra, extra_mask)
        if use_paat and cfg.paat_adversarial:
            img_fixed, scale_fixed = img.detach(), scale.detach()

            def attacked_loss(perturbed: torch.Tensor) -> torch.Tensor:
                adv = self.text.project(self.text.encode_from_tokens(perturbed, pad))
                return self.contrastive(img_fixed, adv, scale_fixed, detach=True)

            delta = adversarial_delta(tokens, pad, attacked_loss, cfg.paat_epsilon, cfg.paat_steps)
            adv_txt = self.text.project(self.text.encode_from_tokens(tokens + delta, pad))
            loss_paat = loss_paat + self.contrastive(img, adv_txt, scale)
        if self.discriminator is not None and not use_paat:
            # still a function of the discriminator's parameters, so DDP sees them used
            loss_paat = loss_paat + sum(p.sum() for p in self.discriminator.parameters()) * 0.0
        loss_value = img.new_zeros(())
        if cfg.value_contrast:
            if all(k in batch for k in PROBE_KEYS):
                genes, probe_values, probe_bins = (batch[k] for k in PROBE_KEYS)
            else:
                genes, probe_values, probe_bins = value_probes(gene_ids, values, bins, pad, cfg.value_contrast_genes)
            loss_value = self._value_loss(img, genes, probe_values, probe_bins, scale)
        loss = (
            loss_infonce
            + cfg.lambda_mfm * vision.loss_mfm
            + cfg.lambda_paat * loss_paat
            + cfg.lambda_value * loss_value
        )
        cross = intra = img.new_zeros(())
        if cfg.entailment:
            cross, intra = self.entailment_losses(vision.projected, rep, tokens, values, pad)
            loss = loss + cfg.entailment_lambda * cross + cfg.entailment_beta * intra
        return {
            "loss_entail_cross": cross,
            "loss_entail_intra": intra,
            "loss": loss,
            "loss_infonce": loss_infonce,
            "loss_mfm": vision.loss_mfm,
            "loss_paat": loss_paat,
            "loss_value": loss_value,
            "logit_scale": scale.detach(),
        }

    def _value_loss(
        self,
        img: torch.Tensor,
        genes: torch.Tensor,
        probe_values: torch.Tensor,
        probe_bins: torch.Tensor,
        scale: torch.Tensor,
    ) -> torch.Tensor:
        """Embed the K × B one-gene prompts in one pass and score them (losses.value_contrast)."""
        n_genes, rows = probe_values.shape
        if n_genes == 0:  # a batch without any token: nothing to probe
            return img.sum() * 0.0
        ids = genes[:, None].expand(n_genes, rows).reshape(-1, 1)
        pad = torch.zeros_like(ids, dtype=torch.bool)
        txt = self.text(ids, probe_values.reshape(-1, 1), probe_bins.reshape(-1, 1), pad)
        return value_contrast(img, txt.view(n_genes, rows, -1), probe_values, scale)

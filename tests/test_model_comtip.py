"""The whole CoMTIP model: loss parts, switches, zero-shot vocabulary swap, and overfitting a
tiny synthetic batch (image→sentence retrieval)."""

from __future__ import annotations

import math

import pytest
import torch

from comtip.model import CoMTIP, ModelConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(
        **{
            "image_size": 32,
            "vision_kwargs": {"depth": 2, "patch_size": 8, "embed_dim": 64, "num_heads": 2},
            "embed_dim": 32,
            "mfm_heads": 2,
            "text_dim": 32,
            "text_heads": 2,
            "text_ff": 64,
            "name_buckets": 1024,
            **kw,
        }
    )


def _batch(rows: int = 16, length: int = 8, vocab: int = 40, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random images, each paired with its own random sentence of distinct genes."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(vocab, generator=g)[:length] for _ in range(rows)])
    values = (torch.rand(rows, length, generator=g) * 3 + 0.1).sort(dim=1, descending=True).values
    pad = torch.zeros(rows, length, dtype=torch.bool)
    pad[0, 1:] = True  # a single-gene sentence
    pad[1, 4:] = True
    return {
        "images": torch.randn(rows, 3, 32, 32, generator=g),
        "gene_ids": ids.masked_fill(pad, 0),
        "values": values.masked_fill(pad, 0.0),
        "bins": (values * 5).long().clamp(max=15).masked_fill(pad, 0),
        "pad": pad,
    }


GENES = [f"GENE{i}" for i in range(40)]


def test_forward_returns_all_losses_and_trains_every_part():
    torch.manual_seed(0)
    model = CoMTIP(_cfg(value_contrast=True), GENES)
    out = model(_batch())
    assert set(out) == {
        "loss",
        "loss_infonce",
        "loss_mfm",
        "loss_paat",
        "loss_value",
        "loss_entail_cross",
        "loss_entail_intra",
        "logit_scale",
    }
    assert all(torch.isfinite(v) and v.ndim == 0 for v in out.values())
    assert out["loss_mfm"] > 0 and out["loss_paat"] > 0 and out["loss_value"] > 0
    cfg = model.cfg
    expected = (
        out["loss_infonce"]
        + cfg.lambda_mfm * out["loss_mfm"]
        + cfg.lambda_paat * out["loss_paat"]
        + cfg.lambda_value * out["loss_value"]
    )
    torch.testing.assert_close(out["loss"], expected)
    out["loss"].backward()
    for part in (model.vision.vit, model.vision.generator, model.text, model.discriminator):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    assert model.logit_scale.grad is not None
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_switched_off_parts_give_zero_losses():
    model = CoMTIP(_cfg(mfm=False, paat=False), GENES)
    out = model(_batch())
    assert out["loss_mfm"].item() == 0.0 and out["loss_paat"].item() == 0.0 and out["loss_value"].item() == 0.0
    torch.testing.assert_close(out["loss"], out["loss_infonce"])
    assert model.discriminator is None and model.vision.generator is None
    only_shuffle = CoMTIP(_cfg(paat_discriminator=False, paat_adversarial=False), GENES)
    assert only_shuffle(_batch())["loss_paat"].item() == 0.0  # hard negatives live in loss_infonce
    warming_up = CoMTIP(_cfg(), GENES)(_batch(), paat=False)  # the training loop's PAAT warm-up
    assert warming_up["loss_paat"].item() == 0.0
    torch.testing.assert_close(
        warming_up["loss"], warming_up["loss_infonce"] + warming_up["loss_mfm"] + warming_up["loss_value"]
    )


def test_logit_scale_is_clamped():
    model = CoMTIP(_cfg(max_logit_scale=50.0), GENES)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    assert model(_batch())["logit_scale"].item() == pytest.approx(50.0)


def test_missing_batch_key_is_named():
    with pytest.raises(KeyError, match="bins"):
        CoMTIP(_cfg(), GENES)({k: v for k, v in _batch().items() if k != "bins"})


def test_set_vocabulary_embeds_unseen_genes():
    model = CoMTIP(_cfg(), GENES).eval()
    model.set_vocabulary(["NOVEL1", "NOVEL2"])
    assert model.vocabulary == ["NOVEL1", "NOVEL2"]
    ids = torch.tensor([[0], [1]])
    emb = model.encode_sentences(
        ids, torch.ones(2, 1), torch.ones(2, 1, dtype=torch.long), torch.zeros(2, 1, dtype=torch.bool)
    )
    assert emb.shape == (2, 32) and torch.isfinite(emb).all()
    assert not torch.allclose(emb[0], emb[1])


def _train_top1(batch: dict[str, torch.Tensor], steps: int, **cfg) -> float:
    """Adam steps on one batch, then image→sentence top-1 retrieval accuracy within the batch."""
    torch.manual_seed(0)
    model = CoMTIP(_cfg(**cfg), GENES)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        img = model.encode_image(batch["images"])
        txt = model.encode_sentences(batch["gene_ids"], batch["values"], batch["bins"], batch["pad"])
    return ((img @ txt.T).argmax(dim=1) == torch.arange(len(img))).float().mean().item()


def test_overfits_a_tiny_batch():
    top1 = _train_top1(_batch(), steps=100)
    assert top1 >= 0.8, f"image→sentence top-1 {top1:.2f} (chance 1/16)"


def test_overfits_sentences_that_differ_only_in_pairing():
    """16 sentences with the SAME genes and the SAME values, re-paired: only the gene–value
    pairing tells them apart (no positional encoding, so not the token order either)."""
    g = torch.Generator().manual_seed(1)
    values = torch.linspace(3.0, 0.5, 6)
    genes = torch.stack([torch.randperm(6, generator=g) for _ in range(16)])  # value j goes to gene genes[r, j]
    batch = {
        "images": torch.randn(16, 3, 32, 32, generator=g),
        "gene_ids": genes,
        "values": values.expand(16, -1).clone(),
        "bins": (values * 5).long().expand(16, -1).clone(),
        "pad": torch.zeros(16, 6, dtype=torch.bool),
    }
    top1 = _train_top1(batch, steps=150)
    assert top1 >= 0.8, f"image→sentence top-1 {top1:.2f} (chance 1/16)"


def test_value_contrast_uses_the_given_probes_and_scores_one_gene_prompts():
    """With probe keys in the batch the loss is losses.value_contrast of exactly those prompts,
    embedded as one-gene sentences by the text encoder (recomputed here by hand)."""
    from comtip.model.losses import value_contrast

    torch.manual_seed(0)
    model = CoMTIP(_cfg(mfm=False, paat=False, value_contrast=True), GENES).eval()
    batch = _batch()
    genes = torch.tensor([3, 7])
    probe_values = torch.rand(2, 16) * 2
    probe_values[0, :5] = 0.0
    probe_bins = (probe_values * 5).long().clamp(max=15)
    out = model({**batch, "probe_genes": genes, "probe_values": probe_values, "probe_bins": probe_bins})
    img = model.encode_image(batch["images"])
    txt = torch.stack(
        [
            model.encode_sentences(g.repeat(16, 1), v[:, None], b[:, None], torch.zeros(16, 1, dtype=torch.bool))
            for g, v, b in zip(genes, probe_values, probe_bins)
        ]
    )
    torch.testing.assert_close(out["loss_value"], value_contrast(img, txt, probe_values, model.scale()))


def test_siglip_option_starts_at_hescapes_temperature_and_trains():
    """``contrastive_loss: siglip``: scale from T = 0.1, bias -10, both learnt; PAAT's parts run
    through the same loss; the tiny batch is learnt as with InfoNCE."""
    torch.manual_seed(0)
    model = CoMTIP(_cfg(contrastive_loss="siglip"), GENES)
    assert model.scale().item() == pytest.approx(10.0) and model.logit_bias.item() == -10.0
    out = model(_batch())
    assert torch.isfinite(out["loss"]) and out["loss_paat"] > 0
    out["loss"].backward()
    assert model.logit_bias.grad is not None and model.logit_scale.grad is not None
    assert CoMTIP(_cfg(), GENES).logit_bias is None  # InfoNCE has no bias parameter
    top1 = _train_top1(_batch(), steps=100, contrastive_loss="siglip")
    assert top1 >= 0.8, f"image→sentence top-1 {top1:.2f} with SigLIP (chance 1/16)"


def test_siglip_config_is_checked():
    with pytest.raises(ValueError, match="contrastive_loss"):
        _cfg(contrastive_loss="clip")
    with pytest.raises(ValueError, match="siglip_temperature_init"):
        _cfg(contrastive_loss="siglip", siglip_temperature_init=0.001)

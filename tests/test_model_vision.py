"""ViT wrapper: MFM masking fraction, stop-gradient targets, one cross-attention layer, weights."""

from __future__ import annotations

import logging

import pytest
import timm
import torch
from torch import nn

from comtip._core.errors import ConfigError
from comtip.model import ModelConfig, VisionEncoder, n_visible_tokens, preprocess_images, random_masking
from comtip.model.vision import vit_normalisation

TINY_VIT = {"depth": 2, "patch_size": 8, "embed_dim": 32, "num_heads": 2}  # 32 px → 4 × 4 = 16 patches


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(**{"image_size": 32, "vision_kwargs": dict(TINY_VIT), "embed_dim": 16, "mfm_heads": 2, **kw})


@pytest.mark.parametrize("n,ratio", [(16, 0.5), (16, 0.25), (49, 0.5), (49, 0.75)])
def test_random_masking_hides_exactly_the_configured_fraction(n, ratio):
    visible, masked = random_masking(5, n, ratio, generator=torch.Generator().manual_seed(0))
    assert visible.shape == (5, round(n * (1 - ratio))) and masked.shape == (5, n - round(n * (1 - ratio)))
    both = torch.cat([visible, masked], dim=1).sort(dim=1).values
    assert torch.equal(both, torch.arange(n).expand(5, -1))  # a partition of the positions
    assert not torch.equal(masked[0], masked[1])  # per-sample masks


def test_encoder_reports_the_mask_it_used():
    enc = VisionEncoder(_cfg(mask_ratio=0.25))
    out = enc(torch.randn(3, 3, 32, 32))
    assert enc.num_patches == 16 and enc.effective_mask_ratio == 0.25
    assert out.masked_idx.shape == (3, 4) and out.tokens.shape == (3, 16, 32)
    assert out.embedding.shape == (3, 16)
    torch.testing.assert_close(out.embedding.norm(dim=1), torch.ones(3))
    assert n_visible_tokens(4, 0.99) == 1 and n_visible_tokens(4, 0.01) == 3  # both sets non-empty


def test_mfm_targets_are_detached_and_the_masked_branch_learns():
    enc = VisionEncoder(_cfg())
    out = enc(torch.randn(2, 3, 32, 32))
    assert out.tokens.requires_grad
    (grad_targets,) = torch.autograd.grad(out.loss_mfm, out.tokens, retain_graph=True, allow_unused=True)
    assert grad_targets is None  # stop-gradient: the loss does not reach the full-branch features
    out.loss_mfm.backward()
    assert enc.generator.mask_query.grad.abs().sum() > 0
    assert enc.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # via the masked branch
    assert enc.proj.weight.grad is None  # the projection is not part of MFM


def test_generator_is_one_cross_attention_layer():
    enc = VisionEncoder(_cfg())
    attention = [m for m in enc.generator.modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(attention) == 1
    assert not any(isinstance(m, timm.layers.Attention) for m in enc.generator.modules())


def test_mfm_off_runs_only_the_full_branch():
    enc = VisionEncoder(_cfg(mfm=False))
    out = enc(torch.randn(2, 3, 32, 32))
    assert enc.generator is None and out.masked_idx is None and out.loss_mfm.item() == 0.0


def test_embed_equals_full_branch_in_eval():
    enc = VisionEncoder(_cfg()).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc.embed(images), enc(images).embedding)


def test_preprocess_images_resizes_and_normalises():
    images = torch.full((2, 40, 40, 3), 255, dtype=torch.uint8)
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    out = preprocess_images(images, 32, *imagenet)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32
    expected = (1.0 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(out[0, :, 5, 5], expected)
    with pytest.raises(ValueError, match="uint8"):
        preprocess_images(images.float(), 32, *imagenet)
    torch.testing.assert_close(preprocess_images(images, 32, (0.5,) * 3, (0.5,) * 3)[0, :, 5, 5], torch.ones(3))


def _timm_state(img_size: int, **kw) -> dict[str, torch.Tensor]:
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=img_size, num_classes=5, **{**TINY_VIT, **kw}
    )
    return model.state_dict()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_pretrained_weights_load(tmp_path, suffix):
    state = _timm_state(32)
    path = tmp_path / f"vit{suffix}"
    if suffix == ".safetensors":
        safetensors_torch = pytest.importorskip("safetensors.torch")
        safetensors_torch.save_file(state, str(path))
    else:
        torch.save(state, path)
    enc = VisionEncoder(_cfg(pretrained_weights=str(path)))
    torch.testing.assert_close(enc.vit.blocks[1].attn.qkv.weight, state["blocks.1.attn.qkv.weight"])
    torch.testing.assert_close(enc.vit.pos_embed, state["pos_embed"])


def test_pretrained_weights_at_another_size_get_resampled_positions(tmp_path):
    state = _timm_state(64)  # 8 × 8 grid saved, 4 × 4 grid wanted
    torch.save(state, tmp_path / "vit64.pt")
    enc = VisionEncoder(_cfg(pretrained_weights=str(tmp_path / "vit64.pt")))
    assert enc.vit.pos_embed.shape == (1, 17, 32)
    torch.testing.assert_close(enc.vit.patch_embed.proj.weight, state["patch_embed.proj.weight"])


def test_pretrained_weights_errors(tmp_path, caplog):
    with pytest.raises(ConfigError, match=r"model\.pretrained_weights': no such file .*nope.pt"):
        VisionEncoder(_cfg(pretrained_weights=str(tmp_path / "nope.pt")))
    torch.save(_timm_state(32, depth=3), tmp_path / "deeper.pt")
    with pytest.raises(ValueError, match="does not match"):
        VisionEncoder(_cfg(pretrained_weights=str(tmp_path / "deeper.pt")))
    with caplog.at_level(logging.INFO, logger="comtip.model.vision"):
        VisionEncoder(_cfg())
    assert "random initialisation" in caplog.text


@pytest.mark.parametrize(
    ("name", "mean"),
    [("vit_base_patch32_224", (0.5, 0.5, 0.5)), ("deit_tiny_patch16_224", (0.485, 0.456, 0.406))],
)
def test_normalisation_is_the_backbones_own_and_is_stored_with_the_config(name, mean):
    cfg = _cfg(vision_model=name, vision_kwargs={**_cfg().vision_kwargs, "embed_dim": 48, "num_heads": 2})
    enc = VisionEncoder(cfg)
    assert cfg.image_mean == mean and vit_normalisation(enc.vit)[0] == mean
    stored = cfg.to_dict()
    assert stored["image_mean"] == list(mean)
    assert ModelConfig.architecture(stored).image_mean == mean


def test_normalisation_override_and_checkpoints_from_before_it_was_stored():
    cfg = _cfg(image_mean=(0.7, 0.6, 0.5), image_std=(0.2, 0.2, 0.2))
    enc = VisionEncoder(cfg)
    assert vit_normalisation(enc.vit) == ((0.7, 0.6, 0.5), (0.2, 0.2, 0.2))
    old = {k: v for k, v in _cfg().to_dict().items() if k not in ("image_mean", "image_std")}
    rebuilt = ModelConfig.architecture(old)  # trained with preprocess_images' old ImageNet default
    assert rebuilt.image_mean == (0.485, 0.456, 0.406) and rebuilt.image_std == (0.229, 0.224, 0.225)
    with pytest.raises(ValueError, match="image_mean"):
        _cfg(image_mean=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="image_std"):
        _cfg(image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.0, 0.5))


def test_finetuning_vit_carries_the_checkpoints_normalisation():
    from comtip.finetune.head import build_vit

    stored = _cfg(image_mean=(0.6, 0.6, 0.6), image_std=(0.3, 0.3, 0.3)).to_dict()
    assert vit_normalisation(build_vit(stored)) == ((0.6, 0.6, 0.6), (0.3, 0.3, 0.3))

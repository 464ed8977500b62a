"""Rebuilding a model from a checkpoint never re-reads ``model.pretrained_weights``: the checkpoint
holds the weights (the file may be absent where a job runs), and the ``random`` encoder is a
seeded random initialisation, not the pretrained backbone."""

from __future__ import annotations

import timm
import torch

from _helpers.finetuning import TINY_MODEL, VOCAB
from comtip.finetune.head import build_vit
from comtip.model import CoMTIP, ModelConfig
from comtip.predict.embeddings import load_encoder
from comtip.training import TrainConfig, load_pretrained
from comtip.training.checkpoint import final_state


def _weights_file(path):
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=0, **TINY_MODEL["vision_kwargs"]
    )
    with torch.no_grad():
        vit.patch_embed.proj.weight.fill_(0.25)  # unlike any random initialisation
    torch.save(vit.state_dict(), path)
    return path


def _checkpoint(tmp_path):
    config = {**TINY_MODEL, "pretrained_weights": str(_weights_file(tmp_path / "backbone.pt"))}
    torch.manual_seed(0)
    model = CoMTIP(ModelConfig.from_dict(config), VOCAB)
    assert torch.all(model.vision.vit.patch_embed.proj.weight == 0.25)  # the backbone was loaded
    with torch.no_grad():
        model.vision.vit.patch_embed.proj.weight.add_(1.0)  # "pretraining" moved it on
    state = final_state(
        model,
        model_config=ModelConfig.from_dict(config).to_dict(),
        train_config=TrainConfig().to_dict(),
        vocabulary=VOCAB,
        bin_edges=[0.5, 1.0],
        step=3,
        fingerprint={},
    )
    torch.save(state, tmp_path / "comtip.pt")
    return tmp_path / "comtip.pt", tmp_path / "backbone.pt"


def test_a_checkpoint_loads_where_the_backbone_file_is_absent(tmp_path):
    ckpt, backbone = _checkpoint(tmp_path)
    backbone.unlink()
    model, info = load_pretrained(ckpt)
    assert torch.all(model.vision.vit.patch_embed.proj.weight == 1.25)
    assert info["model_config"]["pretrained_weights"] == str(backbone)  # recorded, not re-read
    assert build_vit(info["model_config"]).patch_embed.proj.weight.shape == (64, 3, 8, 8)


def test_the_random_encoder_is_random_and_not_the_pretrained_backbone(tmp_path):
    ckpt, _ = _checkpoint(tmp_path)  # the backbone file is there
    random_model, _ = load_encoder(ckpt, "random", seed=5)
    weight = random_model.vision.vit.patch_embed.proj.weight
    assert not torch.any(weight == 0.25) and not torch.any(weight == 1.25)
    torch.manual_seed(5)
    fresh = CoMTIP(ModelConfig.from_dict(TINY_MODEL), VOCAB)
    for (name, a), b in zip(random_model.state_dict().items(), fresh.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)

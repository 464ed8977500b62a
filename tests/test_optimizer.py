"""Weight decay applies to weight matrices only: not to biases, norms, tokens, position
embeddings, embedding tables or the logit scale (pretraining and fine-tuning alike)."""

from __future__ import annotations

import timm
import torch

from _helpers.pretraining import TINY_MODEL
from comtip.finetune.head import ExpressionHead
from comtip.finetune.train import _param_groups
from comtip.model import CoMTIP, ModelConfig
from comtip.training.config import TrainConfig
from comtip.training.optimizer import build_optimizer, no_decay_names


def test_comtip_decays_weight_matrices_only():
    cfg = ModelConfig.from_dict(TINY_MODEL)  # the tiny model the pretraining tests train
    model = CoMTIP(cfg, ["ERBB2", "GATA3", "KRT5"])
    skip = no_decay_names(model)
    names = dict(model.named_parameters())
    expected_skipped = [n for n in names if n.endswith(("pos_embed", "cls_token", ".cls", "mask_query"))]
    expected_skipped += [n for n in names if "bag." in n or "bin_embed" in n]
    assert expected_skipped and set(expected_skipped) <= skip
    assert "logit_scale" in skip
    assert all(names[n].ndim < 2 for n in skip - set(expected_skipped) - {"logit_scale"})
    decayed = set(names) - skip
    assert any("attn.qkv.weight" in n for n in decayed) and any("patch_embed.proj.weight" in n for n in decayed)
    assert all(names[n].ndim >= 2 for n in decayed)

    optimizer, _ = build_optimizer(model, TrainConfig(weight_decay=0.05), total=10)
    by_id = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert {by_id[id(names[n])] for n in skip} == {0.0}
    assert {by_id[id(names[n])] for n in decayed} == {0.05}
    assert len(by_id) == sum(p.requires_grad for p in model.parameters())


def test_finetuning_groups_skip_the_vit_tokens_and_the_head_bias():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, depth=1)
    d = vit.num_features
    head = ExpressionHead(torch.zeros(d), torch.ones(d), torch.zeros(5))
    groups = _param_groups(vit, 1e-5, 0.1) + _param_groups(head, 1e-3, 0.1)
    zero = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert id(vit.pos_embed) in zero and id(vit.cls_token) in zero
    assert all(id(p) in zero for n, p in head.named_parameters() if n.endswith("bias"))
    assert all(id(p) not in zero for n, p in vit.named_parameters() if n.endswith("qkv.weight"))
    assert {g["lr"] for g in groups} == {1e-5, 1e-3}
    assert sum(len(g["params"]) for g in groups) == len(list(vit.parameters())) + len(list(head.parameters()))

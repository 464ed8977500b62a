"""ModelConfig: defaults, YAML round trip, unknown keys and bad values fail naming the key."""

from __future__ import annotations

import pytest

from comtip.model import ModelConfig


def test_defaults_are_complete_and_round_trip():
    cfg = ModelConfig()
    assert cfg.vision_model == "vit_tiny_patch16_224" and cfg.image_size == 112
    assert cfg.name_ngrams == (2, 3, 4) and cfg.pretrained_weights is None
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again == cfg


def test_from_dict_converts_yaml_lists_and_keeps_vision_kwargs():
    cfg = ModelConfig.from_dict({"name_ngrams": [3, 5], "vision_kwargs": {"depth": 4}, "mfm": False})
    assert cfg.name_ngrams == (3, 5) and cfg.vision_kwargs == {"depth": 4} and cfg.mfm is False
    assert ModelConfig.from_dict(None) == ModelConfig()


def test_unknown_key_is_named():
    with pytest.raises(ValueError, match="mask_ratoi"):
        ModelConfig.from_dict({"mask_ratoi": 0.5})


@pytest.mark.parametrize(
    "key,value",
    [
        ("mask_ratio", 1.0),
        ("name_encoder", "bert"),
        ("text_heads", 3),
        ("paat_steps", 0),
        ("n_bins", 1),
        ("max_logit_scale", 2.0),
        ("vision_kwargs", {"img_size": 224}),
    ],
)
def test_bad_values_name_the_key(key, value):
    with pytest.raises(ValueError, match=f"'{key}'"):
        ModelConfig.from_dict({key: value})

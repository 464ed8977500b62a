"""Pathology foundation-model presets (comtip.model.presets): each architecture loads a file in its
published key layout back exactly, the HF layouts are those of transformers' own models, a file
that does not match is one clear error, and the config, registry and schema keys agree."""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import pytest
import torch
import yaml
from timm.models.vision_transformer import VisionTransformer

from comtip._core.errors import ConfigError
from comtip.config import validate_config
from comtip.model.config import ModelConfig
from comtip.model.foundation import build_foundation_vit, load_foundation_weights, pooled_features
from comtip.model.foundation_keys import FROM_TIMM, TO_TIMM
from comtip.model.presets import PRESETS, apply_vision_preset
from comtip.predict import registry
from conftest import CONFIG_SCHEMA

# ViT-g (1.1 B parameters) and ViT-H (0.6 B): measured on the 2-core test machine, one ViT-g takes
# 35 s to build, 13 s to save and 13 s to load in fp32, and this test took 98 s (uni2_h), 63 s
# (virchow2), 93 s (h_optimus_0) and 99 s (gigapath) with COMTIP_TEST_LARGE_PRESETS=1 (all
# passed), so these five run only when asked for.
LARGE = {"uni2_h", "h_optimus_0", "h_optimus_1", "virchow2", "gigapath"}
RUN_LARGE = os.environ.get("COMTIP_TEST_LARGE_PRESETS") == "1"
SCHEMA = yaml.safe_load(CONFIG_SCHEMA.read_text())


def _official_file(recipe, tmp_path):
    """A seeded random build of the preset saved in its published layout: (vit, timm state, path)."""
    torch.manual_seed(0)
    vit = build_foundation_vit(recipe)
    state = {k: v.clone() for k, v in vit.state_dict().items()}
    path = tmp_path / recipe.weights_file
    official = FROM_TIMM[recipe.layout](state)
    if recipe.layout == "open_clip_trunk":  # the rest of CONCH's file, which the loader must skip
        official = {
            **official,
            "visual.attn_pool_contrast.attn.in_proj_weight": torch.zeros(3, 3),
            "logit_scale": torch.ones(()),
        }
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in official.items()}, str(path))
    else:
        torch.save(official, path)
    return vit, state, path


@pytest.mark.parametrize("name", list(PRESETS))
def test_each_preset_loads_its_published_layout_back_exactly(name, tmp_path):
    if name in LARGE and not RUN_LARGE:
        pytest.skip(
            f"{name} is ViT-H/ViT-g: > 60 s to build, save and load on 2 cores; COMTIP_TEST_LARGE_PRESETS=1 runs it"
        )
    recipe = PRESETS[name]
    started = time.perf_counter()
    vit, state, path = _official_file(recipe, tmp_path)
    with torch.no_grad():  # scramble every weight, so only the file can give them back
        for p in vit.parameters():
            p.normal_()
    load_foundation_weights(vit, path, recipe)
    loaded = vit.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state), name
    with torch.no_grad():
        feats = pooled_features(vit.eval(), recipe, torch.randn(1, 3, recipe.input_size, recipe.input_size))
    assert feats.shape == (1, recipe.embed_dim)
    assert torch.isfinite(feats).all()
    print(f"{name}: {time.perf_counter() - started:.1f} s")


def _tiny_timm(**kwargs) -> VisionTransformer:
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=0, **kwargs)


def _transformers_reads(cls, config, published, folder):
    """``cls`` loaded by transformers itself from ``published`` saved as a local model folder (no
    network): transformers converts the published (v4) key names to its own, so a key of ours it
    does not know is unexpected and one it needs is missing."""
    from safetensors.torch import save_file

    config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in published.items()}, str(folder / "model.safetensors"))
    model, info = cls.from_pretrained(
        folder, output_loading_info=True, **({"add_pooling_layer": False} if cls.__name__ == "ViTModel" else {})
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


@pytest.mark.parametrize("layout", ["hf_vit", "hf_dinov2"])
def test_the_hf_layouts_are_what_transformers_reads_as_vit_and_dinov2(layout, tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    common = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 32, "patch_size": 8}
    if layout == "hf_vit":
        vit = _tiny_timm(mlp_ratio=2.0).eval()
        config = transformers.ViTConfig(**common, intermediate_size=128, layer_norm_eps=1e-6)
        cls = transformers.ViTModel
    else:  # LayerScale away from its initial value, so that a wrong mapping shows
        vit = _tiny_timm(mlp_ratio=2.0, init_values=0.5).eval()
        with torch.no_grad():
            for name, p in vit.named_parameters():
                if name.endswith("gamma"):
                    p.uniform_(0.1, 1.0)
        config = transformers.Dinov2Config(**common, mlp_ratio=2, layerscale_value=0.5)
        cls = transformers.Dinov2Model
    hf = _transformers_reads(cls, config, FROM_TIMM[layout](vit.state_dict()), tmp_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(x), hf(pixel_values=x).last_hidden_state, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("layout", list(TO_TIMM))
def test_each_layout_inverts(layout):
    state = _tiny_timm(init_values=0.5).state_dict()
    back = TO_TIMM[layout](FROM_TIMM[layout](state))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_virchows_feature_is_the_class_token_and_the_patch_mean_without_registers():
    vit = _tiny_timm(reg_tokens=4).eval()
    recipe = dataclasses.replace(PRESETS["virchow2"], embed_dim=128)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = vit.forward_features(x)
        feats = pooled_features(vit, recipe, x)
    assert tokens.shape[1] == 1 + 4 + 16
    torch.testing.assert_close(feats, torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=1))


@pytest.fixture(scope="module")
def phikon_file(tmp_path_factory):
    return _official_file(PRESETS["phikon"], tmp_path_factory.mktemp("phikon"))


def test_a_file_in_another_layout_is_one_error_naming_the_file_and_the_keys(phikon_file, tmp_path):
    vit, state, _ = phikon_file
    dinov2_file = tmp_path / "model.safetensors"
    from safetensors.torch import save_file

    # Phikon-v2's layout (transformers Dinov2Model) where Phikon's (ViTModel) is expected
    save_file({k: v.contiguous() for k, v in FROM_TIMM["hf_dinov2"](state).items()}, str(dinov2_file))
    with pytest.raises(ConfigError) as err:
        load_foundation_weights(vit, dinov2_file, PRESETS["phikon"], key="foundation_models.phikon")
    message = str(err.value)
    assert "foundation_models.phikon" in message and str(dinov2_file) in message and "hf_vit" in message
    assert "96 missing keys [blocks.0.mlp.fc1.bias" in message  # norm1/2, fc1/2 of 12 blocks
    assert "97 unexpected keys [embeddings.mask_token, encoder.layer.0.mlp.fc1.bias" in message
    assert "... and 88 more]" in message and "... and 89 more]" in message  # truncated


def test_a_file_of_another_size_is_one_error_naming_the_shapes(phikon_file, tmp_path):
    vit, state, _ = phikon_file
    official = FROM_TIMM["hf_vit"](state)
    official["layernorm.weight"] = torch.ones(10)
    bad = tmp_path / "model.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in official.items()}, str(bad))
    with pytest.raises(ConfigError, match=r"shapes differ \[norm.weight \(10,\) != \(768,\)\]"):
        load_foundation_weights(vit, bad, PRESETS["phikon"])
    with pytest.raises(ConfigError, match="no such file"):
        load_foundation_weights(vit, tmp_path / "absent.bin", PRESETS["phikon"])


def test_comtips_backbone_with_a_preset_reads_the_published_file_at_its_own_size(phikon_file):
    from comtip.model.vision import VisionEncoder

    _, state, path = phikon_file
    cfg = ModelConfig.from_dict({"vision_preset": "phikon", "pretrained_weights": str(path), "image_size": 112})
    encoder = VisionEncoder(cfg)
    own = encoder.vit.state_dict()
    assert torch.equal(own["blocks.11.attn.qkv.weight"], state["blocks.11.attn.qkv.weight"])
    assert own["pos_embed"].shape == (1, 1 + 49, 768)  # resampled from 14 × 14 to 7 × 7
    assert cfg.image_mean == PRESETS["phikon"].mean


def test_embed_foundation_writes_the_models_features(phikon_file, tmp_path):
    from comtip.predict.foundation import embed_foundation_sample

    vit, _, path = phikon_file
    patches = np.random.default_rng(0).integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
    np.save(tmp_path / "spot_patches.npy", patches)
    np.savez(tmp_path / "gene_sentences.npz", barcodes=np.array(["a", "b", "c"]))
    out = tmp_path / "uni.npz"
    embed_foundation_sample("phikon", path, tmp_path / "spot_patches.npy", tmp_path / "gene_sentences.npz", out)
    with np.load(out) as z:
        assert list(z["barcodes"]) == ["a", "b", "c"] and z["features"].shape == (3, 768)
        np.testing.assert_allclose(np.linalg.norm(z["image_embeddings"], axis=1), 1.0, rtol=1e-5)
        from comtip.model.vision import preprocess_images

        recipe = PRESETS["phikon"]
        with torch.no_grad():
            images = preprocess_images(torch.from_numpy(patches), 224, recipe.mean, recipe.std)
            expected = pooled_features(vit.eval(), recipe, images).numpy()
        np.testing.assert_allclose(z["features"], expected, rtol=1e-4, atol=1e-4)


# -- config, registry, schema --------------------------------------------------------------------


def test_a_preset_fills_what_the_user_leaves_out_and_loses_to_what_the_user_sets():
    uni = ModelConfig.from_dict({"vision_preset": "uni"})
    assert (uni.vision_model, uni.image_size) == ("vit_large_patch16_224", 224)
    assert uni.vision_kwargs == {"patch_size": 16, "init_values": 1e-5}  # dynamic_img_size dropped: MFM
    assert (uni.image_mean, uni.image_std) == (PRESETS["uni"].mean, PRESETS["uni"].std)
    own = ModelConfig.from_dict(
        {"vision_preset": "h_optimus_0", "image_size": 112, "image_mean": [0.5] * 3, "image_std": [0.25] * 3,
         "vision_kwargs": {"drop_path_rate": 0.1}}
    )  # fmt: skip
    assert own.image_size == 112 and own.image_mean == (0.5,) * 3 and own.image_std == (0.25,) * 3
    assert own.vision_kwargs == {"init_values": 1e-5, "drop_path_rate": 0.1}
    assert ModelConfig.from_dict({}).to_dict() == ModelConfig().to_dict()  # no preset: as before
    assert ModelConfig.from_dict({}).vision_preset is None and ModelConfig().image_mean is None
    stored = ModelConfig.from_dict({"vision_preset": "virchow2", "pretrained_weights": "/x.bin"}).to_dict()
    assert ModelConfig.architecture(stored).to_dict() == {**stored, "pretrained_weights": None}
    assert apply_vision_preset({"mfm": False}) == {"mfm": False}


def test_a_wrong_preset_or_a_conflicting_vision_model_names_the_key():
    with pytest.raises(ValueError, match="'vision_preset': 'unii' must be one of"):
        ModelConfig.from_dict({"vision_preset": "unii"})
    with pytest.raises(ValueError, match="'vision_model': 'vit_base_patch16_224' conflicts with vision_preset 'uni'"):
        ModelConfig.from_dict({"vision_preset": "uni", "vision_model": "vit_base_patch16_224"})
    with pytest.raises(ValueError, match="vision_preset"):
        ModelConfig(vision_preset="uni")  # not through from_dict: vision_model is not UNI's
    assert (
        ModelConfig.from_dict({"vision_preset": "uni", "vision_model": "vit_large_patch16_224"}).vision_preset == "uni"
    )


def test_each_preset_is_a_ridge_method_on_its_own_embed_foundation_encoder():
    for name in PRESETS:
        m = registry.METHODS[f"ridge_{name}"]
        assert m.encoder == name and registry.ENCODER_RULES[name] == "embed_foundation"
        assert registry.method_inputs(m.name, "s1", "ckpt") == {
            "train_values": registry.TRAINING_VALUES,
            "test_embedding": f"results/embeddings/{name}/s1.npz",
            "ridge_probe": f"results/models/ridge/{name}.npz",
        }
    assert registry.FOUNDATION_ENCODERS == tuple(PRESETS)
    assert not set(registry.FOUNDATION_ENCODERS) & set(registry.COMTIP_ENCODERS)
    assert [m.name for m in registry.trained_models(["ridge_uni"])] == ["comtip"]  # nothing trained for UNI


def test_a_ridge_preset_without_its_file_is_a_config_error_naming_the_key(tmp_path):
    weights = tmp_path / "pytorch_model.bin"
    weights.write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"'foundation_models.uni': not set, but evaluate.methods has ridge_uni"):
        registry.foundation_weights(["mean", "ridge_uni"], {})
    with pytest.raises(ConfigError, match=r"'foundation_models.conch': no such file .*absent.bin"):
        registry.foundation_weights(["ridge_conch"], {"conch": str(tmp_path / "absent.bin")})
    assert registry.foundation_weights(["ridge_uni", "ridge_comtip"], {"uni": str(weights), "conch": "/nowhere"}) == {
        "uni": str(weights)
    }
    assert registry.foundation_weights(["mean", "ridge_random"], None) == {}


def test_the_schema_lists_the_presets_for_the_model_and_the_weights_files(tmp_path):
    model = SCHEMA["properties"]["model"]["properties"]["vision_preset"]
    assert model["enum"] == [None, *PRESETS]
    assert list(SCHEMA["properties"]["foundation_models"]["properties"]) == list(PRESETS)
    for name, entry in SCHEMA["properties"]["foundation_models"]["properties"].items():
        assert PRESETS[name].weights_file in entry["description"] and PRESETS[name].source in entry["description"]
    config = validate_config({"samples": "s.tsv"}, CONFIG_SCHEMA)
    assert config["foundation_models"] == {} and "vision_preset" not in config["model"]
    with pytest.raises(ConfigError, match="foundation_models"):
        validate_config({"samples": "s.tsv", "foundation_models": {"unii": "/x"}}, CONFIG_SCHEMA)
    with pytest.raises(ConfigError, match="model.vision_preset"):
        validate_config({"samples": "s.tsv", "model": {"vision_preset": "uni3"}}, CONFIG_SCHEMA)


def test_a_dry_run_embeds_with_the_configured_file_and_refuses_a_method_without_one(tmp_path):
    """ridge_phikon in evaluate.methods: embed_foundation runs for every sample from the file of
    foundation_models.phikon, fit_ridge and predict_baseline follow; without the file configured
    the parse stops naming the key, before any job."""
    from _helpers.workflow import snakemake, write_tiny_run_folder
    from conftest import dry_run_jobs

    root = write_tiny_run_folder(tmp_path / "run")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"not read by a dry run")
    config_file = root / "config" / "config.yaml"
    config = yaml.safe_load(config_file.read_text())
    config["evaluate"]["methods"] = ["mean", "ridge_phikon"]
    config_file.write_text(yaml.safe_dump(config))
    refused = snakemake(root, "-n", check=False)
    assert refused.returncode != 0 and "'foundation_models.phikon': not set" in refused.stdout + refused.stderr
    config["foundation_models"] = {"phikon": str(weights)}
    config_file.write_text(yaml.safe_dump(config))
    jobs = dry_run_jobs(snakemake(root, "-n").stdout)
    embedded = [block for rule, block in jobs if rule == "embed_foundation"]
    assert embedded and all("encoder=phikon" in b and str(weights) in b for b in embedded)
    assert any(rule == "fit_ridge" and "encoder=phikon" in b for rule, b in jobs)
    assert any(rule == "predict_baseline" and "method=ridge_phikon" in b for rule, b in jobs)
    assert not any(rule == "embed_spots" and "encoder=phikon" in b for rule, b in jobs)

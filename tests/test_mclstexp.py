"""mclSTExp trained as itself (comtip.baselines.mclstexp_*): its spot-level Transformer (attention
over the spots of a batch, array position embeddings), training on CoMTIP's data path (a
checkpoint, the loss falls, one slide per batch when asked), the embeddings the retrieval method
reads, and its config's errors."""

from __future__ import annotations

import dataclasses

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from _helpers.pretraining import make_cohort
from comtip._core.errors import ConfigError, PipelineInputError
from comtip.baselines.bleep_model import ProjectionHead, bleep_loss
from comtip.baselines.mclstexp_config import MclstexpConfig
from comtip.baselines.mclstexp_embed import embed_mclstexp_sample, load_mclstexp
from comtip.baselines.mclstexp_model import MclSTExp, SpotEncoder, mclstexp_loss
from comtip.baselines.mclstexp_train import SlideBatchPlan, read_array_positions, train_mclstexp
from comtip.model.config import ModelConfig
from comtip.model.vision import preprocess_images
from comtip.training.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = MclstexpConfig(image_encoder="resnet10t", image_size=16, array_rows=16, array_cols=16)
MODEL = {"image_size": 16}
# 2 samples x 40 spots (the last of each expresses no gene: skipped) = 78 spots -> 9 steps of 8
SHARED = {"epochs": 1, "batch_size": 8, "log_every": 1, "checkpoint_every": 100, "num_workers": 0}
N_GENES = 10


def _write_spots(sentences, out) -> None:
    """A spots.h5ad whose obs hold the sentences' barcodes (in another order) with array_row / array_col."""
    barcodes = np.asarray(np.load(sentences)["barcodes"]).astype(str)
    index = np.arange(len(barcodes))
    obs = pd.DataFrame({"array_row": index // 8, "array_col": (index % 8) * 2 + (index // 8) % 2}, index=barcodes)
    obs = obs.iloc[::-1]
    ad.AnnData(X=np.zeros((len(obs), 1), np.float32), obs=obs).write_h5ad(out)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("mclstexp_cohort")
    cohort = make_cohort(root)
    cohort["spots"] = [root / s / "spots.h5ad" for s in cohort["samples"]]
    for sentences, spots in zip(cohort["sentences"], cohort["spots"], strict=True):
        _write_spots(sentences, spots)
    return cohort


def _train(toy, out, cfg: MclstexpConfig = TINY, **shared):
    train_mclstexp(
        toy["samples"],
        toy["patches"],
        toy["indexes"],
        toy["sentences"],
        toy["spots"],
        out / "mclstexp.pt",
        out / "mclstexp.metrics.tsv",
        mclstexp_config=cfg.to_dict(),
        model_config=MODEL,
        train_config=cfg.train_config({**SHARED, **shared}, seed=3),
    )
    return pd.read_csv(out / "mclstexp.metrics.tsv", sep="\t"), torch.load(out / "mclstexp.pt", weights_only=True)


def _spot_encoder(seed: int = 0, cfg: MclstexpConfig = TINY) -> SpotEncoder:
    torch.manual_seed(seed)
    return SpotEncoder(cfg, N_GENES).eval()


def _batch(n: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    expression = torch.rand(n, N_GENES, generator=generator) * 3
    positions = torch.randint(0, 16, (n, 2), generator=generator)
    return expression, positions


# -- the model ------------------------------------------------------------------------------------


def test_the_spot_transformer_is_mclstexps_two_prenorm_layers_of_8_heads_x_64():
    encoder = _spot_encoder(cfg=MclstexpConfig())
    assert (encoder.row_embedding.num_embeddings, encoder.col_embedding.num_embeddings) == (128, 128)
    assert encoder.row_embedding.embedding_dim == N_GENES and len(encoder.layers) == 2
    block = encoder.layers[0]
    assert block.attention.to_qkv.bias is None and block.attention.to_qkv.out_features == 3 * 8 * 64
    assert (block.attention.to_out.in_features, block.attention.to_out.out_features) == (512, N_GENES)
    assert block.feed_forward.net[0].out_features == N_GENES and isinstance(block.feed_forward.net[1], torch.nn.GELU)
    assert not any(isinstance(m, torch.nn.Dropout) for m in encoder.modules())  # dropout 0
    # the arithmetic: x + Attn(LN x), then + FF(LN x); no final norm
    expression, positions = _batch()
    x = expression + encoder.row_embedding(positions[:, 0]) + encoder.col_embedding(positions[:, 1])
    for layer in encoder.layers:
        h = layer.attention_norm(x)
        q, k, v = layer.attention.to_qkv(h).chunk(3, dim=-1)
        q, k, v = (t.view(len(x), 8, 64).transpose(0, 1) for t in (q, k, v))
        attended = torch.softmax(q @ k.transpose(1, 2) / 8.0, dim=-1) @ v
        x = x + layer.attention.to_out(attended.transpose(0, 1).reshape(len(x), 512))
        x = x + layer.feed_forward.net(layer.feed_forward_norm(x))
    with torch.no_grad():
        torch.testing.assert_close(encoder(expression, positions), x.detach())


def test_model_shapes_and_heads():
    model = MclSTExp(TINY, ModelConfig.from_dict(MODEL), n_genes=N_GENES, image_size=16).eval()
    assert isinstance(model.image_projection, ProjectionHead) and isinstance(model.spot_projection, ProjectionHead)
    assert model.spot_projection.projection.in_features == N_GENES
    assert model.image_mean == (0.0, 0.0, 0.0) and model.image_std == (1.0, 1.0, 1.0)  # no ImageNet normalisation
    images = torch.rand(5, 3, 16, 16)
    expression, positions = _batch(5)
    with torch.no_grad():
        assert model.features(images).shape == (5, model.image_encoder.num_features)
        assert model.encode_image(images).shape == (5, 256)
        assert model.encode_expression(expression, positions).shape == (5, 256)
        loss = model(images, expression, positions)
        image_emb, spot_emb = model.encode_image(images), model.encode_expression(expression, positions)
        soft = MclSTExp(MclstexpConfig(**{**TINY.to_dict(), "loss": "bleep"}), ModelConfig(), N_GENES, 16).eval()
        soft.load_state_dict(model.state_dict())
        soft_loss = soft(images, expression, positions)
    assert loss.item() == pytest.approx(mclstexp_loss(image_emb, spot_emb, 1.0).item(), rel=1e-5)
    assert soft_loss.item() == pytest.approx(bleep_loss(image_emb, spot_emb, 1.0).item(), rel=1e-5)
    with pytest.raises(ConfigError, match=r"mclstexp\.image_encoder"):
        MclSTExp(MclstexpConfig(image_encoder="no_such_net"), ModelConfig(), N_GENES, 16)
    with pytest.raises(ConfigError, match=r"mclstexp\.pretrained_weights': no such file"):
        MclSTExp(MclstexpConfig(image_encoder="resnet10t", pretrained_weights="/no/such.pth"), ModelConfig(), 3, 16)


def test_the_loss_is_mclstexps_identity_target_cross_entropy():
    image = torch.tensor([[1.0, 0.5, -0.2], [0.1, -1.0, 0.3], [0.7, 0.2, 0.9]], dtype=torch.float64)
    spot = torch.tensor([[0.8, -0.1, 0.4], [0.3, -0.9, 0.1], [0.0, 0.5, 1.2]], dtype=torch.float64)
    for t in (1.0, 0.5):
        logits = (spot @ image.T / t).tolist()
        by_row = [-(row[i] - np.log(np.exp(row).sum())) for i, row in enumerate(logits)]
        columns = np.array(logits).T
        by_col = [-(col[i] - np.log(np.exp(col).sum())) for i, col in enumerate(columns)]
        expected = (np.mean(by_row) + np.mean(by_col)) / 2
        assert mclstexp_loss(image, spot, t).item() == pytest.approx(expected, rel=1e-12)
    # no normalisation before the logits: scaling changes the loss
    assert mclstexp_loss(3 * image, 3 * spot).item() != pytest.approx(mclstexp_loss(image, spot).item(), rel=1e-3)


def test_defaults_are_mclstexps_code():
    cfg = MclstexpConfig()
    assert (cfg.image_encoder, cfg.dropout, cfg.loss, cfg.temperature) == ("densenet121", 0.0, "clip", 1.0)
    assert (cfg.heads, cfg.head_dim, cfg.layers, cfg.projection_dim) == (8, 64, 2, 256)
    assert (cfg.lr, cfg.weight_decay, cfg.color_jitter, cfg.batch_from, cfg.embed_batch_size) == (
        1e-4,
        1e-3,
        0.5,
        "mixed",
        32,
    )


def test_a_spot_attends_to_the_other_spots_of_its_batch():
    encoder = _spot_encoder()
    expression, positions = _batch()
    with torch.no_grad():
        out = encoder(expression, positions)
        changed = expression.clone()
        changed[3, 2] += 2.0  # another spot of the batch (one gene: LayerNorm removes a uniform shift)
        again = encoder(changed, positions)
        assert not torch.allclose(out[0], again[0], atol=1e-6)
        # alone, spot 0 is another token than in its batch
        assert not torch.allclose(encoder(expression[:1], positions[:1])[0], out[0], atol=1e-6)
        # permuting the batch permutes the outputs (no order within a batch, eval mode)
        perm = torch.tensor([4, 2, 0, 5, 1, 3])
        torch.testing.assert_close(encoder(expression[perm], positions[perm]), out[perm])


def test_the_array_position_is_part_of_the_token():
    encoder = _spot_encoder()
    expression, positions = _batch()
    with torch.no_grad():
        out = encoder(expression, positions)
        for axis in (0, 1):
            moved = positions.clone()
            moved[0, axis] = (moved[0, axis] + 1) % 16
            assert not torch.allclose(encoder(expression, moved)[0], out[0], atol=1e-6), axis
        same = expression[:1].repeat(2, 1)  # same expression at two places: two embeddings
        two = encoder(same, torch.tensor([[0, 0], [5, 7]]))
        assert not torch.allclose(two[0], two[1], atol=1e-6)


def test_the_model_overfits_a_small_batch():
    torch.manual_seed(0)
    model = MclSTExp(TINY, ModelConfig.from_dict(MODEL), n_genes=N_GENES, image_size=16).train()
    generator = torch.Generator().manual_seed(0)
    latent = torch.rand(12, 3, generator=generator)
    images = latent[:, :, None, None].expand(12, 3, 16, 16).contiguous()
    expression = latent @ torch.randn(3, N_GENES, generator=generator)
    positions = torch.randint(0, 16, (12, 2), generator=generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-3)
    losses = []
    for _ in range(30):
        loss = model(images, expression, positions)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses


# -- data and batches -----------------------------------------------------------------------------


def test_positions_are_read_by_barcode_and_checked(toy, tmp_path):
    barcodes = np.asarray(np.load(toy["sentences"][0])["barcodes"]).astype(str)
    positions = read_array_positions(toy["spots"][0], barcodes, TINY, sample="s0")
    assert positions.shape == (40, 2) and positions[9].tolist() == [1, 3]  # obs were stored reversed
    with pytest.raises(ConfigError, match=r"mclstexp\.array_rows' = 2: sample s0's array_row runs 0\.\.4"):
        read_array_positions(toy["spots"][0], barcodes, MclstexpConfig(array_rows=2), sample="s0")
    with pytest.raises(PipelineInputError, match=r"\[sample s0\].*not in spots.h5ad"):
        read_array_positions(toy["spots"][0], [*barcodes, "nowhere"], TINY, sample="s0")
    bare = tmp_path / "bare.h5ad"
    ad.AnnData(X=np.zeros((40, 1), np.float32), obs=pd.DataFrame(index=barcodes)).write_h5ad(bare)
    with pytest.raises(PipelineInputError, match="no obs column 'array_row'"):
        read_array_positions(bare, barcodes, TINY, sample="s0")


def test_slide_batches_hold_the_spots_of_one_slide():
    plan = SlideBatchPlan(30, 4, 1, 1, 7, sample_sizes=(10, 20))
    assert plan.steps_per_epoch == 2 + 5  # full batches only
    perm = plan.permutation(0)
    batches = perm.reshape(-1, 4)
    assert all(len({int(i >= 10) for i in batch}) == 1 for batch in batches)
    assert len(set(perm.tolist())) == len(perm)  # no spot twice
    assert not np.array_equal(perm, plan.permutation(1)) and np.array_equal(perm, plan.permutation(0))
    with pytest.raises(PipelineInputError, match="one slide"):
        _ = SlideBatchPlan(6, 4, 1, 1, 7, sample_sizes=(3, 3)).steps_per_epoch


# -- training and embedding -----------------------------------------------------------------------


def test_two_steps_write_a_checkpoint_and_slide_batches_train_too(toy, tmp_path):
    (tmp_path / "mixed").mkdir()
    (tmp_path / "slide").mkdir()
    metrics, state = _train(toy, tmp_path / "mixed", max_steps=2)
    assert list(metrics["step"]) == [1, 2] and np.isfinite(metrics["loss"]).all()
    assert state["kind"] == "mclstexp" and state["step"] == 2 and state["image_size"] == 16
    assert state["mclstexp_config"]["batch_from"] == "mixed" and (metrics["lr"] == 1e-4).all()
    assert state["train_config"]["color_jitter"] == 0.5 and state["panel_genes"] == [f"GENE{i}" for i in range(10)]
    assert not (tmp_path / "mixed" / "mclstexp.resume").exists()
    slide = MclstexpConfig(**{**TINY.to_dict(), "batch_from": "slide"})
    metrics, state = _train(toy, tmp_path / "slide", slide, max_steps=2)
    assert state["step"] == 2 and state["mclstexp_config"]["batch_from"] == "slide"


def test_embeddings_are_the_encoders_on_consecutive_batches_in_the_keys_retrieval_reads(toy, tmp_path):
    _train(toy, tmp_path, max_steps=2)
    out = tmp_path / "s0.npz"
    embed_mclstexp_sample(
        tmp_path / "mclstexp.pt", toy["patches"][0], toy["sentences"][0], toy["spots"][0], out, sample="s0"
    )
    emb = np.load(out)
    sentences = np.load(toy["sentences"][0])
    assert list(emb["barcodes"]) == list(sentences["barcodes"])  # every spot, the empty one too
    assert emb["image_embeddings"].shape == (40, 256) and emb["sentence_embeddings"].shape == (40, 256)
    model, info = load_mclstexp(tmp_path / "mclstexp.pt")
    positions = read_array_positions(toy["spots"][0], sentences["barcodes"].astype(str), model.cfg)
    with torch.no_grad():
        images = preprocess_images(torch.from_numpy(np.load(toy["patches"][0])), 16, model.image_mean, model.image_std)
        np.testing.assert_allclose(emb["image_embeddings"], model.encode_image(images).numpy(), rtol=1e-4, atol=1e-5)
        values = torch.from_numpy(sentences["panel_values"])
        # the spot context: consecutive batches of embed_batch_size (32), in file order
        first = model.encode_expression(values[:32], torch.from_numpy(positions[:32])).numpy()
        rest = model.encode_expression(values[32:], torch.from_numpy(positions[32:])).numpy()
    np.testing.assert_allclose(emb["sentence_embeddings"], np.concatenate([first, rest]), rtol=1e-4, atol=1e-5)
    data = dict(sentences)
    data["panel_genes"] = data["panel_genes"][::-1]
    np.savez(tmp_path / "other.npz", **data)
    with pytest.raises(PipelineInputError, match=r"\[sample s0\].*panel genes differ"):
        embed_mclstexp_sample(
            tmp_path / "mclstexp.pt", toy["patches"][0], tmp_path / "other.npz", toy["spots"][0], out, sample="s0"
        )


# -- config ---------------------------------------------------------------------------------------


def test_the_budget_is_pretrainings_and_the_optimiser_mclstexps():
    shared = {"epochs": 24, "batch_size": 64, "max_steps": None, "lr": 5e-4, "color_jitter": 0.1, "warmup_steps": 10}
    train = TrainConfig.from_dict(MclstexpConfig().train_config(shared, seed=5))
    assert (train.epochs, train.batch_size, train.max_steps, train.seed) == (24, 64, None, 5)
    assert (train.lr, train.weight_decay, train.color_jitter, train.warmup_steps) == (1e-4, 1e-3, 0.5, 0)
    train = TrainConfig.from_dict(MclstexpConfig(epochs=3, batch_size=128).train_config({**shared, "max_steps": 9}, 0))
    assert (train.epochs, train.max_steps, train.batch_size) == (3, None, 128)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"batch_from": "patient"}, r"'mclstexp\.batch_from': must be one of mixed, slide, got 'patient'"),
        ({"heads": 0}, r"'mclstexp\.heads': must be an integer >= 1, got 0"),
        ({"array_rows": 1.5}, r"'mclstexp\.array_rows': must be an integer >= 1"),
        ({"lr": 0}, r"'mclstexp\.lr': must be > 0"),
        ({"color_jitter": 1.2}, r"'mclstexp\.color_jitter': must be in \[0, 0\.99\]"),
        ({"dropout": 1}, r"'mclstexp\.dropout': must be in \[0, 1\)"),
        ({"batch_size": 0}, r"'mclstexp\.batch_size': must be an integer >= 1"),
        ({"loss": "infonce"}, r"'mclstexp\.loss': must be one of clip, bleep"),
        ({"embed_batch_size": 0}, r"'mclstexp\.embed_batch_size': must be an integer >= 1"),
        ({"heads_num": 8}, r"'mclstexp\.heads_num': unknown option \(known: .*heads"),
    ],
)
def test_config_errors_name_the_key(values, message):
    with pytest.raises(ConfigError, match=message):
        MclstexpConfig.from_dict(values)


def test_mclstexp_with_the_siglip_loss_trains_and_its_checkpoint_embeds(toy, tmp_path):
    """loss: siglip (HESCAPE's option): the sigmoid loss with its learnable scale and bias in the
    model, trained and rebuilt from the checkpoint (the loss itself: tests/test_bleep.py)."""
    cfg = dataclasses.replace(TINY, loss="siglip")
    metrics, state = _train(toy, tmp_path, cfg)
    assert {"siglip.log_scale", "siglip.bias"} <= set(state["model_state"])
    assert np.isfinite(metrics["loss"]).all() and metrics["loss"].iloc[-3:].mean() < metrics["loss"].iloc[:3].mean()
    model, _ = load_mclstexp(tmp_path / "mclstexp.pt")
    assert torch.equal(model.siglip.log_scale.detach(), state["model_state"]["siglip.log_scale"])

"""BLEEP trained as itself (comtip.baselines): its projection head, its loss against a hand
computation, training on CoMTIP's data path (the loss falls, the run is reproducible and resumes
bit-identically), and the embeddings the retrieval method reads."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from _helpers.pretraining import make_cohort
from comtip._core.errors import ConfigError, PipelineInputError
from comtip.baselines.bleep_config import BleepConfig
from comtip.baselines.bleep_embed import embed_bleep_sample, load_bleep
from comtip.baselines.bleep_model import BLEEP, ProjectionHead, SiglipLoss, bleep_loss
from comtip.baselines.bleep_train import BleepTrainer, train_bleep
from comtip.model.config import ModelConfig
from comtip.model.vision import preprocess_images
from comtip.training.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = BleepConfig(image_encoder="resnet10t", image_size=16)
MODEL = {"image_size": 16}
# 2 samples x 40 spots (the last of each expresses no gene: skipped, as in pretraining) = 78 spots
# -> 9 steps of 8 per epoch
SHARED = {"epochs": 4, "batch_size": 8, "log_every": 1, "checkpoint_every": 6, "num_workers": 0}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("bleep_cohort"))


def _train(toy, out, cfg: BleepConfig = TINY, **shared):
    train_bleep(
        toy["samples"],
        toy["patches"],
        toy["indexes"],
        toy["sentences"],
        out / "bleep.pt",
        out / "bleep.metrics.tsv",
        bleep_config=cfg.to_dict(),
        model_config=MODEL,
        train_config=cfg.train_config({**SHARED, **shared}, seed=3),
    )
    return pd.read_csv(out / "bleep.metrics.tsv", sep="\t"), torch.load(out / "bleep.pt", weights_only=True)


# -- the model ------------------------------------------------------------------------------------


def test_projection_head_is_bleeps_linear_gelu_linear_dropout_residual_layernorm():
    head = ProjectionHead(10, 256, 0.1)
    assert [type(m) for m in head.children()] == [nn.Linear, nn.GELU, nn.Linear, nn.Dropout, nn.LayerNorm]
    assert (head.projection.in_features, head.projection.out_features) == (10, 256)
    assert (head.fc.in_features, head.fc.out_features, head.dropout.p) == (256, 256, 0.1)
    x = torch.randn(5, 10)
    head.eval()
    out = head(x)
    assert out.shape == (5, 256)
    projected = head.projection(x)
    expected = head.layer_norm(head.fc(torch.nn.functional.gelu(projected)) + projected)
    torch.testing.assert_close(out, expected)
    head.train()
    assert not torch.equal(head(x), head(x))  # dropout 0.1 is on in training
    head.eval()
    with torch.no_grad():  # the residual: with fc zeroed the head is LayerNorm(first Linear)
        head.fc.weight.zero_()
        head.fc.bias.zero_()
    torch.testing.assert_close(head(x), head.layer_norm(head.projection(x)))


def test_bleep_model_is_a_timm_cnn_with_pooled_features_and_two_heads():
    model = BLEEP(BleepConfig(image_encoder="resnet18"), ModelConfig.from_dict(MODEL), n_genes=7, image_size=32)
    assert model.image_encoder.num_features == 512 and model.spot_projection.projection.in_features == 7
    assert model.image_projection.projection.in_features == 512
    assert model.image_mean == pytest.approx((0.485, 0.456, 0.406))  # the backbone's own (ImageNet)
    model.eval()
    images = torch.randn(3, 3, 32, 32)
    assert model.features(images).shape == (3, 512)
    assert model.encode_image(images).shape == (3, 256) and model.encode_expression(torch.rand(3, 7)).shape == (3, 256)
    vit = BLEEP(
        BleepConfig(image_encoder="comtip_vit"),
        ModelConfig.from_dict({"image_size": 32, "vision_kwargs": {"depth": 1}}),
        n_genes=7,
        image_size=32,
    )
    assert len(vit.image_encoder.blocks) == 1 and vit.image_mean == pytest.approx((0.5, 0.5, 0.5))
    with pytest.raises(ConfigError, match="bleep.image_encoder"):
        BLEEP(BleepConfig(image_encoder="no_such_net"), ModelConfig.from_dict(MODEL), n_genes=7, image_size=32)


def test_pretrained_weights_come_from_a_local_file_only(tmp_path):
    source = BLEEP(TINY, ModelConfig.from_dict(MODEL), 3, 16)
    torch.save(source.image_encoder.state_dict(), tmp_path / "resnet10t.pth")
    loaded = BLEEP(
        BleepConfig(image_encoder="resnet10t", pretrained_weights=str(tmp_path / "resnet10t.pth")),
        ModelConfig.from_dict(MODEL),
        3,
        16,
    )
    for key, value in source.image_encoder.state_dict().items():
        torch.testing.assert_close(loaded.image_encoder.state_dict()[key], value)
    with pytest.raises(ConfigError, match=r"bleep\.pretrained_weights': no such file"):
        BLEEP(BleepConfig(image_encoder="resnet10t", pretrained_weights=str(tmp_path / "x.pth")), ModelConfig(), 3, 16)


# -- the loss -------------------------------------------------------------------------------------


def _hand_loss(image: np.ndarray, spot: np.ndarray, t: float) -> float:
    """BLEEP's loss written out element by element (float64, no torch)."""
    n = len(image)
    logits = [[sum(spot[i] * image[j]) / t for j in range(n)] for i in range(n)]
    sim = [[(sum(image[i] * image[j]) + sum(spot[i] * spot[j])) / 2 * t for j in range(n)] for i in range(n)]
    targets = [[math.exp(sim[i][j]) / sum(math.exp(v) for v in sim[i]) for j in range(n)] for i in range(n)]

    def log_softmax(row):
        top = max(row)
        return [v - top - math.log(sum(math.exp(w - top) for w in row)) for v in row]

    spots = [-sum(targets[i][j] * log_softmax(logits[i])[j] for j in range(n)) for i in range(n)]
    columns = [[logits[j][i] for j in range(n)] for i in range(n)]  # logits transposed
    images = [-sum(targets[j][i] * log_softmax(columns[i])[j] for j in range(n)) for i in range(n)]
    return sum((a + b) / 2 for a, b in zip(images, spots, strict=True)) / n


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_loss_is_bleeps_on_a_small_example(temperature):
    image = np.array([[1.0, 0.5, -0.2], [0.1, -1.0, 0.3], [0.7, 0.2, 0.9], [-0.4, 0.6, 0.0]])
    spot = np.array([[0.8, -0.1, 0.4], [0.3, -0.9, 0.1], [0.0, 0.5, 1.2], [-0.6, 0.2, -0.3]])
    got = bleep_loss(torch.tensor(image), torch.tensor(spot), temperature).item()
    assert got == pytest.approx(_hand_loss(image, spot, temperature), rel=1e-12)
    # not normalised before the logits (BLEEP's code): scaling the embeddings changes the loss
    scaled = bleep_loss(torch.tensor(3 * image), torch.tensor(3 * spot), temperature).item()
    assert scaled == pytest.approx(_hand_loss(3 * image, 3 * spot, temperature), rel=1e-12)
    assert abs(scaled - got) > 0.1
    # T multiplies the target similarities and divides the logits: swapping them changes the value
    if temperature != 1.0:
        assert got != pytest.approx(_hand_loss(image, spot, 1.0), rel=1e-3)


def test_identical_orthogonal_embeddings_at_t1_give_the_entropy_of_the_soft_targets():
    """image = spot = c·I (B = D = 4): logits = c²·I and targets = softmax(c²·I) row-wise (both
    symmetric), so each cross-entropy is the entropy of a row: with p = e^{c²} / (e^{c²} + B − 1)
    and q = 1 / (e^{c²} + B − 1), loss = −p ln p − (B − 1) q ln q. At c² = ln 3, B = 4: p = 1/2,
    q = 1/6, loss = ln 2 / 2 + ln 6 / 2 = ln √12."""
    b, c2 = 4, math.log(3.0)
    emb = math.sqrt(c2) * torch.eye(b, dtype=torch.float64)
    assert bleep_loss(emb, emb.clone(), 1.0).item() == pytest.approx(0.5 * math.log(12.0), rel=1e-12)
    same = torch.ones(5, 3, dtype=torch.float64)  # every spot the same vector: uniform targets, ln B
    assert bleep_loss(same, same, 1.0).item() == pytest.approx(math.log(5.0), rel=1e-12)


# -- training on the pretraining data path --------------------------------------------------------


def test_training_lowers_the_loss_and_is_bit_identical_for_the_same_seed(toy, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    metrics, state = _train(toy, tmp_path / "a")
    assert list(metrics["step"]) == list(range(1, 37))  # 4 epochs x 9 steps: pretraining's plan
    assert state["step"] == 36 and state["kind"] == "bleep"
    assert state["panel_genes"] == [f"GENE{i}" for i in range(10)] and state["image_size"] == 16
    first, last = metrics["loss"][:9].mean(), metrics["loss"][-9:].mean()
    assert last < 0.8 * first, metrics["loss"].tolist()
    assert (metrics["lr"] == 1e-3).all()  # BLEEP's constant learning rate
    again, state_b = _train(toy, tmp_path / "b")
    assert again["loss"].tolist() == metrics["loss"].tolist()
    for key, value in state["model_state"].items():
        assert torch.equal(value, state_b["model_state"][key]), key
    assert not (tmp_path / "a" / "bleep.resume").exists()  # removed once the outputs exist


def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(toy, tmp_path, monkeypatch):
    (tmp_path / "full").mkdir()
    (tmp_path / "killed").mkdir()
    _, full = _train(toy, tmp_path / "full", epochs=1)
    saved = BleepTrainer._save_resume

    def save_then_die(self):
        saved(self)
        raise KeyboardInterrupt("killed after the first resume checkpoint")

    monkeypatch.setattr(BleepTrainer, "_save_resume", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _train(toy, tmp_path / "killed", epochs=1)
    assert (tmp_path / "killed" / "bleep.resume" / "last.pt").exists()
    assert not (tmp_path / "killed" / "bleep.pt").exists()  # nothing that looks finished
    monkeypatch.setattr(BleepTrainer, "_save_resume", saved)
    metrics, resumed = _train(toy, tmp_path / "killed", epochs=1)
    assert list(metrics["step"]) == list(range(1, 10))
    for key, value in full["model_state"].items():
        assert torch.equal(value, resumed["model_state"][key]), key


def test_the_budget_is_pretrainings_unless_overridden():
    shared = {"epochs": 24, "batch_size": 64, "max_steps": None, "lr": 5e-4, "color_jitter": 0.3, "warmup_steps": 10}
    train = TrainConfig.from_dict(BleepConfig().train_config(shared, seed=0))
    assert (train.epochs, train.batch_size, train.max_steps) == (24, 64, None)
    assert (train.lr, train.color_jitter, train.warmup_steps, train.clip_grad_norm) == (1e-3, 0.0, 0, None)
    train = TrainConfig.from_dict(BleepConfig(max_steps=7, batch_size=4).train_config(shared, seed=0))
    assert (train.max_steps, train.batch_size) == (7, 4)


# -- embeddings -----------------------------------------------------------------------------------


def test_embeddings_are_the_encoders_on_every_spot_in_the_keys_retrieval_reads(toy, tmp_path):
    _train(toy, tmp_path, epochs=1)
    out = tmp_path / "s0.npz"
    embed_bleep_sample(tmp_path / "bleep.pt", toy["patches"][0], toy["sentences"][0], out, batch_size=16, sample="s0")
    emb = np.load(out)
    sentences = np.load(toy["sentences"][0])
    assert list(emb["barcodes"]) == list(sentences["barcodes"])  # every spot, the empty one too
    assert emb["features"].shape == (40, 512) and emb["image_embeddings"].shape == (40, 256)
    assert emb["sentence_embeddings"].shape == (40, 256)
    model, info = load_bleep(tmp_path / "bleep.pt")
    with torch.no_grad():
        images = preprocess_images(
            torch.from_numpy(np.load(toy["patches"][0])), info["image_size"], model.image_mean, model.image_std
        )
        np.testing.assert_allclose(emb["image_embeddings"], model.encode_image(images).numpy(), rtol=1e-4, atol=1e-5)
        expression = model.encode_expression(torch.from_numpy(sentences["panel_values"])).numpy()
    np.testing.assert_allclose(emb["sentence_embeddings"], expression, rtol=1e-4, atol=1e-5)
    # another panel is refused, naming the sample and the file
    data = dict(sentences)
    data["panel_genes"] = data["panel_genes"][::-1]
    np.savez(tmp_path / "other.npz", **data)
    with pytest.raises(PipelineInputError, match=r"\[sample s0\].*panel genes differ"):
        embed_bleep_sample(tmp_path / "bleep.pt", toy["patches"][0], tmp_path / "other.npz", out, sample="s0")


def test_two_processes_train_under_torchrun_each_on_its_own_batch(toy, tmp_path):
    """DDP as BLEEP ran it (one batch per process, gradients averaged, no logits gathered): with
    2 processes a step reads 2 x 8 spots, so an epoch of the 78 spots is 4 steps."""
    from comtip.training.launch import run_processes

    log = tmp_path / "train_bleep.log"
    kwargs = {
        "samples": toy["samples"],
        "patches": toy["patches"],
        "indexes": toy["indexes"],
        "sentences": toy["sentences"],
        "out_checkpoint": tmp_path / "bleep.pt",
        "out_metrics": tmp_path / "bleep.metrics.tsv",
        "bleep_config": TINY.to_dict(),
        "model_config": MODEL,
        "train_config": TINY.train_config({**SHARED, "epochs": 1, "log_every": 2}, seed=3),
    }
    run_processes("comtip.baselines.bleep_train:train_bleep", kwargs, processes=2, log_path=log)
    assert "2 processes on cpu: 4 steps of 16 spots" in log.read_text(), log.read_text()[-3000:]
    assert list(pd.read_csv(tmp_path / "bleep.metrics.tsv", sep="\t")["step"]) == [2, 4]
    assert load_bleep(tmp_path / "bleep.pt")[1]["step"] == 4


# -- HESCAPE's loss option ------------------------------------------------------------------------


def test_siglip_option_is_the_sigmoid_loss_of_the_normalised_embeddings_by_hand():
    """loss: siglip = -(1/B) Σ_ij log σ(z_ij (s·u_i·v_j + b)), z = +1 on the diagonal, with s = 1/0.1
    and b = -10 at the start, on L2-normalised embeddings (the raw ones are not unit norm)."""
    head = SiglipLoss()
    img = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
    spot = torch.tensor([[1.0, 1.0], [0.0, -5.0]])
    u = [(1.0, 0.0), (0.0, 1.0)]
    v = [(1 / math.sqrt(2), 1 / math.sqrt(2)), (0.0, -1.0)]
    total = 0.0
    for i in range(2):
        for j in range(2):
            z = 1.0 if i == j else -1.0
            logit = 10.0 * (u[i][0] * v[j][0] + u[i][1] * v[j][1]) - 10.0
            total += -math.log(1.0 / (1.0 + math.exp(-z * logit)))
    assert float(head(img, spot).detach()) == pytest.approx(total / 2, rel=1e-5)
    # the scale and bias are trained
    head(img, spot).backward()
    assert head.log_scale.grad is not None and head.bias.grad is not None and float(head.bias.grad) != 0


def test_bleep_with_the_siglip_loss_trains_and_its_checkpoint_embeds(toy, tmp_path):
    cfg = BleepConfig(image_encoder="resnet10t", image_size=16, loss="siglip")
    metrics, state = _train(toy, tmp_path, cfg)
    assert {"siglip.log_scale", "siglip.bias"} <= set(state["model_state"])
    first, last = metrics["loss"][:9].mean(), metrics["loss"][-9:].mean()
    assert last < first, metrics["loss"].tolist()
    model, _ = load_bleep(tmp_path / "bleep.pt")  # rebuilt with its loss: the state dict loads strictly
    assert torch.equal(model.siglip.bias.detach(), state["model_state"]["siglip.bias"])
    with pytest.raises(ConfigError, match=r"bleep\.loss"):
        BleepConfig.from_dict({"loss": "infonce"})

"""Inference: image embeddings / backbone features from a memmap in batches, and zero-shot
expression from gene-value prompts (shapes, range, a case with a known answer, and the model's
vocabulary and mode restored)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from comtip.genes import value_bins
from comtip.inference import default_value_grid, image_embeddings, image_features, zero_shot
from comtip.model import CoMTIP, ModelConfig, preprocess_images

GENES = [f"GENE{i}" for i in range(12)]
EDGES = np.array([0.5, 1.0, 1.5, 2.0], dtype=np.float32)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg() -> ModelConfig:
    return ModelConfig(image_size=32, vision_kwargs={"depth": 1, "patch_size": 8, "embed_dim": 32, "num_heads": 2},
                       embed_dim=16, mfm_heads=2, text_dim=16, text_heads=2, text_ff=32, name_buckets=256,
                       n_bins=len(EDGES) + 2)


@pytest.fixture
def model() -> CoMTIP:
    torch.manual_seed(0)
    return CoMTIP(_cfg(), GENES)


@pytest.fixture
def patches_memmap(tmp_path) -> np.ndarray:
    rng = np.random.default_rng(0)
    np.save(tmp_path / "spot_patches.npy", rng.integers(0, 256, size=(7, 40, 40, 3), dtype=np.uint8))
    return np.load(tmp_path / "spot_patches.npy", mmap_mode="r")


def test_image_embeddings_match_encode_image_in_batches(model, patches_memmap):
    model.train()
    emb = image_embeddings(model, patches_memmap, 32, batch_size=3)
    assert emb.shape == (7, 16) and emb.dtype == np.float32
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        direct = model.encode_image(preprocess_images(torch.from_numpy(np.array(patches_memmap)), 32)).numpy()
    np.testing.assert_allclose(emb, direct, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_image_features_are_the_pre_projection_pooled_features(model, patches_memmap):
    feats = image_features(model, patches_memmap, 32, batch_size=4)
    assert feats.shape == (7, 32)  # the ViT width, not embed_dim
    with torch.no_grad():
        projected = F.normalize(model.vision.proj(torch.from_numpy(feats)), dim=-1).numpy()
    np.testing.assert_allclose(projected, image_embeddings(model, patches_memmap, 32), atol=1e-5)


def test_default_value_grid():
    grid = default_value_grid(np.array([[0.0, 1.0], [3.0, 0.5]]), n=4)
    np.testing.assert_allclose(grid, [0.0, 1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="positive maximum"):
        default_value_grid(np.zeros((2, 2)))


def test_zero_shot_random_model_within_grid_and_restores_state(model, patches_memmap):
    emb = image_embeddings(model, patches_memmap, 32)
    grid = np.linspace(0.0, 2.5, 6, dtype=np.float32)
    model.train()
    unseen = ["NOVEL1", "GENE3", "KRT19"]
    pred = zero_shot(model, emb, unseen, grid, EDGES, batch_size=4)
    assert pred.shape == (7, 3) and pred.dtype == np.float32
    assert (pred >= 0.0).all() and (pred <= 2.5).all()
    assert model.vocabulary == GENES and model.training
    again = zero_shot(model, emb, unseen, grid, EDGES, batch_size=5)  # eval mode: no dropout noise
    np.testing.assert_allclose(pred, again, atol=1e-5)


def test_zero_shot_uses_the_learned_scale_or_the_temperature(model):
    """Against a direct computation of softmax_v(scale · x·t_{g,v}) · v for one gene."""
    emb = F.normalize(torch.randn(4, 16, generator=torch.Generator().manual_seed(1)), dim=-1).numpy()
    grid = np.array([0.0, 0.7, 1.4, 2.1], dtype=np.float32)
    model.eval()
    model.set_vocabulary(["GENE5"])
    with torch.no_grad():
        text = model.encode_sentences(torch.zeros(4, 1, dtype=torch.long), torch.from_numpy(grid)[:, None],
                                      torch.from_numpy(value_bins(grid, EDGES)).long()[:, None],
                                      torch.zeros(4, 1, dtype=torch.bool))
        learned = model.scale()
    model.set_vocabulary(GENES)
    for temperature, scale in ((None, learned), (0.5, torch.tensor(2.0))):
        expected = (torch.softmax(torch.from_numpy(emb) @ text.T * scale, dim=-1) * torch.from_numpy(grid)).sum(-1)
        got = zero_shot(model, emb, ["GENE5"], grid, EDGES, temperature=temperature)
        np.testing.assert_allclose(got[:, 0], expected.numpy(), atol=1e-5)


class _OracleText(CoMTIP):
    """A CoMTIP whose sentence embedding of "g at v" is a known direction: gene g owns dims
    (2g, 2g+1) and v sets the angle there. An image whose gene-g block points at angle(v*) then
    scores highest with "g at v*", so zero-shot must return v* (at a sharp temperature)."""

    calls: list[tuple[list[str], torch.Tensor]]

    def encode_sentences(self, gene_ids, values, bins, pad):
        self.calls.append((list(self.vocabulary), bins.clone()))
        names = [self.vocabulary[i] for i in gene_ids[:, 0].tolist()]
        slots = torch.tensor([ORACLE_GENES.index(n) for n in names])
        out = torch.zeros(len(names), self.cfg.embed_dim)
        angle = values[:, 0] * ANGLE_PER_UNIT
        out[torch.arange(len(names)), 2 * slots] = torch.cos(angle)
        out[torch.arange(len(names)), 2 * slots + 1] = torch.sin(angle)
        return out


ORACLE_GENES = ["CD74", "NOVELGENE", "KRT8"]
ANGLE_PER_UNIT = 0.5  # grid [0, 3] → angles [0, 1.5] rad: distinct directions


def test_zero_shot_recovers_known_values():
    torch.manual_seed(0)
    model = _OracleText(_cfg(), GENES)
    model.calls = []
    grid = np.linspace(0.0, 3.0, 13, dtype=np.float32)  # step 0.25
    rng = np.random.default_rng(0)
    truth = rng.choice(grid, size=(9, 3))  # each spot: one grid value per gene
    angle = truth * ANGLE_PER_UNIT
    emb = np.zeros((9, 16), np.float32)
    emb[:, 0:6:2], emb[:, 1:6:2] = np.cos(angle), np.sin(angle)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    pred = zero_shot(model, emb, ORACLE_GENES, grid, EDGES, temperature=1e-4, batch_size=8)
    np.testing.assert_allclose(pred, truth, atol=1e-3)
    vocab, bins = model.calls[0]
    assert vocab == ORACLE_GENES and model.vocabulary == GENES
    np.testing.assert_array_equal(bins[:, 0].numpy(), value_bins(np.tile(grid, 3)[:8], EDGES))
    # a soft temperature gives a smooth expectation between the grid's ends, still ordered by truth
    soft = zero_shot(model, emb, ORACLE_GENES, grid, EDGES, temperature=0.05)
    order = np.argsort(truth[:, 0], kind="stable")
    assert (np.diff(soft[order, 0]) >= -1e-6).all()


def test_zero_shot_rejects_unnormalised_embeddings(model):
    with pytest.raises(ValueError, match="L2-normalised"):
        zero_shot(model, np.ones((2, 16), np.float32), ["GENE1"], np.array([0.0, 1.0]), EDGES)

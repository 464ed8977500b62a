"""Inference: image embeddings / backbone features from a memmap in batches, and zero-shot
expression from gene-value prompts (shapes, range, a case with a known answer, and the model's
vocabulary and mode restored); the training value prior and per-gene quantile grids against hand
computations, and the method reading them from training values only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from comtip.data.genes import value_bins
from comtip.model import CoMTIP, ModelConfig, preprocess_images
from comtip.predict.embeddings import image_embeddings, image_features, image_features_and_embeddings
from comtip.predict.zeroshot import (
    default_value_grid,
    prompt_embeddings,
    quantile_value_grid,
    value_prior,
    zero_shot,
    zero_shot_grid_and_prior,
)

GENES = [f"GENE{i}" for i in range(12)]
EDGES = np.array([0.5, 1.0, 1.5, 2.0], dtype=np.float32)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg() -> ModelConfig:
    return ModelConfig(
        image_size=32,
        vision_kwargs={"depth": 1, "patch_size": 8, "embed_dim": 32, "num_heads": 2},
        embed_dim=16,
        mfm_heads=2,
        text_dim=16,
        text_heads=2,
        text_ff=32,
        name_buckets=256,
        n_bins=len(EDGES) + 2,
    )


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
        direct = model.encode_image(
            preprocess_images(torch.from_numpy(np.array(patches_memmap)), 32, model.cfg.image_mean, model.cfg.image_std)
        ).numpy()
    np.testing.assert_allclose(emb, direct, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_image_features_are_the_pre_projection_pooled_features(model, patches_memmap):
    feats = image_features(model, patches_memmap, 32, batch_size=4)
    assert feats.shape == (7, 32)  # the ViT width, not embed_dim
    with torch.no_grad():
        projected = F.normalize(model.vision.proj(torch.from_numpy(feats)), dim=-1).numpy()
    np.testing.assert_allclose(projected, image_embeddings(model, patches_memmap, 32), atol=1e-5)


def test_features_and_embeddings_in_one_pass_equal_the_two_separate_passes(model, patches_memmap):
    feats, emb = image_features_and_embeddings(model, patches_memmap, 32, batch_size=3)
    assert feats.shape == (7, 32) and emb.shape == (7, 16)
    np.testing.assert_allclose(feats, image_features(model, patches_memmap, 32, batch_size=4), atol=1e-6)
    np.testing.assert_allclose(emb, image_embeddings(model, patches_memmap, 32, batch_size=5), atol=1e-6)


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
        text = model.encode_sentences(
            torch.zeros(4, 1, dtype=torch.long),
            torch.from_numpy(grid)[:, None],
            torch.from_numpy(value_bins(grid, EDGES)).long()[:, None],
            torch.zeros(4, 1, dtype=torch.bool),
        )
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


# ---- value prior p(v | g) and per-gene grids ------------------------------------------------------


def test_value_prior_is_the_linearly_binned_training_histogram():
    grid = np.array([0.0, 1.0, 2.0])
    train = np.array([[0.0, 1.0], [0.5, 1.0], [2.0, 1.0], [3.0, 1.0]])  # gene 0: 3.0 lies above the grid
    # gene 0: 0 -> [1, 0, 0]; 0.5 -> [.5, .5, 0]; 2 -> [0, 0, 1]; 3 -> the top end [0, 0, 1]
    # gene 1: four values exactly on the middle point
    np.testing.assert_allclose(value_prior(train, grid, smoothing=0.0), [[1.5 / 4, 0.5 / 4, 2 / 4], [0, 1, 0]])
    np.testing.assert_allclose(
        value_prior(train, grid, smoothing=0.3),
        [[0.7 * 1.5 / 4 + 0.1, 0.7 * 0.5 / 4 + 0.1, 0.7 * 2 / 4 + 0.1], [0.1, 0.8, 0.1]],
    )
    # inside the grid's range linear binning keeps the mean: prior mean = training mean
    inside = np.array([[0.2], [0.9], [1.7], [1.75], [0.0]])
    np.testing.assert_allclose(value_prior(inside, grid, smoothing=0.0) @ grid, inside.mean(0))
    # per-gene grids, and a repeated point takes its value's mass once (on one copy)
    per_gene = np.array([[0.0, 0.0, 1.0], [1.0, 2.0, 4.0]])
    np.testing.assert_allclose(
        value_prior(np.array([[0.0, 1.5], [0.0, 4.0], [1.0, 3.0]]), per_gene, smoothing=0),
        [[0, 2 / 3, 1 / 3], [0.5 / 3, 1.0 / 3, 1.5 / 3]],
    )
    with pytest.raises(ValueError, match="non-decreasing"):
        value_prior(train, np.array([0.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match="smoothing"):
        value_prior(train, grid, smoothing=1.5)


def test_quantile_value_grid_is_each_genes_training_quantiles():
    train = np.array([[0.0, 4.0], [0.0, 1.0], [0.0, 2.0], [1.0, 3.0], [2.0, 0.0]])
    np.testing.assert_allclose(quantile_value_grid(train, n=3), [[0.0, 0.0, 2.0], [0.0, 2.0, 4.0]])
    grid, prior = zero_shot_grid_and_prior(train, 3, grid="quantile", prior="training", smoothing=0.0)
    np.testing.assert_allclose(grid, [[0.0, 0.0, 2.0], [0.0, 2.0, 4.0]])
    np.testing.assert_allclose(prior, value_prior(train, grid, smoothing=0.0))
    grid, prior = zero_shot_grid_and_prior(train, 5, grid="shared", prior="none")
    np.testing.assert_allclose(grid, [0.0, 1.0, 2.0, 3.0, 4.0])
    assert prior is None
    with pytest.raises(ValueError, match="grid must be one of"):
        zero_shot_grid_and_prior(train, 3, grid="uniform")
    with pytest.raises(ValueError, match="prior must be one of"):
        zero_shot_grid_and_prior(train, 3, prior="test")


def _prompt_embeddings(model, gene: str, grid: np.ndarray) -> torch.Tensor:
    model.eval()
    previous = list(model.vocabulary)
    model.set_vocabulary([gene])
    with torch.no_grad():
        text = model.encode_sentences(
            torch.zeros(len(grid), 1, dtype=torch.long),
            torch.from_numpy(grid.astype(np.float32))[:, None],
            torch.from_numpy(value_bins(grid.astype(np.float32), EDGES)).long()[:, None],
            torch.zeros(len(grid), 1, dtype=torch.bool),
        )
    model.set_vocabulary(previous)
    return text


def test_prompt_embeddings_are_each_genes_one_token_sentences(model):
    """Row g of the (G, V, D) result embeds "genes[g] at grid[g, j]" (the hand-built sentences
    above, gene by gene), in batches smaller than G·V; vocabulary and training mode restored."""
    grid = np.array([[0.0, 0.7, 1.4], [0.2, 2.0, 6.0]], dtype=np.float32)
    model.train()
    before = list(model.vocabulary)
    got = prompt_embeddings(model, ["GENE5", "NEWGENE"], grid, EDGES, batch_size=4)
    assert got.shape == (2, 3, 16) and not got.requires_grad
    assert model.training and model.vocabulary == before
    for g, gene in enumerate(["GENE5", "NEWGENE"]):
        torch.testing.assert_close(got[g], _prompt_embeddings(model, gene, grid[g]), rtol=1e-5, atol=1e-6)
    assert model.vocabulary == before
    with pytest.raises(ValueError, match="value_grid must be"):
        prompt_embeddings(model, ["GENE5"], grid, EDGES)


def test_zero_shot_with_a_prior_is_bayes_rule_on_the_scores(model):
    """ŷ = Σ_j π_j e^{s_j} v_j / Σ_j π_j e^{s_j}, computed by hand in float64; a flat prior is the old
    plain softmax; a point-mass prior returns its value whatever the image."""
    emb = F.normalize(torch.randn(5, 16, generator=torch.Generator().manual_seed(2)), dim=-1).numpy()
    grid = np.array([0.0, 0.7, 1.4, 2.1], dtype=np.float32)
    scale = 3.0
    s = (emb.astype(np.float64) @ _prompt_embeddings(model, "GENE5", grid).numpy().astype(np.float64).T) * scale
    prior = np.array([[0.5, 0.1, 0.3, 0.1]])
    weights = prior * np.exp(s)
    expected = (weights * grid).sum(1) / weights.sum(1)
    got = zero_shot(model, emb, ["GENE5"], grid, EDGES, temperature=1 / scale, prior=prior)
    np.testing.assert_allclose(got[:, 0], expected, rtol=1e-5)
    # the prior's normalisation does not matter
    np.testing.assert_allclose(
        zero_shot(model, emb, ["GENE5"], grid, EDGES, temperature=1 / scale, prior=7 * prior), got, rtol=1e-6
    )
    # flat prior == no prior == softmax over the grid
    plain = zero_shot(model, emb, ["GENE5"], grid, EDGES, temperature=1 / scale)
    flat = zero_shot(model, emb, ["GENE5"], grid, EDGES, temperature=1 / scale, prior=np.full((1, 4), 0.25))
    softmax = np.exp(s) / np.exp(s).sum(1, keepdims=True)
    np.testing.assert_allclose(flat, plain, atol=1e-6)
    np.testing.assert_allclose(plain[:, 0], softmax @ grid, rtol=1e-5)
    assert np.abs(got - plain).max() > 1e-3  # the prior changes the answer
    # point mass at 1.4: every spot predicts 1.4
    point = zero_shot(model, emb, ["GENE5"], grid, EDGES, prior=np.array([[0.0, 0.0, 1.0, 0.0]]))
    np.testing.assert_allclose(point, 1.4, atol=1e-6)
    with pytest.raises(ValueError, match="prior must be"):
        zero_shot(model, emb, ["GENE5"], grid, EDGES, prior=np.ones((1, 3)))
    with pytest.raises(ValueError, match="non-negative"):
        zero_shot(model, emb, ["GENE5"], grid, EDGES, prior=np.array([[0.5, -0.1, 0.3, 0.3]]))


def test_zero_shot_per_gene_grids(model):
    """A (G, V) grid: gene g is scored on its own values; point masses pick each gene's own value,
    and a repeated grid point under value_prior counts once (same answer as without the copy)."""
    emb = F.normalize(torch.randn(3, 16, generator=torch.Generator().manual_seed(3)), dim=-1).numpy()
    grid = np.array([[0.0, 0.5, 1.0], [0.0, 2.0, 6.0]], dtype=np.float32)
    point = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    np.testing.assert_allclose(
        zero_shot(model, emb, ["GENE1", "GENE2"], grid, EDGES, prior=point), np.tile([0.5, 6.0], (3, 1)), atol=1e-6
    )
    # gene 1's column equals a one-gene call with its own grid (hand-computed softmax)
    s = emb.astype(np.float64) @ _prompt_embeddings(model, "GENE2", grid[1]).numpy().astype(np.float64).T * 2.0
    p = np.exp(s) / np.exp(s).sum(1, keepdims=True)
    got = zero_shot(model, emb, ["GENE1", "GENE2"], grid, EDGES, temperature=0.5)
    np.testing.assert_allclose(got[:, 1], p @ grid[1], rtol=1e-5)
    train = np.array([[0.0], [0.0], [1.0], [0.3]])
    with_copy = np.array([[0.0, 0.0, 1.0]], dtype=np.float32)
    without = np.array([[0.0, 1.0]], dtype=np.float32)
    a = zero_shot(
        model, emb, ["GENE1"], with_copy, EDGES, temperature=0.5, prior=value_prior(train, with_copy, smoothing=0.0)
    )
    b = zero_shot(
        model, emb, ["GENE1"], without, EDGES, temperature=0.5, prior=value_prior(train, without, smoothing=0.0)
    )
    np.testing.assert_allclose(a, b, rtol=1e-5)


@pytest.mark.parametrize("kind", ["shared", "quantile"])
def test_zero_shot_without_image_evidence_predicts_the_training_mean(model, kind):
    """At an infinite temperature the scores carry nothing and the posterior is the prior, whose
    mean (unsmoothed, linear binning) is the training mean: the mean baseline. The flat prior
    instead predicts the grid's midpoint, far from it — the failure the prior fixes."""
    rng = np.random.default_rng(4)
    train = np.where(rng.random((40, 3)) < 0.4, 0.0, rng.gamma(2.0, 0.5, (40, 3)))
    emb = F.normalize(torch.randn(6, 16, generator=torch.Generator().manual_seed(5)), dim=-1).numpy()
    grid, prior = zero_shot_grid_and_prior(train, 8, grid=kind, prior="training", smoothing=0.0)
    got = zero_shot(model, emb, ["GENE1", "GENE2", "NOVEL"], grid, EDGES, temperature=1e9, prior=prior)
    np.testing.assert_allclose(got, np.tile(train.mean(0), (6, 1)), rtol=1e-5)
    if kind == "shared":
        flat = zero_shot(model, emb, ["GENE1", "GENE2", "NOVEL"], grid, EDGES, temperature=1e9)
        np.testing.assert_allclose(flat, grid.mean(), rtol=1e-5)


def test_zeroshot_method_learns_its_prior_from_training_values_only(tmp_path, monkeypatch, model):
    """predict_with_method("zeroshot"): the prediction is zero_shot with grid and prior from the
    training samples' panel_values; changing the test sample's values changes nothing, changing
    the training values does."""
    import anndata as ad
    import pandas as pd

    import comtip.predict.methods as methods
    import comtip.training.checkpoint as checkpoint

    # the zeroshot method imports load_pretrained when it runs (torch stays out of the other methods' jobs)
    monkeypatch.setattr(checkpoint, "load_pretrained", lambda path: (model, {"bin_edges": EDGES.tolist()}))
    rng = np.random.default_rng(6)
    genes = ["GENE1", "GENE4", "NOVEL"]

    def sample(name: str, n: int, values: np.ndarray) -> tuple:
        barcodes = np.array([f"{name}_{i}" for i in range(n)])
        np.savez(tmp_path / f"{name}.npz", barcodes=barcodes, panel_genes=np.array(genes), panel_values=values)
        x = F.normalize(torch.randn(n, 16, generator=torch.Generator().manual_seed(n)), dim=-1).numpy()
        np.savez(tmp_path / f"{name}_emb.npz", barcodes=barcodes, image_embeddings=x)
        spots = ad.AnnData(X=np.zeros((n, 1), np.float32), obs=pd.DataFrame(index=barcodes))
        spots.obsm["spatial"] = np.zeros((n, 2))
        spots.write_h5ad(tmp_path / f"{name}.h5ad")
        return tmp_path / f"{name}.npz", tmp_path / f"{name}_emb.npz", tmp_path / f"{name}.h5ad", x

    train_values = rng.gamma(1.0, 1.0, (30, 3)).astype(np.float32)
    train_npz, *_ = sample("train", 30, train_values)
    test_npz, test_emb, test_spots, x = sample("test", 7, rng.gamma(1.0, 1.0, (7, 3)).astype(np.float32))

    def predict(**kw) -> np.ndarray:
        ctx = methods.PredictionContext(
            spots_h5ad=test_spots,
            test_sentences=test_npz,
            train_value_files=[train_npz],
            test_embedding=test_emb,
            checkpoint="unused.pt",
            settings={"zeroshot_grid": 6, "zeroshot_temperature": 0.2, **kw},
        )
        return methods.predict_with_method("zeroshot", ctx, tmp_path / "zs.h5ad")

    pred = predict()
    grid, prior = zero_shot_grid_and_prior(train_values, 6)  # the defaults: quantile grid, training prior
    assert grid.shape == (3, 6) and prior is not None
    np.testing.assert_allclose(pred, zero_shot(model, x, genes, grid, EDGES, temperature=0.2, prior=prior), atol=1e-6)
    old = zero_shot(model, x, genes, default_value_grid(train_values, 6), EDGES, temperature=0.2)
    np.testing.assert_allclose(predict(zeroshot_grid_kind="shared", zeroshot_prior="none"), old, atol=1e-6)
    # test expression is never read for the prediction
    np.savez(
        test_npz,
        barcodes=np.load(test_npz)["barcodes"],
        panel_genes=np.array(genes),
        panel_values=np.full((7, 3), 50.0, np.float32),
    )
    np.testing.assert_allclose(predict(), pred, atol=1e-6)
    # training expression is
    np.savez(
        train_npz, barcodes=np.load(train_npz)["barcodes"], panel_genes=np.array(genes), panel_values=train_values * 3
    )
    assert np.abs(predict() - pred).max() > 1e-2

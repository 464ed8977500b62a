"""Image -> sentence retrieval measures against hand-computed ranks."""

from __future__ import annotations

import platform

import pytest
import torch

from comtip.training.retrieval import accuracy_from_embeddings, retrieval_table

# sims[i, j] = similarity of image i to sentence j; the true sentence is j = i.
SIMS = torch.tensor(
    [
        [0.9, 0.1, 0.2, 0.3],  # rank 0
        [0.5, 0.4, 0.1, 0.0],  # 0.5 beats it: rank 1
        [0.2, 0.3, 0.1, 0.6],  # 0.2, 0.3, 0.6 beat it: rank 3
        [0.0, 0.1, 0.7, 0.7],
    ]
)  # a tie does not beat it: rank 0


@pytest.mark.parametrize("batch", [1, 3, 256])
def test_ranks_topk_and_median_by_hand(batch):
    images = torch.eye(4)
    texts = SIMS.T.contiguous()  # images @ texts.T == SIMS
    out = accuracy_from_embeddings(images, texts, k=(1, 2), batch=batch)
    # ranks 0, 1, 3, 0
    assert out["n"] == 4
    assert out["top1"] == pytest.approx(2 / 4) and out["chance_top1"] == pytest.approx(1 / 4)
    assert out["top2"] == pytest.approx(3 / 4) and out["chance_top2"] == pytest.approx(2 / 4)
    assert out["median_rank"] == pytest.approx(0.5)  # median of 0, 0, 1, 3
    assert out["chance_median_rank"] == pytest.approx(1.5)
    table = retrieval_table({"all": out}, k=(1, 2))
    assert list(table["k"]) == [1, 2]
    assert list(table["fold_over_chance"]) == pytest.approx([2.0, 1.5])
    assert list(table["median_rank"]) == [0.5, 0.5] and list(table["chance_median_rank"]) == [1.5, 1.5]


def test_pooled_check_over_all_samples_is_capped_at_a_seeded_subset(tmp_path):
    """``all`` scores every image against every sentence of the pool: at cohort scale it uses a
    seeded subset of at most ``max_pool`` of the per-sample spots; per-sample rows keep theirs."""
    import numpy as np

    from _helpers.pretraining import N_GENES, TINY_MODEL, make_cohort
    from comtip.model import CoMTIP, ModelConfig
    from comtip.training.data import SpotData, sample_files
    from comtip.training.retrieval import spot_retrieval

    cohort = make_cohort(tmp_path)  # 2 samples x 39 spots with a sentence
    data = SpotData(sample_files(cohort["samples"], cohort["patches"], cohort["indexes"], cohort["sentences"]))
    torch.manual_seed(0)
    model = CoMTIP(ModelConfig.from_dict(TINY_MODEL), [f"GENE{i}" for i in range(N_GENES)])

    def table(max_pool):
        out = spot_retrieval(model, data, seed=3, max_spots=30, image_size=16, max_pool=max_pool)
        return out.groupby("spots")["n_spots"].first().to_dict(), out

    sizes, _ = table(1000)
    assert sizes == {"s0": 30, "s1": 30, "all": 60}
    sizes, capped = table(25)
    assert sizes == {"s0": 30, "s1": 30, "all": 25}
    assert np.isclose(capped.loc[capped.spots == "all", "chance_median_rank"].iloc[0], 12.0)
    again = table(25)[1]
    assert capped.equals(again)  # seeded: the same subset every time


def test_pooled_check_keeps_only_the_pool_and_scores_what_embedding_all_spots_would(tmp_path):
    """Only the pooled subset's embeddings are kept across samples (memory bounded by max_pool,
    not by the cohort); the subset and its scores are those of embedding every chosen spot and
    drawing the pool from them afterwards."""
    import numpy as np

    from _helpers.pretraining import N_GENES, TINY_MODEL, make_cohort
    from comtip.model import CoMTIP, ModelConfig
    from comtip.training.data import SENTENCE_KEYS, SpotData, sample_files
    from comtip.training.retrieval import accuracy_from_embeddings, embed, spot_retrieval

    cohort = make_cohort(tmp_path)
    data = SpotData(sample_files(cohort["samples"], cohort["patches"], cohort["indexes"], cohort["sentences"]))
    torch.manual_seed(0)
    model = CoMTIP(ModelConfig.from_dict(TINY_MODEL), [f"GENE{i}" for i in range(N_GENES)]).eval()
    out = spot_retrieval(model, data, seed=5, max_spots=30, image_size=16, max_pool=17)
    rng = np.random.default_rng(5)
    chosen = [np.sort(rng.choice(np.flatnonzero(data.sample_of == i), 30, replace=False)) for i in range(2)]
    spots = np.concatenate(chosen)
    image, text = embed(model, data.images(spots), data.sentence_arrays(spots, SENTENCE_KEYS), 16)
    keep = torch.from_numpy(np.sort(rng.choice(len(spots), 17, replace=False)))
    expected = accuracy_from_embeddings(image[keep], text[keep], (1, 5))
    pooled = out[out.spots == "all"].set_index("k")["accuracy"]
    assert out.loc[out.spots == "all", "n_spots"].iloc[0] == 17
    assert pooled.loc[1] == pytest.approx(expected["top1"])
    assert pooled.loc[5] == pytest.approx(expected["top5"])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_freed_heap_memory_is_given_back_on_glibc():
    from comtip._core.memory import release_freed_memory

    assert release_freed_memory() is True


@pytest.mark.parametrize("batch", [1, 7, 1024])
def test_blocked_infonce_equals_the_dense_cross_entropies(batch):
    from comtip.training.retrieval import blocked_infonce

    gen = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(50, 8, generator=gen), dim=1)
    text = torch.nn.functional.normalize(image + 0.5 * torch.randn(50, 8, generator=gen), dim=1)
    logits = 7.0 * image @ text.T
    labels = torch.arange(50)
    dense = 0.5 * (
        torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)
    )
    assert blocked_infonce(image, text, 7.0, batch=batch) == pytest.approx(float(dense), rel=1e-5)


def test_heldout_monitor_pool_is_capped_and_fixed(tmp_path):
    import numpy as np

    from _helpers.pretraining import make_cohort
    from comtip.training.data import SpotData, sample_files
    from comtip.training.retrieval import HeldoutMonitor

    cohort = make_cohort(tmp_path)
    data = SpotData(sample_files(cohort["samples"], cohort["patches"], cohort["indexes"], cohort["sentences"]))

    def monitor(max_pool):
        return HeldoutMonitor(data, seed=1, max_spots=30, image_size=16, bf16=False, max_pool=max_pool).spots

    assert len(monitor(1000)) == 60
    capped = monitor(25)
    assert len(capped) == 25 and len(set(capped)) == 25 and set(capped) <= set(monitor(1000))
    np.testing.assert_array_equal(capped, monitor(25))

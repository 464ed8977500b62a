"""Image -> sentence retrieval measures against hand-computed ranks."""

from __future__ import annotations

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

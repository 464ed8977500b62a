"""subsample_sentences: random sub-sentences, order kept, packed to the front, vectorised."""

from __future__ import annotations

import pytest
import torch

from comtip.model import subsample_sentences


def _sentences(rows: int = 64, length: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(50, generator=g)[:length] + 1 for _ in range(rows)])
    values = (torch.rand(rows, length, generator=g) * 4 + 0.1).sort(dim=1, descending=True).values
    lengths = torch.randint(0, length + 1, (rows,), generator=g)
    pad = torch.arange(length)[None, :] >= lengths[:, None]
    return ids.masked_fill(pad, 0), values.masked_fill(pad, 0.0), (values * 3).long().masked_fill(pad, 0), pad


def _tokens(ids, values, bins, pad, row):
    keep = ~pad[row]
    return list(zip(ids[row][keep].tolist(), values[row][keep].tolist(), bins[row][keep].tolist()))


def test_subsentences_keep_order_and_lengths():
    ids, values, bins, pad = _sentences()
    out = subsample_sentences(ids, values, bins, pad, torch.Generator().manual_seed(3), prob=1.0, min_len=1)
    new_ids, new_values, new_bins, new_pad = out
    assert all(a.shape == b.shape for a, b in zip(out, (ids, values, bins, pad)))
    n_old, n_new = (~pad).sum(1), (~new_pad).sum(1)
    assert ((n_new >= 1) | (n_old == 0)).all() and (n_new <= n_old).all()
    assert (n_new < n_old).any() and (n_new == 1).any()  # single-gene sentences do occur
    # padding packed at the end, with zeros underneath
    assert torch.equal(new_pad, torch.arange(8)[None, :] >= n_new[:, None])
    assert (new_ids[new_pad] == 0).all() and (new_values[new_pad] == 0).all() and (new_bins[new_pad] == 0).all()
    for row in range(len(ids)):
        old, new = _tokens(ids, values, bins, pad, row), _tokens(new_ids, new_values, new_bins, new_pad, row)
        it = iter(old)
        assert all(tok in it for tok in new)  # a subsequence: same (gene, value, bin) triples, same order


def test_probability_zero_and_min_len():
    ids, values, bins, pad = _sentences()
    same = subsample_sentences(ids, values, bins, pad, torch.Generator().manual_seed(0), prob=0.0)
    assert all(torch.equal(a, b) for a, b in zip(same, (ids, values, bins, pad)))
    out = subsample_sentences(ids, values, bins, pad, torch.Generator().manual_seed(0), prob=1.0, min_len=3)
    n_old, n_new = (~pad).sum(1), (~out[3]).sum(1)
    assert torch.equal(n_new[n_old < 3], n_old[n_old < 3])  # too short to cut: unchanged
    assert (n_new[n_old >= 3] >= 3).all()
    with pytest.raises(ValueError, match="min_len"):
        subsample_sentences(ids, values, bins, pad, None, min_len=0)


def test_seeded():
    ids, values, bins, pad = _sentences()
    a = subsample_sentences(ids, values, bins, pad, torch.Generator().manual_seed(5))
    b = subsample_sentences(ids, values, bins, pad, torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(a, b))

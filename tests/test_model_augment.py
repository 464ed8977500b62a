"""subsample_sentences / vocabulary_sentences: random sub-sentences, packed to the front, vectorised."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from comtip.data.genes import value_bins
from comtip.model import subsample_sentences
from comtip.model.sentence_cuts import value_probes, vocabulary_sentences


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


@pytest.mark.parametrize("length", ["uniform", "log_uniform"])
def test_subsentences_keep_order_and_lengths(length):
    ids, values, bins, pad = _sentences()
    out = subsample_sentences(
        ids, values, bins, pad, torch.Generator().manual_seed(3), prob=1.0, min_len=1, length=length
    )
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


def _cut_lengths(length: str, min_len: int = 1, rows: int = 40000, width: int = 127) -> torch.Tensor:
    ids = torch.arange(1, width + 1).repeat(rows, 1)
    pad = torch.zeros(rows, width, dtype=torch.bool)
    out = subsample_sentences(
        ids, ids.float(), ids, pad, torch.Generator().manual_seed(1), prob=1.0, min_len=min_len, length=length
    )
    return (~out[3]).sum(1)


def test_length_distributions_against_their_formulas():
    """Uniform: P(k) = 1/127 for k in 1..127. Log-uniform: P(k) = log((k+1)/k) / log(128), so a
    cut 127-token sentence keeps one gene with probability log 2 / log 128 = 1/7 and at most
    7 genes with probability 3/7. 40,000 draws: standard errors <= 0.0025."""
    uniform, log_uniform = _cut_lengths("uniform"), _cut_lengths("log_uniform")
    assert uniform.min() >= 1 and uniform.max() <= 127 and log_uniform.min() >= 1 and log_uniform.max() <= 127
    assert (uniform == 1).float().mean().item() == pytest.approx(1 / 127, abs=0.003)
    assert (uniform <= 64).float().mean().item() == pytest.approx(64 / 127, abs=0.01)
    assert (log_uniform == 1).float().mean().item() == pytest.approx(1 / 7, abs=0.01)
    assert (log_uniform <= 7).float().mean().item() == pytest.approx(3 / 7, abs=0.01)
    assert (log_uniform == 127).any()
    shifted = _cut_lengths("log_uniform", min_len=4)
    assert shifted.min() == 4 and shifted.max() <= 127
    # P(k = 4) = log(5/4) / log(128/4)
    assert (shifted == 4).float().mean().item() == pytest.approx(0.0644, abs=0.006)
    with pytest.raises(ValueError, match="length"):
        _cut_lengths("normal", rows=2)


def test_seeded():
    ids, values, bins, pad = _sentences()
    a = subsample_sentences(ids, values, bins, pad, torch.Generator().manual_seed(5))
    b = subsample_sentences(ids, values, bins, pad, torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_value_probes_read_each_spots_value_or_zero():
    ids = torch.tensor([[5, 2, 9, 0], [2, 7, 0, 0], [9, 0, 0, 0]])
    values = torch.tensor([[3.0, 2.0, 1.0, 0.0], [4.0, 0.5, 0.0, 0.0], [2.5, 0.0, 0.0, 0.0]])
    bins = torch.tensor([[6, 4, 2, 0], [7, 1, 0, 0], [5, 0, 0, 0]])
    pad = values == 0
    genes, pv, pb = value_probes(ids, values, bins, pad, n_genes=10, generator=torch.Generator().manual_seed(0))
    assert sorted(genes.tolist()) == [2, 5, 7, 9]  # every gene present (fewer than n_genes); 0 only as padding
    expected = {
        2: ([2.0, 4.0, 0.0], [4, 7, 0]),
        5: ([3.0, 0.0, 0.0], [6, 0, 0]),
        7: ([0.0, 0.5, 0.0], [0, 1, 0]),
        9: ([1.0, 0.0, 2.5], [2, 0, 5]),
    }
    for k, g in enumerate(genes.tolist()):
        assert pv[k].tolist() == expected[g][0] and pb[k].tolist() == expected[g][1]
    two, _, _ = value_probes(ids, values, bins, pad, n_genes=2, generator=torch.Generator().manual_seed(0))
    again, _, _ = value_probes(ids, values, bins, pad, n_genes=2, generator=torch.Generator().manual_seed(0))
    assert len(two) == 2 and len(set(two.tolist())) == 2 and torch.equal(two, again)
    empty, ev, eb = value_probes(ids, values, bins, torch.ones_like(pad), n_genes=3)
    assert empty.shape == (0,) and ev.shape == (0, 3) and eb.shape == (0, 3)
    with pytest.raises(ValueError, match="n_genes"):
        value_probes(ids, values, bins, pad, n_genes=0)


def _dense(rows: int = 200, genes: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    dense = torch.rand(rows, genes, generator=g) * 4
    return dense.masked_fill(torch.rand(rows, genes, generator=g) < 0.5, 0.0)  # half the values are 0


def test_vocabulary_sentences_read_each_genes_value_zeros_included():
    """A replaced sentence = k distinct vocabulary genes, each with its value at that spot (0 for
    a gene the spot does not express, as a token, not padding) and value_bins' bin, sorted by value."""
    dense = _dense()
    rows, width = len(dense), 16
    ids, values, bins, pad = (
        torch.zeros(rows, width, dtype=torch.long),
        torch.zeros(rows, width),
        torch.zeros(rows, width, dtype=torch.long),
        torch.ones(rows, width, dtype=torch.bool),
    )
    edges = torch.tensor([0.5, 1.0, 2.0, 3.0])
    out_ids, out_values, out_bins, out_pad = vocabulary_sentences(
        ids, values, bins, pad, dense, edges, torch.Generator().manual_seed(2), prob=1.0
    )
    n = (~out_pad).sum(1)
    assert n.min() >= 1 and n.max() <= 12  # at most the vocabulary (12 < width 16)
    assert torch.equal(out_pad, torch.arange(width)[None, :] >= n[:, None])  # packed to the front
    kept = ~out_pad
    assert torch.equal(out_values[kept], dense.gather(1, out_ids)[kept])  # each gene's own value
    assert (out_values[kept] == 0).sum() > 0  # zero-valued genes are tokens
    assert np.array_equal(out_bins[kept].numpy(), value_bins(out_values[kept].numpy(), edges.numpy()))
    for row in range(rows):
        genes = out_ids[row][kept[row]]
        assert len(set(genes.tolist())) == len(genes)  # without replacement
        v = out_values[row][kept[row]]
        assert (v[:-1] >= v[1:]).all()  # by value, descending
    assert (out_values[out_pad] == 0).all() and (out_ids[out_pad] == 0).all() and (out_bins[out_pad] == 0).all()


def test_vocabulary_sentences_length_does_not_follow_the_spot():
    """The number of kept genes is drawn independently of how many genes the spot expresses
    (the library-size confound of cutting expressed genes, docs/model.md); prob=0 changes nothing."""
    rows, genes, width = 20000, 40, 32
    g = torch.Generator().manual_seed(0)
    expressed = torch.randint(1, genes + 1, (rows,), generator=g)  # sparse to dense spots
    dense = (torch.arange(genes)[None, :] < expressed[:, None]).float() * 2.0
    ids, values, bins, pad = _sentences(rows, width)
    same = vocabulary_sentences(ids, values, bins, pad, dense, torch.tensor([1.0]), g, prob=0.0)
    assert all(torch.equal(a, b) for a, b in zip(same, (ids, values, bins, pad)))
    out_pad = vocabulary_sentences(
        ids, values, bins, pad, dense, torch.tensor([1.0]), torch.Generator().manual_seed(1), prob=1.0
    )[3]
    n = (~out_pad).sum(1).float()
    assert n.min() == 1 and n.max() == width  # uniform over 1..min(width, genes)
    assert n.mean().item() == pytest.approx((1 + width) / 2, abs=0.3)
    sparse, dense_spots = expressed <= 10, expressed > 30
    assert n[sparse].mean().item() == pytest.approx(n[dense_spots].mean().item(), abs=0.5)
    with pytest.raises(ValueError, match="dense"):
        vocabulary_sentences(ids, values, bins, pad, dense[:5], torch.tensor([1.0]), g)


def test_vocabulary_sentences_mix_with_unchanged_rows_and_are_seeded():
    ids, values, bins, pad = _sentences(rows=400, length=8)
    dense = _dense(rows=400, genes=30)
    edges = torch.tensor([1.0, 2.0])
    a = vocabulary_sentences(ids, values, bins, pad, dense, edges, torch.Generator().manual_seed(4), prob=0.5)
    b = vocabulary_sentences(ids, values, bins, pad, dense, edges, torch.Generator().manual_seed(4), prob=0.5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    unchanged = (a[0] == ids).all(1) & (a[1] == values).all(1) & (a[3] == pad).all(1)
    assert 0.4 < unchanged.float().mean().item() < 0.65  # about half replaced (some replacements coincide)

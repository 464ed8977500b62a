"""PAAT: value shuffles keep both multisets and change the pairing; the adversarial step raises the
loss within ε; the pair discriminator learns."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from comtip.model import GeneTextEncoder, ModelConfig, PairDiscriminator, adversarial_delta, info_nce, shuffle_values

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(
        **{"text_dim": 16, "text_heads": 2, "text_ff": 32, "embed_dim": 8, "name_buckets": 512, "dropout": 0.0, **kw}
    )


def _sentences(rows: int = 12, length: int = 6, vocab: int = 20, seed: int = 0):
    """Random sentences: distinct genes, values sorted descending, ragged padding at the end."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(vocab, generator=g)[:length] for _ in range(rows)])
    values = (torch.rand(rows, length, generator=g) * 4).sort(dim=1, descending=True).values
    lengths = torch.randint(2, length + 1, (rows,), generator=g)
    pad = torch.arange(length)[None, :] >= lengths[:, None]
    ids, values = ids.masked_fill(pad, 0), values.masked_fill(pad, 0.0)
    return ids, values, (values * 3).long().clamp(max=15), pad


def test_shuffle_keeps_multisets_and_changes_pairing():
    values = torch.tensor(
        [
            [3.0, 2.0, 1.0, 0.5],  # distinct values
            [2.0, 2.0, 1.0, 0.0],  # duplicates, 3 tokens
            [1.0, 1.0, 0.0, 0.0],  # 2 equal values: no other pairing exists
            [4.0, 0.0, 0.0, 0.0],  # length 1
            [0.0, 0.0, 0.0, 0.0],  # all padding
            [0.0, 5.0, 0.0, 6.0],
        ]
    )  # padding in the middle
    pad = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1], [1, 0, 1, 0]]).bool()
    bins = (values * 2).long()  # bins are a function of values: they must move together
    for seed in range(20):
        new_values, new_bins, changed = shuffle_values(values, bins, pad, torch.Generator().manual_seed(seed))
        assert torch.equal(new_bins, (new_values * 2).long())
        assert torch.equal(new_values[pad], values[pad])  # padding untouched
        for row in range(len(values)):
            keep = ~pad[row]
            assert torch.equal(new_values[row][keep].sort().values, values[row][keep].sort().values)
        moved = ((new_values != values) & ~pad).any(dim=1)
        assert changed.tolist() == [True, True, False, False, False, True]
        assert torch.equal(moved, changed)
        assert (new_values[0] != values[0]).all()  # distinct values: every gene gets another value


def test_shuffle_is_vectorised_and_seeded():
    _, values, bins, pad = _sentences(rows=200)
    a = shuffle_values(values, bins, pad, torch.Generator().manual_seed(1))
    b = shuffle_values(values, bins, pad, torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert a[2].all()  # every row has >= 2 distinct values here


def test_adversarial_step_raises_the_loss_within_epsilon():
    torch.manual_seed(0)
    enc = GeneTextEncoder(_cfg(), [f"G{i}" for i in range(20)]).eval()
    ids, values, bins, pad = _sentences()
    img = F.normalize(torch.randn(len(ids), 8), dim=1)
    tokens = enc.token_embeddings(ids, values, bins)

    def loss_of(t: torch.Tensor) -> torch.Tensor:
        return info_nce(img, enc.project(enc.encode_from_tokens(t, pad)), 10.0)

    clean = loss_of(tokens).item()
    rms = tokens[~pad].square().mean().sqrt()
    for steps in (1, 3):
        delta = adversarial_delta(tokens, pad, loss_of, epsilon=0.05, steps=steps)
        assert not delta.requires_grad
        assert delta.abs().max() <= 0.05 * rms + 1e-6
        assert delta[pad].abs().max() == 0  # padding is never perturbed
        assert loss_of(tokens + delta).item() > clean
    # FGSM moves every non-pad coordinate by the full radius
    delta = adversarial_delta(tokens, pad, loss_of, epsilon=0.05, steps=1)
    nonzero = delta[~pad].abs()
    torch.testing.assert_close(nonzero[nonzero > 0], torch.full_like(nonzero[nonzero > 0], (0.05 * rms).item()))
    assert all(p.grad is None for p in enc.parameters())  # the search trains nothing


def test_adversarial_step_works_under_no_grad():
    enc = GeneTextEncoder(_cfg(), [f"G{i}" for i in range(20)]).eval()
    ids, values, bins, pad = _sentences()
    img = F.normalize(torch.randn(len(ids), 8), dim=1)
    with torch.no_grad():
        tokens = enc.token_embeddings(ids, values, bins)
        delta = adversarial_delta(
            tokens,
            pad,
            lambda t: info_nce(img, enc.project(enc.encode_from_tokens(t, pad)), 10.0),
            epsilon=0.05,
            steps=1,
        )
    assert delta.abs().max() > 0


def test_discriminator_learns_true_versus_shuffled_pairs():
    torch.manual_seed(0)
    enc = GeneTextEncoder(_cfg(), [f"G{i}" for i in range(20)])
    disc = PairDiscriminator(16)
    ids, values, bins, pad = _sentences(rows=16)
    shuffled_values, shuffled_bins, changed = shuffle_values(values, bins, pad, torch.Generator().manual_seed(0))
    opt = torch.optim.Adam([*enc.parameters(), *disc.parameters()], lr=3e-3)
    losses = []
    for _ in range(30):
        true_rep = enc.encode_from_tokens(enc.token_embeddings(ids, values, bins), pad)
        fake_rep = enc.encode_from_tokens(enc.token_embeddings(ids, shuffled_values, shuffled_bins), pad)
        loss = disc.loss(true_rep, fake_rep, changed)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert disc.loss(true_rep, fake_rep, torch.zeros_like(changed)).item() == 0.0  # no valid pair: no loss

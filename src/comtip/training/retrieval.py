"""Image -> gene-sentence retrieval: does a spot's image embedding find its own sentence?

The direct check that contrastive pretraining aligned the two encoders: among ``N`` candidate
sentences, the matching one should rank in the top ``k`` far more often than chance (``k / N``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from comtip._core.memory import release_freed_memory
from comtip.model import preprocess_images
from comtip.training.data import SENTENCE_KEYS, TORCH_DTYPES, SpotData

log = logging.getLogger(__name__)


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda")


@torch.no_grad()
def embed(
    model: torch.nn.Module,
    images_uint8: np.ndarray,
    sentences: Mapping[str, np.ndarray],
    image_size: int,
    *,
    batch: int = 256,
    bf16: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised (N, D) image and sentence embeddings (float32, on CPU), model in eval mode."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    images, texts = [], []
    try:
        for lo in range(0, len(images_uint8), batch):
            chunk = torch.from_numpy(np.array(images_uint8[lo : lo + batch])).to(device)
            tokens = {
                k: torch.from_numpy(np.asarray(sentences[k][lo : lo + batch])).to(device, TORCH_DTYPES[k])
                for k in SENTENCE_KEYS
            }
            with _autocast(device, bf16):
                images.append(
                    model.encode_image(preprocess_images(chunk, image_size, model.cfg.image_mean, model.cfg.image_std))
                    .float()
                    .cpu()
                )
                texts.append(
                    model.encode_sentences(tokens["gene_ids"], tokens["values"], tokens["bins"], tokens["pad"])
                    .float()
                    .cpu()
                )
    finally:
        model.train(was_training)
    return torch.cat(images), torch.cat(texts)


def retrieval_accuracy(
    model: torch.nn.Module,
    images_uint8: np.ndarray,
    sentences: Mapping[str, np.ndarray],
    image_size: int,
    k: Sequence[int] = (1, 5),
    batch: int = 256,
    *,
    bf16: bool = False,
) -> dict[str, float]:
    """Image -> sentence top-k accuracy over ``N`` spots, with the chance level of each k.

    Returns ``{"n": N, "top1": ..., "chance_top1": 1/N, "top5": ..., "chance_top5": 5/N}``.
    """
    image_emb, text_emb = embed(model, images_uint8, sentences, image_size, batch=batch, bf16=bf16)
    return accuracy_from_embeddings(image_emb, text_emb, k, batch)


def accuracy_from_embeddings(
    image_emb: torch.Tensor, text_emb: torch.Tensor, k: Sequence[int] = (1, 5), batch: int = 256
) -> dict[str, float]:
    """Top-k accuracy of paired rows (row i of each is spot i), as :func:`retrieval_accuracy`,
    plus ``median_rank`` of the true sentence (0 = first) and its chance level ``(N - 1) / 2``.

    The rank of the true sentence counts the candidates scoring strictly higher, so ties do not
    help; similarities are computed in blocks of ``batch`` images (memory O(batch × N)). The
    median rank uses every spot, not only the few in the top k, so it is the steadier of the
    measures when exact matches are rare (spots whose expression differs mostly by counting noise).
    """
    n = len(image_emb)
    ranks = []
    for lo in range(0, n, batch):
        sims = image_emb[lo : lo + batch] @ text_emb.T
        true = sims[torch.arange(len(sims)), torch.arange(lo, lo + len(sims))]
        ranks.append((sims > true[:, None]).sum(dim=1))
    rank = torch.cat(ranks)
    out: dict[str, float] = {
        "n": float(n),
        "median_rank": float(np.median(rank.numpy())) if n else float("nan"),
        "chance_median_rank": (n - 1) / 2,
    }
    for kk in k:
        out[f"top{kk}"] = float((rank < kk).float().mean())
        out[f"chance_top{kk}"] = min(1.0, kk / n)
    return out


def retrieval_table(results: Mapping[str, Mapping[str, float]], k: Sequence[int]) -> pd.DataFrame:
    """Long table: one row per (set of spots, k) with accuracy and chance; the set's median rank
    of the true sentence and its chance level are repeated on each of its rows."""
    rows = [
        {
            "spots": name,
            "n_spots": int(r["n"]),
            "k": kk,
            "accuracy": r[f"top{kk}"],
            "chance": r[f"chance_top{kk}"],
            "fold_over_chance": r[f"top{kk}"] / r[f"chance_top{kk}"],
            "median_rank": r["median_rank"],
            "chance_median_rank": r["chance_median_rank"],
        }
        for name, r in results.items()
        for kk in k
    ]
    return pd.DataFrame(rows)


RETRIEVAL_K = (1, 5)


def spot_retrieval(
    model: torch.nn.Module,
    data: SpotData,
    *,
    seed: int,
    max_spots: int,
    image_size: int,
    bf16: bool = False,
    k: Sequence[int] = RETRIEVAL_K,
    max_pool: int = 20000,
) -> pd.DataFrame:
    """Image -> sentence retrieval on up to ``max_spots`` seeded spots per sample of ``data``
    (candidates: the spots of that sample) and on all of them together (``all``: embedded once;
    a seeded subset of at most ``max_pool`` of them when there are more, since every image is
    scored against every sentence of the pool — 200 slides × 1,000 spots would be 4·10¹⁰
    scores)."""
    rng = np.random.default_rng(seed)
    chosen = []
    for index in range(len(data.samples)):
        spots = np.flatnonzero(data.sample_of == index)
        if len(spots) > max_spots:
            spots = np.sort(rng.choice(spots, max_spots, replace=False))
        chosen.append(spots)
    # which of the chosen spots enter the pooled check, decided before embedding anything, so
    # that only those embeddings are kept (at most max_pool rows, whatever the cohort's size)
    total = sum(len(spots) for spots in chosen)
    in_pool = np.ones(total, dtype=bool)
    if total > max_pool:
        in_pool[:] = False
        in_pool[rng.choice(total, max_pool, replace=False)] = True
    results, image_embs, text_embs = {}, [], []
    start = 0
    for files, spots in zip(data.samples, chosen, strict=True):
        # one sample's patches in memory at a time (at most max_spots of them)
        image_emb, text_emb = embed(
            model, data.images(spots), data.sentence_arrays(spots, SENTENCE_KEYS), image_size, bf16=bf16
        )
        results[files.name] = accuracy_from_embeddings(image_emb, text_emb, k)
        keep = torch.from_numpy(in_pool[start : start + len(spots)])
        start += len(spots)
        image_embs.append(image_emb[keep].clone())
        text_embs.append(text_emb[keep].clone())
        del image_emb, text_emb
        release_freed_memory()  # else the heap grows with each sample's freed patches (glibc)
    if len(data.samples) > 1:
        results["all"] = accuracy_from_embeddings(torch.cat(image_embs), torch.cat(text_embs), k)
    table = retrieval_table(results, k)
    for row in table.itertuples():
        log.info(
            "retrieval on %s (%d spots): top-%d %.3f (chance %.4f)",
            row.spots,
            row.n_spots,
            row.k,
            row.accuracy,
            row.chance,
        )
    return table


def blocked_infonce(image_emb: torch.Tensor, text_emb: torch.Tensor, scale: float, batch: int = 1024) -> float:
    """Symmetric InfoNCE of paired rows at logit ``scale``, the mean of the image → text and text →
    image cross-entropies, computed in blocks of ``batch`` rows (memory O(batch × N), never the
    N × N logits)."""
    true = scale * (image_emb * text_emb).sum(dim=1)

    def mean_lse(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        parts = [
            torch.logsumexp(scale * queries[lo : lo + batch] @ keys.T, dim=1) for lo in range(0, len(queries), batch)
        ]
        return (torch.cat(parts) - true).mean()

    return float(0.5 * (mean_lse(image_emb, text_emb) + mean_lse(text_emb, image_emb)))


def heldout_alignment(
    model: torch.nn.Module, data: SpotData, spots: np.ndarray, image_size: int, *, bf16: bool = False
) -> dict[str, float]:
    """How well the encoders align on spots pretraining never saw (the validation slides).

    The ``spots`` of ``data`` (all of them candidates for each other, pooled over the slides) are
    embedded in eval mode; reported: the symmetric InfoNCE at the model's current logit scale
    (``val_infonce``; its chance value, uniform scores, is ln N: ``val_chance_infonce``) and the
    median rank of each image's own sentence (``val_median_rank``; chance (N − 1) / 2). No
    distributed collective and no random draw: it runs on the main process only and leaves every
    random stream of training untouched.
    """
    image_emb, text_emb = embed(
        model, data.images(spots), data.sentence_arrays(spots, SENTENCE_KEYS), image_size, bf16=bf16
    )
    infonce = blocked_infonce(image_emb, text_emb, float(model.scale().detach()))
    ranks = accuracy_from_embeddings(image_emb, text_emb, k=())
    return {
        "val_infonce": infonce,
        "val_chance_infonce": float(np.log(len(spots))),
        "val_median_rank": ranks["median_rank"],
        "val_chance_median_rank": ranks["chance_median_rank"],
    }


class HeldoutMonitor:
    """:func:`heldout_alignment` on a fixed, seeded set of up to ``max_spots`` spots per
    validation slide (the same spots every epoch, so the curve shows the model, not the draw), at
    most ``max_pool`` of them in all (a seeded subset: every image is scored against every
    sentence)."""

    def __init__(
        self, data: SpotData | None, *, seed: int, max_spots: int, image_size: int, bf16: bool, max_pool: int = 20000
    ):
        self.data, self.image_size, self.bf16 = data, image_size, bf16
        self.spots = np.zeros(0, np.int64)
        if data is not None:
            rng = np.random.default_rng(seed)
            picked = []
            for index in range(len(data.samples)):
                spots = np.flatnonzero(data.sample_of == index)
                picked.append(np.sort(rng.choice(spots, max_spots, replace=False)) if len(spots) > max_spots else spots)
            self.spots = np.concatenate(picked)
            if len(self.spots) > max_pool:
                self.spots = np.sort(rng.choice(self.spots, max_pool, replace=False))

    def __bool__(self) -> bool:
        return self.data is not None

    def measure(self, model: torch.nn.Module) -> dict[str, float]:
        assert self.data is not None
        return heldout_alignment(model, self.data, self.spots, self.image_size, bf16=self.bf16)

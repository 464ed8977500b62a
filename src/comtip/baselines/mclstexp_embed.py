"""Embeddings of a trained mclSTExp (rule ``embed_mclstexp``), in the keys the prediction methods read.

``results/embeddings/mclstexp/{sample}.npz`` as ``embed_bleep`` writes it: per spot of the sample
in ``gene_sentences.npz`` order, ``features`` (pooled backbone features), ``image_embeddings``
(the image projection) and ``sentence_embeddings`` (the spot encoder's embeddings: expression +
array position through the spot Transformer, then the projection). The spot encoder sees its
batch: here, as in mclSTExp's ``evel_her2st.py`` (an unshuffled loader of batch 32), the
sample's spots in file order, in consecutive batches of ``mclstexp.embed_batch_size`` (the last
one shorter; mclSTExp's loader runs over all slides concatenated, so its batches may straddle two
slides, ours never do). The image side sees one spot at a time, so test queries do not depend on batching.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from comtip._core.atomic import atomic_path
from comtip._core.errors import PipelineInputError
from comtip._core.npzmap import open_npz
from comtip.baselines.bleep_train import EXPRESSION_KEY, FORMAT_VERSION
from comtip.baselines.mclstexp_config import MclstexpConfig
from comtip.baselines.mclstexp_model import MclSTExp
from comtip.baselines.mclstexp_train import KIND, read_array_positions
from comtip.model.config import ModelConfig
from comtip.model.vision import preprocess_images

log = logging.getLogger(__name__)


def load_mclstexp(path: str | Path) -> tuple[MclSTExp, dict]:
    """The trained mclSTExp of ``path`` in eval mode, and the rest of the file (``info``)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("kind") != KIND or state.get("format_version") != FORMAT_VERSION:
        raise PipelineInputError(
            f"not an mclSTExp checkpoint of format {FORMAT_VERSION} (kind {state.get('kind')!r}, "
            f"format {state.get('format_version')!r}); rerun train_mclstexp",
            path=path,
        )
    cfg = MclstexpConfig.from_dict({**state["mclstexp_config"], "pretrained_weights": None})
    model_cfg = ModelConfig.from_dict(state["backbone"] or {})
    model = MclSTExp(cfg, model_cfg, len(state["panel_genes"]), int(state["image_size"]))
    model.load_state_dict(state.pop("model_state"))
    model.image_mean, model.image_std = tuple(state["image_mean"]), tuple(state["image_std"])
    return model.eval(), state


def embed_mclstexp_sample(
    checkpoint: str | Path,
    patches_npy: str | Path,
    sentences_npz: str | Path,
    spots_h5ad: str | Path,
    out_npz: str | Path,
    *,
    batch_size: int | None = None,
    device: str = "cpu",
    sample: str | None = None,
) -> None:
    """Features, image and spot embeddings of every spot of one sample (eval mode, no grad);
    ``batch_size`` (the spot encoder's context) defaults to the checkpoint's ``embed_batch_size``."""
    model, info = load_mclstexp(checkpoint)
    model.to(device)
    batch_size = int(batch_size or model.cfg.embed_batch_size)
    patches = np.load(patches_npy, mmap_mode="r")
    if patches.dtype != np.uint8 or patches.ndim != 4 or patches.shape[3] != 3:
        raise PipelineInputError(
            f"expected uint8 patches of shape (N, H, W, 3), found {patches.dtype} {patches.shape}",
            sample=sample,
            path=patches_npy,
        )
    sentences = open_npz(sentences_npz)
    genes = [str(g) for g in sentences["panel_genes"]]
    if genes != list(info["panel_genes"]):
        raise PipelineInputError(
            f"panel genes differ from the {len(info['panel_genes'])} that {Path(checkpoint).absolute()} was "
            "trained on; build the gene sentences and the model from the same gene_panel.tsv",
            sample=sample,
            path=sentences_npz,
        )
    values, barcodes = sentences[EXPRESSION_KEY], np.asarray(sentences["barcodes"])
    if len(values) != len(patches) or len(barcodes) != len(patches):
        raise PipelineInputError(
            f"{len(values)} spots in the gene sentences but {len(patches)} patches in {Path(patches_npy).absolute()}; "
            "rerun extract_patches and build_gene_sentences from the same spots.h5ad",
            sample=sample,
            path=sentences_npz,
        )
    positions = read_array_positions(spots_h5ad, barcodes.astype(str), model.cfg, sample=sample)
    out: dict[str, list[np.ndarray]] = {"features": [], "image_embeddings": [], "sentence_embeddings": []}
    with torch.no_grad():
        for lo in range(0, len(patches), batch_size):
            chunk = torch.from_numpy(np.array(patches[lo : lo + batch_size])).to(device)
            images = preprocess_images(chunk, model.image_size, model.image_mean, model.image_std)
            features = model.features(images)
            expression = torch.from_numpy(np.array(values[lo : lo + batch_size], dtype=np.float32)).to(device)
            where = torch.from_numpy(positions[lo : lo + batch_size]).to(device)
            out["features"].append(features.float().cpu().numpy())
            out["image_embeddings"].append(model.image_projection(features).float().cpu().numpy())
            out["sentence_embeddings"].append(model.encode_expression(expression, where).float().cpu().numpy())
    if not out["features"]:
        raise PipelineInputError("no spot to embed", sample=sample, path=patches_npy)
    with atomic_path(out_npz) as tmp, open(tmp, "wb") as fh:
        np.savez(
            fh,
            barcodes=barcodes,
            **{key: np.concatenate(parts).astype(np.float32) for key, parts in out.items()},
        )
    log.info(
        "[%s] mclSTExp embeddings of %d spots (%s, spot context: batches of %d)",
        sample,
        len(patches),
        info["mclstexp_config"]["image_encoder"],
        batch_size,
    )

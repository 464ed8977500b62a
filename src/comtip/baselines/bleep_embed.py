"""Embeddings of a trained BLEEP (rule ``embed_bleep``), in the keys the prediction methods read.

``results/embeddings/bleep/{sample}.npz`` holds, per spot of the sample in ``gene_sentences.npz``
order: ``features`` (the pooled backbone features), ``image_embeddings`` (the image projection)
and ``sentence_embeddings`` (the expression projection of the spot's panel values: BLEEP's
expression embedding, stored under the key the retrieval methods read for CoMTIP's sentence
embeddings). All un-normalised, as BLEEP's heads output them; retrieval L2-normalises both sides.
So ``training_embeddings`` stacks the training samples' as it does CoMTIP's, and ``bleep``
predicts with the same blocked top-k retrieval (``comtip.predict.neighbours``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from comtip._core.atomic import atomic_path
from comtip._core.errors import PipelineInputError
from comtip._core.npzmap import open_npz
from comtip.baselines.bleep_config import BleepConfig
from comtip.baselines.bleep_model import BLEEP
from comtip.baselines.bleep_train import EXPRESSION_KEY, FORMAT_VERSION, KIND
from comtip.model.config import ModelConfig
from comtip.model.vision import preprocess_images

log = logging.getLogger(__name__)


def load_bleep(path: str | Path) -> tuple[BLEEP, dict]:
    """The trained BLEEP of ``path`` in eval mode, and the rest of the file (``info``)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("kind") != KIND or state.get("format_version") != FORMAT_VERSION:
        raise PipelineInputError(
            f"not a BLEEP checkpoint of format {FORMAT_VERSION} (kind {state.get('kind')!r}, "
            f"format {state.get('format_version')!r}); rerun train_bleep",
            path=path,
        )
    cfg = BleepConfig.from_dict({**state["bleep_config"], "pretrained_weights": None})
    backbone = state["backbone"] or {}
    model_cfg = ModelConfig.from_dict(backbone)
    model = BLEEP(cfg, model_cfg, len(state["panel_genes"]), int(state["image_size"]))
    model.load_state_dict(state.pop("model_state"))
    model.image_mean, model.image_std = tuple(state["image_mean"]), tuple(state["image_std"])
    return model.eval(), state


def embed_bleep_sample(
    checkpoint: str | Path,
    patches_npy: str | Path,
    sentences_npz: str | Path,
    out_npz: str | Path,
    *,
    batch_size: int = 128,
    device: str = "cpu",
    sample: str | None = None,
) -> None:
    """Features, image and expression embeddings of every spot of one sample (eval mode, no grad)."""
    model, info = load_bleep(checkpoint)
    model.to(device)
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
    values = sentences[EXPRESSION_KEY]
    if len(values) != len(patches) or len(sentences["barcodes"]) != len(patches):
        raise PipelineInputError(
            f"{len(values)} spots in the gene sentences but {len(patches)} patches in {Path(patches_npy).absolute()}; "
            "rerun extract_patches and build_gene_sentences from the same spots.h5ad",
            sample=sample,
            path=sentences_npz,
        )
    out: dict[str, list[np.ndarray]] = {"features": [], "image_embeddings": [], "sentence_embeddings": []}
    with torch.no_grad():
        for lo in range(0, len(patches), batch_size):
            chunk = torch.from_numpy(np.array(patches[lo : lo + batch_size])).to(device)
            images = preprocess_images(chunk, model.image_size, model.image_mean, model.image_std)
            features = model.features(images)
            expression = torch.from_numpy(np.array(values[lo : lo + batch_size], dtype=np.float32)).to(device)
            out["features"].append(features.float().cpu().numpy())
            out["image_embeddings"].append(model.image_projection(features).float().cpu().numpy())
            out["sentence_embeddings"].append(model.encode_expression(expression).float().cpu().numpy())
    if not out["features"]:
        raise PipelineInputError("no spot to embed", sample=sample, path=patches_npy)
    with atomic_path(out_npz) as tmp, open(tmp, "wb") as fh:
        np.savez(
            fh,
            barcodes=np.asarray(sentences["barcodes"]),
            **{key: np.concatenate(parts).astype(np.float32) for key, parts in out.items()},
        )
    log.info("[%s] BLEEP embeddings of %d spots (%s)", sample, len(patches), info["bleep_config"]["image_encoder"])

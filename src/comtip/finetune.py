"""Supervised expression prediction on top of the pretrained CoMTIP image encoder.

The pretrained ViT turns a spot patch into a pooled feature (the class-token feature before the
projection to the contrastive space: the projection was shaped for matching sentences, the
feature before it keeps more of the image); a linear head maps it to the normalised expression
(log1p CP10k, ``panel_values`` of gene_sentences.npz) of every panel gene, held-out genes
included, with an MSE loss. Two modes (``docs/prediction.md``):

* ``linear`` — linear probe: the encoder is frozen, so features are computed once per patch and
  only the head trains (seconds on CPU; measures what pretraining put into the features).
* ``full`` — encoder and head train together, the encoder with a lower learning rate so the
  pretrained features are adjusted rather than overwritten, with flips / 90° rotations.

Splits are by slide: early stopping watches the MSE on the validation samples and keeps the best
epoch's weights; with no validation sample the run trains the fixed number of epochs and says so.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import timm
import torch
import torch.nn.functional as F
from torch import nn

from comtip.atomic import atomic_paths
from comtip.errors import ConfigError, PipelineInputError
from comtip.finetune_config import DEVICES, MODES, FinetuneConfig  # noqa: F401 (re-exported)
from comtip.model import ModelConfig, preprocess_images
from comtip.provenance import file_sha256
from comtip.training import derive_seed, load_pretrained
from comtip.training.augment import flip_and_rotate
from comtip.training.checkpoint import plain, save_torch
from comtip.training.loop import deterministic_on_cpu

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHECKPOINT_KIND = "comtip_finetune"
METRIC_COLUMNS = ("epoch", "train_loss", "val_loss", "lr", "encoder_lr")
# Random streams of fine-tuning (see comtip.training.config.derive_seed); distinct from
# pretraining's 0-4 so that the same config seed never replays pretraining's draws.
STREAM_FT_ORDER = 10
STREAM_FT_AUGMENT = 11
STREAM_FT_MODEL = 12
# Features are standardised with the training features' std; this floor keeps a constant
# feature (dead unit) from being divided by zero.
MIN_FEATURE_STD = 1e-6




def resolve_device(device: str) -> torch.device:
    """``auto`` = CUDA when torch sees a GPU; ``cuda`` without one is an error, not a CPU run."""
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("finetune.device is 'cuda' but torch sees no CUDA device")
    return torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")


# -- model -------------------------------------------------------------------------------------


class ExpressionHead(nn.Module):
    """Standardise the pooled feature (fixed training statistics), then one linear layer.

    Standardising makes one learning rate fit any backbone's feature scale. The layer starts at
    zero weights and the training mean as bias: epoch 0 predicts the mean, the baseline the head
    has to beat.
    """

    def __init__(self, feature_mean: torch.Tensor, feature_std: torch.Tensor, target_mean: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("feature_mean", feature_mean.clone().float())
        self.register_buffer("feature_std", feature_std.clone().float().clamp(min=MIN_FEATURE_STD))
        self.linear = nn.Linear(feature_mean.shape[0], target_mean.shape[0])
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.bias.copy_(target_mean.float())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear((features - self.feature_mean) / self.feature_std)


def pooled_features(vit: nn.Module, images: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 (B, H, W, 3) → (B, C) pooled ViT features before CoMTIP's projection (the same
    computation as ``VisionEncoder.embed`` up to the projection, through timm's public API)."""
    return vit.forward_head(vit.forward_features(preprocess_images(images, image_size)), pre_logits=True)


def build_vit(model_config: dict[str, Any]) -> nn.Module:
    """The pretrained model's ViT architecture, uninitialised weights (a checkpoint fills them):
    built without ``pretrained_weights``, which may name a file absent where predictions run."""
    cfg = ModelConfig.from_dict(model_config)
    return timm.create_model(cfg.vision_model, pretrained=False, img_size=cfg.image_size, num_classes=0,
                             **cfg.vision_kwargs)


# -- data ----------------------------------------------------------------------------------------


@dataclass
class ExpressionData:
    """Spots of several samples: memory-mapped patches, in-memory targets, one global index."""

    patches: list[np.ndarray]  # per sample, uint8 (N_k, H, W, 3), memory-mapped
    targets: np.ndarray  # (N, P) float32, all samples concatenated
    sample_of: np.ndarray  # (N,) sample index
    row_of: np.ndarray  # (N,) row within the sample
    genes: list[str]

    def __len__(self) -> int:
        return len(self.targets)

    def images(self, indices: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W, 3) patches of the global ``indices``, in that order."""
        shape = self.patches[0].shape[1:]
        out = np.empty((len(indices), *shape), np.uint8)
        owners = self.sample_of[indices]
        for k in np.unique(owners):
            where = np.flatnonzero(owners == k)
            rows = self.row_of[indices[where]]
            order = np.argsort(rows, kind="stable")  # ascending rows: sequential reads of the mmap
            out[where[order]] = self.patches[int(k)][rows[order]]
        return out


def load_samples(pairs: Sequence[tuple[str | Path, str | Path]],
                 genes: list[str] | None = None) -> ExpressionData | None:
    """Patches and ``panel_values`` of (patches_npy, sentences_npz) pairs; None for no pair.

    Rows must be aligned (both files are in spots.h5ad order by construction, so the counts are
    checked); every sample must have the same panel (``genes`` when given) and patch shape.
    """
    if not pairs:
        return None
    patches, targets, sample_of, rows = [], [], [], []
    reference = "the training samples"
    for k, (patches_npy, sentences_npz) in enumerate(pairs):
        images = np.load(patches_npy, mmap_mode="r")
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
            raise PipelineInputError(f"expected uint8 patches of shape (N, H, W, 3), found {images.dtype} "
                                     f"{images.shape}", path=patches_npy)
        with np.load(sentences_npz) as npz:
            values = npz["panel_values"].astype(np.float32)
            panel = [str(g) for g in npz["panel_genes"]]
        if genes is None:
            genes, reference = panel, str(Path(sentences_npz).absolute())
        elif panel != genes:
            raise PipelineInputError(f"panel genes differ from those of {reference}; build every sample's gene "
                                     "sentences from the same gene_panel.tsv", path=sentences_npz)
        if len(values) != len(images):
            raise PipelineInputError(f"{len(values)} spots but {patches_npy} holds {len(images)} patches; "
                                     "rebuild both from the same spots.h5ad", path=sentences_npz)
        if patches and images.shape[1:] != patches[0].shape[1:]:
            raise PipelineInputError(f"patches of {images.shape[1:]} differ from {pairs[0][0]}'s "
                                     f"{patches[0].shape[1:]}", path=patches_npy)
        patches.append(images)
        targets.append(values)
        sample_of.append(np.full(len(values), k, np.int32))
        rows.append(np.arange(len(values)))
    return ExpressionData(patches, np.concatenate(targets), np.concatenate(sample_of), np.concatenate(rows),
                          list(genes))


def _batches(n: int, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, n, batch_size):
        yield np.arange(start, min(n, start + batch_size))


@torch.no_grad()
def extract_features(vit: nn.Module, data: ExpressionData, image_size: int, batch_size: int,
                     device: torch.device) -> torch.Tensor:
    """Pooled features of every spot (eval mode, no augmentation), (N, C) float32 on ``device``."""
    vit.eval()
    parts = [pooled_features(vit, torch.from_numpy(data.images(idx)).to(device), image_size).float()
             for idx in _batches(len(data), batch_size)]
    return torch.cat(parts)


# -- training ------------------------------------------------------------------------------------


def _param_groups(module: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups as in pretraining: no weight decay on parameters with fewer than 2 dimensions
    (biases, norms) — decaying the head's bias would pull it away from the target mean."""
    params = list(module.parameters())
    return [{"params": [p for p in params if p.ndim >= 2], "lr": lr, "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "lr": lr, "weight_decay": 0.0}]


class _Run:
    """One fine-tuning run: the modules, the optimiser and one epoch of each mode."""

    def __init__(self, vit: nn.Module, head: ExpressionHead, cfg: FinetuneConfig, image_size: int,
                 device: torch.device, train: ExpressionData, val: ExpressionData | None,
                 train_features: torch.Tensor) -> None:
        self.vit, self.head, self.cfg, self.image_size, self.device = vit, head, cfg, image_size, device
        self.train, self.val = train, val
        self.train_features = train_features
        self.train_targets = torch.from_numpy(train.targets).to(device)
        self.encoder_lr = cfg.encoder_lr if cfg.mode == "full" else 0.0
        groups = _param_groups(head, cfg.lr, cfg.weight_decay)
        if cfg.mode == "full":
            groups += _param_groups(vit, cfg.encoder_lr, cfg.weight_decay)
        else:
            vit.requires_grad_(False)
            self.val_features = (extract_features(vit, val, image_size, cfg.batch_size, device)
                                 if val is not None else None)
        self.optimizer = torch.optim.AdamW(groups)

    def train_epoch(self, epoch: int) -> float:
        """One pass over the training spots in a seeded order; mean training MSE."""
        cfg = self.cfg
        order = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(
            derive_seed(cfg.seed, STREAM_FT_ORDER, epoch))).numpy()
        torch.manual_seed(derive_seed(cfg.seed, STREAM_FT_MODEL, epoch))  # dropout / drop-path, if any
        augment = torch.Generator(self.device).manual_seed(derive_seed(cfg.seed, STREAM_FT_AUGMENT, epoch))
        self.head.train()
        self.vit.train(cfg.mode == "full")
        total = 0.0
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            targets = self.train_targets[torch.from_numpy(idx).to(self.device)]
            if cfg.mode == "linear":
                features = self.train_features[torch.from_numpy(idx).to(self.device)]
            else:
                images = torch.from_numpy(self.train.images(idx)).to(self.device)
                if cfg.augment:
                    images = flip_and_rotate(images, flip=True, rot90=True, generator=augment)
                features = pooled_features(self.vit, images, self.image_size)
            loss = F.mse_loss(self.head(features), targets)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += float(loss.detach()) * len(idx)
        return total / len(order)

    @torch.no_grad()
    def val_loss(self) -> float:
        """MSE over all validation spots and genes (eval mode, no augmentation)."""
        assert self.val is not None
        self.head.eval()
        targets = torch.from_numpy(self.val.targets).to(self.device)
        if self.cfg.mode == "linear":
            predictions = self.head(self.val_features)
        else:
            predictions = self.head(extract_features(self.vit, self.val, self.image_size, self.cfg.batch_size,
                                                     self.device))
        return float(F.mse_loss(predictions, targets))

    def state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Copies of the trained weights (the encoder only when it trains)."""
        state = {"head": copy.deepcopy(self.head.state_dict())}
        if self.cfg.mode == "full":
            state["encoder"] = copy.deepcopy(self.vit.state_dict())
        return state


def finetune(pretrained_ckpt: str | Path, train: Sequence[tuple[str | Path, str | Path]],
             val: Sequence[tuple[str | Path, str | Path]], out_ckpt: str | Path, out_metrics_tsv: str | Path,
             cfg: FinetuneConfig) -> pd.DataFrame:
    """Train a head (and, in ``full`` mode, the encoder) to predict every panel gene's
    ``panel_values`` from the patch; write the checkpoint and the per-epoch metrics together.

    ``train`` / ``val`` are (spot_patches.npy, gene_sentences.npz) pairs of whole samples.
    Returns the metrics table (columns :data:`METRIC_COLUMNS`; ``val_loss`` NaN without val).
    Bit-identical on CPU for a fixed ``cfg.seed`` (deterministic kernels are enforced).
    """
    cfg.check()
    train_data = load_samples(train)
    if train_data is None:
        raise PipelineInputError("no training sample: fine-tuning needs at least one sample with split = train")
    val_data = load_samples(val, genes=train_data.genes)
    if val_data is not None and val_data.patches[0].shape[1:] != train_data.patches[0].shape[1:]:
        raise PipelineInputError(f"validation patches {val_data.patches[0].shape[1:]} differ from the training "
                                 f"patches {train_data.patches[0].shape[1:]}", path=val[0][0])
    height, width = train_data.patches[0].shape[1:3]
    if cfg.mode == "full" and cfg.augment and height != width:
        raise ConfigError(f"config key 'finetune.augment': 90° rotations need square patches, the patches are "
                          f"{height} x {width} px")
    device = resolve_device(cfg.device)
    model, info = load_pretrained(pretrained_ckpt, map_location=device)
    vit = model.vision.vit.to(device)
    del model  # the text encoder, projection and MFM generator play no part here
    image_size = int(info["model_config"]["image_size"])
    with deterministic_on_cpu(device):
        features = extract_features(vit, train_data, image_size, cfg.batch_size, device)
        target_mean = torch.from_numpy(train_data.targets.mean(0))
        head = ExpressionHead(features.mean(0), features.std(0), target_mean).to(device)
        run = _Run(vit, head, cfg, image_size, device, train_data, val_data, features)
        if val_data is None:
            log.warning("no validation sample: no early stopping, training for the fixed %d epochs", cfg.epochs)
        log.info("fine-tuning (%s) on %d spots of %d samples, validating on %d spots of %d samples; %d genes",
                 cfg.mode, len(train_data), len(train), 0 if val_data is None else len(val_data), len(val),
                 len(train_data.genes))
        rows, best, best_epoch, best_loss = [], None, 0, float("inf")
        for epoch in range(1, cfg.epochs + 1):
            train_loss = run.train_epoch(epoch)
            if not math.isfinite(train_loss):
                raise RuntimeError(f"fine-tuning diverged: training MSE {train_loss} in epoch {epoch}; "
                                   "lower finetune.lr (and finetune.encoder_lr)")
            val_loss = run.val_loss() if val_data is not None else float("nan")
            rows.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "lr": cfg.lr,
                         "encoder_lr": run.encoder_lr})
            log.info("epoch %d: train MSE %.5f, validation MSE %.5f", epoch, train_loss, val_loss)
            if val_data is None:
                continue
            if val_loss < best_loss:
                best, best_epoch, best_loss = run.state(), epoch, val_loss
            elif epoch - best_epoch >= cfg.patience:
                log.info("early stop after epoch %d: no better validation MSE for %d epochs", epoch, cfg.patience)
                break
        if val_data is None:
            best, best_epoch = run.state(), len(rows)
        if best is None:
            raise RuntimeError(f"validation MSE was never finite in {len(rows)} epochs; lower finetune.lr")
    log.info("keeping epoch %d%s", best_epoch, "" if val_data is None else f" (validation MSE {best_loss:.5f})")
    state = {
        "format_version": FORMAT_VERSION,
        "kind": CHECKPOINT_KIND,
        "mode": cfg.mode,
        "finetune_config": plain(cfg.to_dict()),
        "model_config": info["model_config"],
        "pretrained": {"path": str(Path(pretrained_ckpt).absolute()), "sha256": file_sha256(pretrained_ckpt),
                       "step": int(info["step"])},
        "panel_genes": list(train_data.genes),
        "patch_shape": [int(v) for v in train_data.patches[0].shape[1:3]],
        "head_state": best["head"],
        "encoder_state": best.get("encoder"),
        "best_epoch": best_epoch,
        "epochs_run": len(rows),
        "early_stopping": val_data is not None,
        "best_val_loss": None if val_data is None else best_loss,
        "train_samples": [str(Path(p).absolute()) for _, p in train],
        "val_samples": [str(Path(p).absolute()) for _, p in val],
    }
    metrics = pd.DataFrame(rows, columns=list(METRIC_COLUMNS))
    with atomic_paths(out_ckpt, out_metrics_tsv) as (tmp_ckpt, tmp_metrics):
        save_torch(state, tmp_ckpt)
        metrics.to_csv(tmp_metrics, sep="\t", index=False, float_format="%.8g", na_rep="NA")
    return metrics


# -- prediction ----------------------------------------------------------------------------------


class FinetunedPredictor:
    """A fine-tuned model as a callable: uint8 (B, H, W, 3) patches → (B, P) float32 predictions
    (normalised log1p CP10k of ``genes``), usable by :func:`comtip.predict.predict_slide`."""

    def __init__(self, vit: nn.Module, head: ExpressionHead, image_size: int, genes: list[str],
                 device: torch.device) -> None:
        self.vit, self.head, self.image_size = vit.eval(), head.eval(), image_size
        self.genes, self.device = genes, device

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        batch = torch.from_numpy(np.array(images, dtype=np.uint8)).to(self.device)  # a copy: may be a read-only memmap
        return self.head(pooled_features(self.vit, batch, self.image_size)).float().cpu().numpy()


def load_finetuned(ckpt: str | Path, *, pretrained_ckpt: str | Path | None = None,
                   device: str = "auto") -> FinetunedPredictor:
    """Rebuild the predictor of a :func:`finetune` checkpoint.

    A ``full`` checkpoint holds its encoder. A ``linear`` one holds only the head and names the
    pretrained checkpoint whose frozen encoder it was trained on (``pretrained_ckpt`` overrides
    that path, e.g. after moving ``results/``); the file must be byte-identical to the one used
    for training (sha256), because a head on another encoder's features predicts nonsense.
    """
    where = resolve_device(device)
    state = torch.load(ckpt, map_location=where, weights_only=True)
    if state.get("kind") != CHECKPOINT_KIND or state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{Path(ckpt).absolute()}: not a fine-tuning checkpoint of format {FORMAT_VERSION} "
                         f"(kind {state.get('kind')!r}, format_version {state.get('format_version')!r})")
    if state["encoder_state"] is not None:
        vit = build_vit(state["model_config"])
        vit.load_state_dict(state["encoder_state"])
    else:
        source = Path(pretrained_ckpt if pretrained_ckpt is not None else state["pretrained"]["path"])
        if not source.is_file():
            raise FileNotFoundError(f"{Path(ckpt).absolute()} is a linear probe on the encoder of {source}, which "
                                    "does not exist; pass pretrained_ckpt")
        if file_sha256(source) != state["pretrained"]["sha256"]:
            raise ValueError(f"{source.absolute()} is not the pretrained checkpoint the linear probe "
                             f"{Path(ckpt).absolute()} was trained on (sha256 differs); fine-tune again")
        vit = load_pretrained(source, map_location=where)[0].vision.vit
    head_state = state["head_state"]
    head = ExpressionHead(head_state["feature_mean"], head_state["feature_std"], head_state["linear.bias"])
    head.load_state_dict(head_state)
    return FinetunedPredictor(vit.to(where), head.to(where), int(state["model_config"]["image_size"]),
                              list(state["panel_genes"]), where)


def predict_images(predictor: Callable[[np.ndarray], np.ndarray], images: np.ndarray, batch_size: int) -> np.ndarray:
    """Run ``predictor`` over a (possibly memory-mapped) uint8 (N, H, W, 3) array in batches."""
    return np.concatenate([np.asarray(predictor(np.asarray(images[start:start + batch_size])), np.float32)
                           for start in range(0, len(images), batch_size)])


def predict_finetuned(ckpt: str | Path, patches_npy: str | Path, *, batch_size: int = 64,
                      pretrained_ckpt: str | Path | None = None, device: str = "auto") -> np.ndarray:
    """(N, P) predictions of the fine-tuned model for every patch of ``patches_npy`` (row order
    kept), P = the checkpoint's panel genes; patches are read in batches from the memory map."""
    predictor = load_finetuned(ckpt, pretrained_ckpt=pretrained_ckpt, device=device)
    images = np.load(patches_npy, mmap_mode="r")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise PipelineInputError(f"expected uint8 patches of shape (N, H, W, 3), found {images.dtype} {images.shape}",
                                 path=patches_npy)
    with deterministic_on_cpu(predictor.device):
        return predict_images(predictor, images, batch_size)

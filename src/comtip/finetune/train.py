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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from comtip._core.atomic import atomic_paths
from comtip._core.devices import deterministic_on_cpu, resolve_device
from comtip._core.errors import ConfigError, PipelineInputError
from comtip._core.provenance import file_sha256
from comtip._core.seeds import derive_seed
from comtip.finetune.config import FinetuneConfig
from comtip.finetune.data import ExpressionData, extract_features, load_samples
from comtip.finetune.head import CHECKPOINT_KIND, FORMAT_VERSION, ExpressionHead, pooled_features
from comtip.training.checkpoint import load_pretrained, plain, save_torch
from comtip.training.image_augment import flip_and_rotate
from comtip.training.optimizer import decay_groups

log = logging.getLogger(__name__)

METRIC_COLUMNS = ("epoch", "train_loss", "val_loss", "lr", "encoder_lr")
# Random streams of fine-tuning (see comtip._core.seeds.derive_seed); distinct from
# pretraining's 0-4 so that the same config seed never replays pretraining's draws.
STREAM_FT_ORDER = 10
STREAM_FT_AUGMENT = 11
STREAM_FT_MODEL = 12


def _param_groups(module: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups as in pretraining (:func:`comtip.training.optimizer.decay_groups`): no weight
    decay on biases, norms, tokens and position embeddings — decaying the head's bias would pull
    it away from the target mean."""
    return decay_groups(module, weight_decay, lr=lr)


class _Run:
    """One fine-tuning run: the modules, the optimiser and one epoch of each mode."""

    def __init__(
        self,
        vit: nn.Module,
        head: ExpressionHead,
        cfg: FinetuneConfig,
        image_size: int,
        device: torch.device,
        train: ExpressionData,
        val: ExpressionData | None,
        train_features: torch.Tensor,
    ) -> None:
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
            self.val_features = (
                extract_features(vit, val, image_size, cfg.batch_size, device) if val is not None else None
            )
        self.optimizer = torch.optim.AdamW(groups)

    def train_epoch(self, epoch: int) -> float:
        """One pass over the training spots in a seeded order; mean training MSE."""
        cfg = self.cfg
        order = torch.randperm(
            len(self.train), generator=torch.Generator().manual_seed(derive_seed(cfg.seed, STREAM_FT_ORDER, epoch))
        ).numpy()
        torch.manual_seed(derive_seed(cfg.seed, STREAM_FT_MODEL, epoch))  # dropout / drop-path, if any
        augment = torch.Generator(self.device).manual_seed(derive_seed(cfg.seed, STREAM_FT_AUGMENT, epoch))
        self.head.train()
        self.vit.train(cfg.mode == "full")
        total = 0.0
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
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
            predictions = self.head(
                extract_features(self.vit, self.val, self.image_size, self.cfg.batch_size, self.device)
            )
        return float(F.mse_loss(predictions, targets))

    def state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Copies of the trained weights (the encoder only when it trains)."""
        state = {"head": copy.deepcopy(self.head.state_dict())}
        if self.cfg.mode == "full":
            state["encoder"] = copy.deepcopy(self.vit.state_dict())
        return state


def finetune(
    pretrained_ckpt: str | Path,
    train: Sequence[tuple[str | Path, str | Path]],
    val: Sequence[tuple[str | Path, str | Path]],
    out_ckpt: str | Path,
    out_metrics_tsv: str | Path,
    cfg: FinetuneConfig,
) -> pd.DataFrame:
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
        raise PipelineInputError(
            f"validation patches {val_data.patches[0].shape[1:]} differ from the training "
            f"patches {train_data.patches[0].shape[1:]}",
            path=val[0][0],
        )
    height, width = train_data.patches[0].shape[1:3]
    if cfg.mode == "full" and cfg.augment and height != width:
        raise ConfigError(
            f"config key 'finetune.augment': 90° rotations need square patches, the patches are {height} x {width} px"
        )
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
        log.info(
            "fine-tuning (%s) on %d spots of %d samples, validating on %d spots of %d samples; %d genes; on %s",
            cfg.mode,
            len(train_data),
            len(train),
            0 if val_data is None else len(val_data),
            len(val),
            len(train_data.genes),
            device,
        )
        rows, best, best_epoch, best_loss = [], None, 0, float("inf")
        for epoch in range(1, cfg.epochs + 1):
            train_loss = run.train_epoch(epoch)
            if not math.isfinite(train_loss):
                raise RuntimeError(
                    f"fine-tuning diverged: training MSE {train_loss} in epoch {epoch}; "
                    "lower finetune.lr (and finetune.encoder_lr)"
                )
            val_loss = run.val_loss() if val_data is not None else float("nan")
            rows.append(
                {
                    "epoch": epoch,
                    "train_loss": train_loss,
                    "val_loss": val_loss,
                    "lr": cfg.lr,
                    "encoder_lr": run.encoder_lr,
                }
            )
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
        "pretrained": {
            "path": str(Path(pretrained_ckpt).absolute()),
            "sha256": file_sha256(pretrained_ckpt),
            "step": int(info["step"]),
        },
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

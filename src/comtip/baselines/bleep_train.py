"""BLEEP trained as itself (rule ``train_bleep``), on CoMTIP's pretraining data path and budget.

What is CoMTIP's and reused as is (``comtip.training``): the training spots (``SpotData``: the
training samples' patches and ``gene_sentences.npz``, memory-mapped, the same spots, checked the
same way), the batch order (``BatchPlan``/``MicroBatches``: the same sampler, batch size, drop-last
and number of optimiser steps), the flips and 90° rotations (``augment_images``, here without
colour jitter), the image preprocessing, one process per GPU under DDP, the resume folder and run
definition (``comtip.training.checkpoint``) and the seed streams: everything random in step ``s``
of process ``r`` is drawn from ``(seed, s, r)``, so a resumed run ends with the weights of an
uninterrupted one, bit-identical on CPU.

What is BLEEP's (``comtip.baselines.bleep_model``, ``BleepConfig``): the model, the loss, the
expression vector (every panel gene's ``panel_values``, log1p CP10k), AdamW on every parameter
with a constant learning rate and no gradient clipping.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from comtip._core.atomic import atomic_paths
from comtip._core.devices import deterministic_on_cpu
from comtip._core.errors import ConfigError, PipelineInputError
from comtip._core.seeds import derive_seed
from comtip.baselines.bleep_config import COMTIP_VIT, BleepConfig
from comtip.baselines.bleep_model import BLEEP
from comtip.model.config import ModelConfig
from comtip.model.vision import preprocess_images
from comtip.training import checkpoint as ckpt
from comtip.training.config import STREAM_AUGMENT, STREAM_INIT, STREAM_MODEL, TrainConfig, loader_workers, total_steps
from comtip.training.data import SampleFiles, SpotData, sample_files
from comtip.training.image_augment import augment_images
from comtip.training.metrics import MetricsLog
from comtip.training.processes import Processes, start_processes
from comtip.training.sampling import BatchPlan, MicroBatches

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
KIND = "bleep"
EXPRESSION_KEY = "panel_values"
METRIC_COLUMNS = ("step", "epoch", "loss", "lr", "samples_per_s", "data_wait_fraction")


class BleepSpots(SpotData):
    """CoMTIP's training spots; a batch is their patches and their panel expression vectors."""

    def __init__(self, samples: Sequence[SampleFiles]):
        super().__init__(samples)
        genes = None
        for k, files in enumerate(self.samples):
            panel = np.asarray(self.sentence_file(k)["panel_genes"]).astype(str)
            if genes is None:
                genes = panel
            elif not np.array_equal(panel, genes):
                raise PipelineInputError(
                    f"panel genes differ from those of sample {self.samples[0].name} "
                    f"({self.samples[0].sentences}); build every sample's gene sentences from the same gene_panel.tsv",
                    sample=files.name,
                    path=files.sentences,
                )
            values = self.sentence_file(k)[EXPRESSION_KEY]
            if values.ndim != 2 or values.shape[1] != len(genes):
                raise PipelineInputError(
                    f"{EXPRESSION_KEY} is {values.shape}, not (spots, {len(genes)} panel genes); "
                    "rerun build_gene_sentences",
                    sample=files.name,
                    path=files.sentences,
                )
        self.panel_genes: list[str] = [str(g) for g in genes]

    def __getitem__(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        indices = np.asarray(indices, dtype=np.int64)
        expression = self._gather(EXPRESSION_KEY, indices).astype(np.float32, copy=False)
        return {"images": torch.from_numpy(self.images(indices)), "expression": torch.from_numpy(expression)}


class BleepTrainer:
    """One BLEEP run; ``run()`` trains from scratch or from the resume checkpoint.

    The hooks (``_batch_plan``, ``_build_model``, ``_build_optimizer``, ``_model_inputs``) are what
    another bi-encoder trained on this data path (``mclstexp_train.MclstexpTrainer``) replaces."""

    NAME = "BLEEP"  # in the log
    SECTION = "bleep"  # the config key; the checkpoint's kind and settings key
    KIND = KIND

    def __init__(
        self,
        data: BleepSpots,
        cfg: BleepConfig,
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        procs: Processes,
        folder: Path,
    ):
        self.data, self.cfg, self.model_cfg, self.train_cfg, self.procs, self.folder = (
            data,
            cfg,
            model_cfg,
            train_cfg,
            procs,
            folder,
        )
        self.plan = self._batch_plan()
        data.readahead_block = train_cfg.block_size if train_cfg.sampler == "blocks" else 0
        self.total = total_steps(train_cfg, self.plan.steps_per_epoch)
        self.image_size = cfg.resolved_image_size(model_cfg.image_size)
        self.definition = ckpt.run_definition(
            {self.SECTION: cfg.to_dict(), "backbone": self.backbone(), "image_size": self.image_size},
            train_cfg.to_dict(),
            {**data.fingerprint, "panel_genes": data.panel_genes},
            world_size=procs.world_size,
            device_type=procs.device.type,
        )
        torch.manual_seed(derive_seed(train_cfg.seed, STREAM_INIT))  # the same initial weights on every process
        self.model = self._build_model().to(procs.device)
        if cfg.pretrained_weights is None:
            log.info(
                "%s image encoder %s: no %s.pretrained_weights, random initialisation",
                self.NAME,
                cfg.image_encoder,
                self.SECTION,
            )
        self.optimizer = self._build_optimizer()
        self.step = 0
        state = ckpt.load_resume(folder, self.definition)
        if state is not None:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            ckpt.set_rng_states(state["rng"])
            self.step = int(state["step"])
            log.info("resuming from step %d of %d (%s)", self.step, self.total, folder / ckpt.RESUME_FILE)
        self.saved_at = time.monotonic()
        self.metrics = MetricsLog(folder / "metrics.tsv", self.step, METRIC_COLUMNS) if procs.is_main else None
        self.ddp = (
            DistributedDataParallel(
                self.model, device_ids=[procs.device.index] if procs.device.type == "cuda" else None
            )
            if procs.world_size > 1
            else None
        )

    def _batch_plan(self) -> BatchPlan:
        return BatchPlan.for_run(self.train_cfg, self.data.sample_sizes, self.procs.world_size)

    def _build_model(self) -> torch.nn.Module:
        return BLEEP(self.cfg, self.model_cfg, len(self.data.panel_genes), self.image_size)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        # BLEEP_main.py: AdamW(model.parameters()), every parameter decayed, no scheduler
        return torch.optim.AdamW(self.model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def _model_inputs(self, raw: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """What the model takes besides the images: BLEEP's expression vectors."""
        return (raw["expression"].to(self.procs.device, non_blocking=True),)

    def backbone(self) -> dict | None:
        """The CoMTIP backbone's architecture when ``comtip_vit`` borrows it (else None)."""
        if self.cfg.image_encoder != COMTIP_VIT:
            return None
        return {"vision_model": self.model_cfg.vision_model, "vision_kwargs": dict(self.model_cfg.vision_kwargs)}

    def _train_step(self, batches: Iterator[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, float]:
        """Forward/backward over ``grad_accum`` micro-batches and one AdamW step: (loss, data wait s)."""
        cfg, device = self.train_cfg, self.procs.device
        torch.manual_seed(derive_seed(cfg.seed, STREAM_MODEL, self.step, self.procs.rank))  # dropout
        generator = torch.Generator(device).manual_seed(
            derive_seed(cfg.seed, STREAM_AUGMENT, self.step, self.procs.rank)
        )
        module = self.ddp if self.ddp is not None else self.model
        total, wait = torch.zeros((), device=device), 0.0
        for micro in range(cfg.grad_accum):
            started = time.perf_counter()
            raw = next(batches)
            wait += time.perf_counter() - started
            images = augment_images(
                raw["images"].to(device, non_blocking=True),
                flip=cfg.flip,
                rot90=cfg.rot90,
                jitter=cfg.color_jitter,  # BLEEP: 0 (BleepConfig.train_config)
                generator=generator,
            )
            images = preprocess_images(images, self.image_size, self.model.image_mean, self.model.image_std)
            inputs = self._model_inputs(raw)
            last = micro == cfg.grad_accum - 1
            with contextlib.nullcontext() if self.ddp is None or last else self.ddp.no_sync():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16 and device.type == "cuda"):
                    loss = module(images, *inputs)
                (loss / cfg.grad_accum).backward()
            total = total + loss.detach().float()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / cfg.grad_accum, wait

    def _save_resume(self) -> None:
        self.saved_at = time.monotonic()
        if self.procs.is_main:
            ckpt.save_resume(
                self.folder,
                {
                    "definition": self.definition,
                    "step": self.step,
                    "model": self.model.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "rng": ckpt.rng_states(),
                },
            )
        if self.procs.world_size > 1:
            dist.barrier()

    def run(self) -> None:
        cfg, plan, procs = self.train_cfg, self.plan, self.procs
        log.info(
            "%s (%s, %d px) on %d spots of %d samples, %d panel genes, %d processes on %s: %d steps of %d spots",
            self.NAME,
            self.cfg.image_encoder,
            self.image_size,
            len(self.data),
            len(self.data.samples),
            len(self.data.panel_genes),
            procs.world_size,
            procs.device,
            self.total,
            plan.spots_per_step,
        )
        threads = max(1, torch.get_num_threads() // procs.world_size)
        workers = loader_workers(cfg.num_workers, procs.device.type, threads)
        loader = torch.utils.data.DataLoader(
            self.data,
            batch_size=None,
            sampler=MicroBatches(plan, procs.rank, self.step, self.total),
            num_workers=workers,
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers else None,
            pin_memory=procs.device.type == "cuda",
        )
        batches = iter(loader)
        self.model.train()
        started = window = time.perf_counter()
        first, steps, wait = self.step, 0, 0.0
        while self.step < self.total:
            lr = self.optimizer.param_groups[0]["lr"]
            loss, waited = self._train_step(batches)
            self.step, steps, wait = self.step + 1, steps + 1, wait + waited
            if self.step % cfg.log_every == 0 or self.step == self.total:
                mean = loss.clone()
                if procs.world_size > 1:
                    dist.all_reduce(mean)
                    mean /= procs.world_size
                value = float(mean.item())
                if not math.isfinite(value):
                    raise RuntimeError(
                        f"{self.NAME} training diverged: non-finite loss at step {self.step}; lower {self.SECTION}.lr"
                    )
                elapsed = time.perf_counter() - window
                row = {
                    "step": self.step,
                    "epoch": self.step / plan.steps_per_epoch,
                    "loss": value,
                    "lr": lr,
                    "samples_per_s": steps * plan.spots_per_step / elapsed,
                    "data_wait_fraction": wait / elapsed,
                }
                if self.metrics is not None:
                    self.metrics.append(row)
                    eta = (time.perf_counter() - started) / (self.step - first) * (self.total - self.step)
                    log.info(
                        "step %d/%d (epoch %.2f) loss %.4f lr %.3g %.1f samples/s, ETA %.0f s",
                        self.step,
                        self.total,
                        row["epoch"],
                        value,
                        lr,
                        row["samples_per_s"],
                        eta,
                    )
                window, steps, wait = time.perf_counter(), 0, 0.0
            if ckpt.resume_due(self.step, self.total, cfg, self.saved_at, procs.world_size, procs.device):
                self._save_resume()

    def final_state(self) -> dict:
        """The checkpoint: weights, everything to rebuild the model and read new data the same
        way (image size and normalisation, panel genes), and what it was trained on."""
        return {
            "format_version": FORMAT_VERSION,
            "kind": self.KIND,
            "model_state": self.model.state_dict(),
            f"{self.SECTION}_config": ckpt.plain(self.cfg.to_dict()),
            "backbone": ckpt.plain(self.backbone()),
            "train_config": ckpt.plain(self.train_cfg.to_dict()),
            "image_size": self.image_size,
            "image_mean": list(self.model.image_mean),
            "image_std": list(self.model.image_std),
            "panel_genes": list(self.data.panel_genes),
            "step": int(self.step),
            "data": ckpt.plain(self.data.fingerprint),
        }


def train_bleep(
    samples: Sequence[str],
    patches: Sequence[str | Path],
    indexes: Sequence[str | Path],
    sentences: Sequence[str | Path],
    out_checkpoint: str | Path,
    out_metrics: str | Path,
    *,
    bleep_config: Mapping,
    model_config: Mapping,
    train_config: Mapping,
    threads: int | None = None,
) -> None:
    """Train BLEEP on the training samples; write ``out_checkpoint`` and ``out_metrics`` together
    at the end (main process). ``train_config`` is :meth:`BleepConfig.train_config`'s; resume
    state lives in ``{out_checkpoint minus .pt}.resume/`` and is removed once the outputs exist."""
    cfg = BleepConfig.from_dict(dict(bleep_config))
    model_cfg = ModelConfig.from_dict(dict(model_config))
    train_cfg = TrainConfig.from_dict(dict(train_config))
    run_trainer(
        BleepTrainer,
        lambda: BleepSpots(sample_files(samples, patches, indexes, sentences)),
        cfg,
        model_cfg,
        train_cfg,
        out_checkpoint,
        out_metrics,
        threads,
    )


def run_trainer(
    trainer_class: type[BleepTrainer],
    load_data: Callable[[], SpotData],
    cfg: BleepConfig | Any,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    out_checkpoint: str | Path,
    out_metrics: str | Path,
    threads: int | None,
) -> None:
    """Start the processes, load the data, train, and write both outputs atomically (main process)."""
    procs = start_processes(train_cfg.device)
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        data = load_data()
        height, width, _ = data.patch_shape
        if train_cfg.rot90 and height != width:
            raise ConfigError(
                f"config key 'pretrain.rot90': needs square patches, the patches are {height} x {width} px"
            )
        with deterministic_on_cpu(procs.device):
            trainer = trainer_class(data, cfg, model_cfg, train_cfg, procs, ckpt.resume_dir(out_checkpoint))
            trainer.run()
            if not procs.is_main:
                return
            with atomic_paths(out_checkpoint, out_metrics) as (tmp_ckpt, tmp_metrics):
                ckpt.save_torch(trainer.final_state(), tmp_ckpt)
                shutil.copyfile(trainer.folder / "metrics.tsv", tmp_metrics)
            shutil.rmtree(trainer.folder)
            log.info("wrote %s after %d steps", out_checkpoint, trainer.step)
    finally:
        if procs.owns_group:
            dist.destroy_process_group()

"""The pretraining run: one process, or several under ``torchrun`` (DDP), resumable after a kill.

Reproducibility contract: everything random in optimiser step ``s`` of process ``r`` (batch
composition, image augmentation, sentence sub-sampling, the model's masks, shuffles and dropout)
is drawn from seeds derived from ``(seed, s, r)`` or ``(seed, epoch)``, never from RNG state
carried over from earlier steps. A run resumed from a checkpoint of step ``k`` therefore
computes steps ``k+1..`` exactly as the uninterrupted run did (bit-identical on CPU, where
deterministic algorithms are enforced).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from comtip._core.atomic import atomic_paths
from comtip._core.devices import deterministic_on_cpu
from comtip._core.errors import ConfigError
from comtip._core.seeds import derive_seed
from comtip.data.genes import read_bin_edges
from comtip.model import CoMTIP, ModelConfig, preprocess_images
from comtip.model.comtip import PROBE_KEYS
from comtip.model.sentence_cuts import subsample_sentences, value_probes, vocabulary_sentences
from comtip.training import checkpoint as ckpt
from comtip.training.config import (
    STREAM_AUGMENT,
    STREAM_INIT,
    STREAM_MODEL,
    STREAM_RETRIEVAL,
    STREAM_VALIDATION,
    TrainConfig,
    loader_workers,
    paat_start,
    total_steps,
)
from comtip.training.data import DENSE_KEY, SpotData, sample_files
from comtip.training.guard import NonFiniteGuard
from comtip.training.image_augment import augment_images
from comtip.training.metrics import LOSS_COLUMNS, MetricsLog, Window, progress_line
from comtip.training.optimizer import build_optimizer
from comtip.training.processes import Processes, start_processes
from comtip.training.retrieval import HeldoutMonitor, spot_retrieval
from comtip.training.sampling import BatchPlan, MicroBatches

log = logging.getLogger(__name__)


class Trainer:
    """One pretraining run; ``run()`` trains from scratch or from the resume checkpoint."""

    def __init__(
        self,
        data: SpotData,
        model_cfg: ModelConfig,
        cfg: TrainConfig,
        bin_edges: list[float],
        procs: Processes,
        resume_folder: Path,
        val_data: SpotData | None = None,
    ):
        self.data, self.model_cfg, self.cfg, self.bin_edges, self.procs = data, model_cfg, cfg, bin_edges, procs
        self.edges = torch.tensor(bin_edges, dtype=torch.float32, device=procs.device)
        self.folder = resume_folder
        self.plan = BatchPlan.for_run(cfg, data.sample_sizes, procs.world_size)
        data.readahead_block = cfg.block_size if cfg.sampler == "blocks" else 0
        self.total = total_steps(cfg, self.plan.steps_per_epoch)
        self.definition = ckpt.run_definition(
            model_cfg.to_dict(),
            cfg.to_dict(),
            data.fingerprint,
            world_size=procs.world_size,
            device_type=procs.device.type,
        )
        torch.manual_seed(derive_seed(cfg.seed, STREAM_INIT))  # same initial weights on every process
        self.model = CoMTIP(model_cfg, data.vocabulary).to(procs.device)
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg, self.total)
        if cfg.compile:
            if procs.device.type != "cuda":
                raise ConfigError(
                    f"config key 'pretrain.compile': torch.compile is for CUDA runs, this one runs on {procs.device}"
                )
            self.model.compile()  # in place: parameter names (and checkpoints) stay those of the model
            log.info("forward pass compiled with torch.compile (pretrain.compile; the first steps compile)")
        self.step = 0
        self.guard = NonFiniteGuard(procs.device)
        self.paat_start = paat_start(cfg, self.total)
        if model_cfg.paat:
            log.info(
                "PAAT from step %d of %d (pretrain.paat_warmup_steps / paat_warmup_fraction)",
                self.paat_start,
                self.total,
            )
        self.heldout = HeldoutMonitor(
            val_data,
            seed=derive_seed(cfg.seed, STREAM_VALIDATION),
            max_spots=cfg.retrieval_spots,
            image_size=model_cfg.image_size,
            bf16=cfg.bf16,
            max_pool=cfg.retrieval_pool_spots,
        )
        # the job's threads divided among its processes: what num_workers: auto hands out
        self.threads_per_process = max(1, torch.get_num_threads() // procs.world_size)
        self.saved_step = 0  # the step of the resume checkpoint on disk
        self.saved_at = time.monotonic()  # when it was written (or the run started)
        state = ckpt.load_resume(self.folder, self.definition)
        if state is not None:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            ckpt.set_rng_states(state["rng"])
            self.step = self.saved_step = int(state["step"])
            log.info("resuming from step %d of %d (%s)", self.step, self.total, self.folder / ckpt.RESUME_FILE)
        self.metrics = MetricsLog(self.folder / "metrics.tsv", self.step) if procs.is_main else None
        self.ddp = (
            DistributedDataParallel(
                self.model,
                device_ids=[procs.device.index] if procs.device.type == "cuda" else None,
                # a token ablation leaves the dropped side's parameters without gradients
                find_unused_parameters=model_cfg.gene_tokens != "both",
            )
            if procs.world_size > 1
            else None
        )

    # -- one optimiser step ----------------------------------------------------------------------

    def _prepare(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Move a micro-batch to the device, augment images and sentences, preprocess images."""
        batch = {k: v.to(self.procs.device, non_blocking=True) for k, v in batch.items()}
        cfg = self.cfg
        images = augment_images(
            batch["images"], flip=cfg.flip, rot90=cfg.rot90, jitter=cfg.color_jitter, generator=generator
        )
        probes = {}
        if self.model_cfg.value_contrast:  # from the whole sentences, before sub-sampling
            probes = dict(
                zip(
                    PROBE_KEYS,
                    value_probes(
                        batch["gene_ids"],
                        batch["values"],
                        batch["bins"],
                        batch["pad"],
                        self.model_cfg.value_contrast_genes,
                        generator=generator,
                    ),
                )
            )
        sentence = (batch["gene_ids"], batch["values"], batch["bins"], batch["pad"])
        if cfg.subsample_genes == "vocabulary":
            gene_ids, values, bins, pad = vocabulary_sentences(
                *sentence,
                batch[DENSE_KEY],
                self.edges,
                generator=generator,
                prob=cfg.subsample_prob,
                min_len=cfg.subsample_min_len,
                length=cfg.subsample_length,
            )
        else:
            gene_ids, values, bins, pad = subsample_sentences(
                *sentence,
                generator=generator,
                prob=cfg.subsample_prob,
                min_len=cfg.subsample_min_len,
                length=cfg.subsample_length,
            )
        return {
            "images": preprocess_images(
                images, self.model_cfg.image_size, self.model_cfg.image_mean, self.model_cfg.image_std
            ),
            "gene_ids": gene_ids,
            "values": values,
            "bins": bins,
            "pad": pad,
            **probes,
        }

    def _train_step(self, batches: Iterator[dict[str, torch.Tensor]], window: Window) -> dict[str, torch.Tensor]:
        """Forward/backward over ``grad_accum`` micro-batches, clip, AdamW step, schedule step.
        Returns the step's losses (mean over micro-batches), still on the device."""
        cfg, device = self.cfg, self.procs.device
        torch.manual_seed(derive_seed(cfg.seed, STREAM_MODEL, self.step, self.procs.rank))
        generator = torch.Generator(device).manual_seed(
            derive_seed(cfg.seed, STREAM_AUGMENT, self.step, self.procs.rank)
        )
        module = self.ddp if self.ddp is not None else self.model
        sums: dict[str, torch.Tensor] = {}
        for micro in range(cfg.grad_accum):
            waited = time.perf_counter()
            raw = next(batches)
            window.wait += time.perf_counter() - waited
            batch = self._prepare(raw, generator)
            last = micro == cfg.grad_accum - 1
            sync = contextlib.nullcontext() if self.ddp is None or last else self.ddp.no_sync()
            with sync:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16 and device.type == "cuda"):
                    out = module(batch, paat=self.step >= self.paat_start)
                (out["loss"] / cfg.grad_accum).backward()
            for key in LOSS_COLUMNS:
                value = out[key].detach().float()
                sums[key] = sums[key] + value if key in sums else value
        if cfg.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        losses = {k: v / cfg.grad_accum for k, v in sums.items()}
        self.guard.update(self.step + 1, losses)
        return losses

    # -- bookkeeping ---------------------------------------------------------------------------

    def _row(self, losses: dict[str, torch.Tensor], lr: float, window: Window) -> dict[str, float]:
        """Metrics of the step just done, averaged over processes (a collective: all ranks call it)."""
        wait = torch.tensor(window.wait, device=losses["loss"].device)
        stacked = torch.stack([losses[k] for k in LOSS_COLUMNS] + [wait])
        if self.procs.world_size > 1:
            dist.all_reduce(stacked)
            stacked /= self.procs.world_size
        values = stacked.tolist()
        elapsed = time.perf_counter() - window.start
        row = {
            "step": self.step,
            "epoch": self.step / self.plan.steps_per_epoch,
            "lr": lr,
            **dict(zip(LOSS_COLUMNS, values[:-1])),
            "samples_per_s": window.steps * self.plan.spots_per_step / elapsed,
            "data_wait_fraction": values[-1] / elapsed,
        }
        return row

    def _save_resume(self) -> None:
        self.saved_step = self.step
        self.saved_at = time.monotonic()
        if self.procs.is_main:
            ckpt.save_resume(
                self.folder,
                {
                    "definition": self.definition,
                    "step": self.step,
                    "epoch": self.step / self.plan.steps_per_epoch,
                    "model": self.model.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "rng": ckpt.rng_states(),
                    "vocabulary": self.data.vocabulary,
                    "bin_edges": self.bin_edges,
                },
            )
        if self.procs.world_size > 1:
            dist.barrier()  # no process runs ahead of a checkpoint that may be the one resumed from

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> None:
        cfg, plan = self.cfg, self.plan
        log.info(
            "pretraining on %d spots of %d samples (%s), %d processes on %s: %d steps of %d spots (%d steps per epoch)",
            len(self.data),
            len(self.data.samples),
            ", ".join(self.data.fingerprint["samples"]),
            self.procs.world_size,
            self.procs.device,
            self.total,
            plan.spots_per_step,
            plan.steps_per_epoch,
        )
        workers = loader_workers(cfg.num_workers, self.procs.device.type, self.threads_per_process)
        log.info("%d DataLoader workers per process (pretrain.num_workers: %s)", workers, cfg.num_workers)
        loader = torch.utils.data.DataLoader(
            self.data,
            batch_size=None,
            sampler=MicroBatches(plan, self.procs.rank, self.step, self.total),
            num_workers=workers,
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers else None,
            pin_memory=self.procs.device.type == "cuda",
        )
        batches = iter(loader)
        self.model.train()
        first_step, started = self.step, time.perf_counter()
        window = Window(started)
        while self.step < self.total:
            lr = self.optimizer.param_groups[0]["lr"]
            losses = self._train_step(batches, window)
            self.step += 1
            window.steps += 1
            epoch_end = bool(self.heldout) and self.step % plan.steps_per_epoch == 0
            log_now = self.step % cfg.log_every == 0 or self.step == self.total or epoch_end
            save_now = ckpt.resume_due(
                self.step, self.total, cfg, self.saved_at, self.procs.world_size, self.procs.device
            )
            if log_now or save_now:
                self.guard.check(self.procs.world_size, self.folder, self.saved_step)
            if log_now:
                row = self._row(losses, lr, window)
                if (epoch_end or (self.heldout and self.step == self.total)) and self.procs.is_main:
                    row.update(self.heldout.measure(self.model))
                if self.metrics is not None:
                    self.metrics.append(row)
                    per_step = (time.perf_counter() - started) / (self.step - first_step)  # ETA from the whole run
                    log.info(progress_line(row, self.total, per_step))
                window = Window(time.perf_counter())
            if save_now:
                self._save_resume()

    def retrieval(self) -> pd.DataFrame:
        """Image -> sentence retrieval on the training spots (:func:`spot_retrieval`)."""
        return spot_retrieval(
            self.model,
            self.data,
            seed=derive_seed(self.cfg.seed, STREAM_RETRIEVAL),
            max_spots=self.cfg.retrieval_spots,
            image_size=self.model_cfg.image_size,
            bf16=self.cfg.bf16,
            max_pool=self.cfg.retrieval_pool_spots,
        )

    def final_state(self) -> dict:
        return ckpt.final_state(
            self.model,
            model_config=self.model_cfg.to_dict(),
            train_config=self.cfg.to_dict(),
            vocabulary=self.data.vocabulary,
            bin_edges=self.bin_edges,
            step=self.step,
            fingerprint=self.data.fingerprint,
        )


def pretrain(
    samples: Sequence[str],
    patches: Sequence[str | Path],
    indexes: Sequence[str | Path],
    sentences: Sequence[str | Path],
    bins_tsv: str | Path,
    out_checkpoint: str | Path,
    out_metrics: str | Path,
    out_retrieval: str | Path,
    *,
    model_config: Mapping,
    train_config: Mapping,
    threads: int | None = None,
    val_samples: Sequence[str] = (),
    val_patches: Sequence[str | Path] = (),
    val_indexes: Sequence[str | Path] = (),
    val_sentences: Sequence[str | Path] = (),
) -> pd.DataFrame | None:
    """Pretrain CoMTIP on the training samples' patches and gene sentences; the ``val_*``
    samples (optional, never trained on) are the held-out alignment check of ``metrics.tsv``.

    Writes, on the main process and only at the end, ``out_checkpoint`` (see
    :func:`comtip.training.checkpoint.final_state`), ``out_metrics`` and ``out_retrieval``
    together; meanwhile resume state lives in ``{out_checkpoint minus .pt}.resume/`` and is
    removed once the outputs exist. Returns the retrieval table on the main process, None on
    the others.
    """
    cfg = TrainConfig.from_dict(dict(train_config))
    model_cfg = ModelConfig.from_dict(dict(model_config))
    procs = start_processes(cfg.device)
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        data = SpotData(sample_files(samples, patches, indexes, sentences))
        data.check_options(model_cfg.n_bins, rot90=cfg.rot90)
        val = data.held_out(sample_files(val_samples, val_patches, val_indexes, val_sentences)) if val_samples else None
        with deterministic_on_cpu(procs.device):
            trainer = Trainer(
                data, model_cfg, cfg, read_bin_edges(bins_tsv).tolist(), procs, ckpt.resume_dir(out_checkpoint), val
            )
            trainer.run()
            if not procs.is_main:
                return None
            table = trainer.retrieval()
            with atomic_paths(out_checkpoint, out_metrics, out_retrieval) as (tmp_ckpt, tmp_metrics, tmp_retrieval):
                ckpt.save_torch(trainer.final_state(), tmp_ckpt)
                shutil.copyfile(trainer.folder / "metrics.tsv", tmp_metrics)
                table.to_csv(tmp_retrieval, sep="\t", index=False, float_format="%.6g")
            shutil.rmtree(trainer.folder)
            log.info("wrote %s after %d steps", out_checkpoint, trainer.step)
            return table
    finally:
        if procs.owns_group:
            dist.destroy_process_group()

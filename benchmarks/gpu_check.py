"""The GPU check (issue 16): one prepared run that proves the GPU paths on a GPU machine.

Parts, each run on its own (a failure is recorded with its traceback and the others still run):

1. ``throughput``: ``comtip.training.pretrain`` with the paper's backbone (ViT-B/32 at 224 px,
   MFM + PAAT + InfoNCE, bf16 autocast on CUDA) on simulated spots (224 px uint8 patches,
   128-token sentences; benchmarks/bench_train.py's cohort) for a fixed number of steps at each
   batch size: samples/s and data-wait share (from its ``metrics.tsv``, warm-up steps left out),
   peak GPU memory, the loss curve;
2. ``profile``: a few steps of the same run under ``torch.profiler`` (top operators, the share of
   the profiled wall time the GPU was busy, synchronising operators per step) and, on CUDA, under
   ``torch.cuda.set_sync_debug_mode("warn")``: every host-device sync inside the training step,
   with the line of ``comtip`` that caused it;
3. ``resume``: a run SIGKILLed after its first resume checkpoint and rerun to the end, its weights
   compared tensor by tensor with an uninterrupted run of the same seed (and, on CUDA, two
   uninterrupted runs with each other: what CUDA's own non-determinism gives);
4. ``workflow``: the tiny workflow (.test/config) end to end with ``pretrain.device`` and
   ``finetune.device`` set to the device, its outputs checked.

Writes ``gpu_check.json`` (every figure) and ``gpu_check.md`` (the section for BENCHMARKS.md,
made from that JSON) into ``--out`` after every part, so a run cut short still leaves both.

    bash benchmarks/gpu_check.sh --device cuda --out OUT           # on a GPU machine (< 8 min)
    bash benchmarks/gpu_check.sh --device cpu --quick --out OUT    # anywhere (a few minutes)
    python benchmarks/gpu_check.py --from-json OUT/gpu_check.json --markdown BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = str(REPO / "src" / "comtip")
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from _gpu_parts import resume_check, workflow_check  # noqa: E402
from _gpu_report import SECTION, markdown  # noqa: E402
from _markdown import head_commit, write_section  # noqa: E402
from bench_train import PAPER_MODEL, demo_config, write_cohort  # noqa: E402

log = logging.getLogger("gpu_check")

PARTS = ("throughput", "profile", "resume", "workflow")
# What each mode runs. "full" is the GPU run (ViT-B/32 at 224 px); "quick" the CPU check of the
# same code paths with the tiny model of .test/config (PAAT switched on, so every loss term runs).
TINY_MODEL = {
    "image_size": 32,
    "vision_kwargs": {"depth": 2},
    "text_dim": 32,
    "text_heads": 2,
    "text_ff": 64,
    "embed_dim": 64,
}
MODES = {
    "full": {
        "model": PAPER_MODEL,
        "spots_per_sample": 1536,  # 2 samples x 1536 x 150 KB = 460 MB of patches
        "distinct_patches": 48,
        "batches": [128, 256],
        "warmup_steps": 10,  # left out of the figures (allocator, cuDNN/cuBLAS heuristics, workers)
        "measured_steps": 30,
        "log_every": 5,
        "profile_batch": 128,
        "resume": {"batch_size": 64, "steps": 30, "checkpoint_every": 10},  # 1 GB per checkpoint
        "workflow_timeout_s": 300,
    },
    "quick": {
        "model": TINY_MODEL,
        "spots_per_sample": 48,
        "distinct_patches": 8,
        "batches": [8, 16],
        "warmup_steps": 2,
        "measured_steps": 4,
        "log_every": 2,
        "profile_batch": 8,
        "resume": {"batch_size": 8, "steps": 8, "checkpoint_every": 4},
        "workflow_timeout_s": 2400,  # 6 min on 2 quiet cores, 17 on 2 shared ones
    },
}
TARGETS = {"samples_per_s": 3000, "data_wait": 0.10}
PACKAGES = ("torch", "timm", "numpy", "pandas", "anndata", "scanpy", "snakemake", "openslide-python", "jsonschema")


def train_options(settings: dict, device: str, **over) -> dict:
    """The demo's pretrain options (config/config.yaml) for a short measured run on ``device``."""
    options = {
        **demo_config()[1],
        "device": device,
        "warmup_steps": 5,
        "lr": 5e-4,
        "paat_warmup_steps": 2,  # PAAT in every measured step: the full CoMTIP loss
        "log_every": settings["log_every"],
        "checkpoint_minutes": None,
        "checkpoint_every": None,
        "retrieval_spots": 64,
    }
    options.update(over)
    return options


def environment(device: str, commit: str | None) -> dict:
    info = {
        "device": device,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "torch_cuda": torch.version.cuda,
        "commit": commit or head_commit(REPO) or "unknown",
        "packages": {},
    }
    for name in PACKAGES:
        try:
            info["packages"][name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info["packages"][name] = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=torch.cuda.get_device_name(0),
            gpu_memory_gib=props.total_memory / 2**30,
            gpu_multiprocessors=props.multi_processor_count,
            gpu_capability=".".join(map(str, torch.cuda.get_device_capability(0))),
        )
        smi = shutil.which("nvidia-smi")
        if smi:
            import subprocess

            out = subprocess.run(
                [smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
            )
            info["driver"] = out.stdout.strip() or None
    return info


# -- part 1: throughput ------------------------------------------------------------------------


def one_run(cohort: dict, folder: Path, model: dict, train: dict) -> pd.DataFrame:
    """``pretrain`` in this process; its metrics.tsv rows. Outputs are deleted afterwards (a
    ViT-B/32 run leaves a 0.35 GB checkpoint and a 1 GB resume state)."""
    from comtip.training import pretrain

    folder.mkdir(parents=True, exist_ok=True)
    try:
        pretrain(
            **cohort,
            out_checkpoint=folder / "m.pt",
            out_metrics=folder / "m.metrics.tsv",
            out_retrieval=folder / "m.retrieval.tsv",
            model_config=model,
            train_config=train,
        )
        return pd.read_csv(folder / "m.metrics.tsv", sep="\t")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def throughput(cohort: dict, work: Path, settings: dict, device: str) -> dict:
    from comtip.training.config import loader_workers

    steps = settings["warmup_steps"] + settings["measured_steps"]
    rows = []
    for batch in settings["batches"]:
        train = train_options(settings, device, batch_size=batch, max_steps=steps)
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        metrics = one_run(cohort, work / f"throughput_{batch}", settings["model"], train)
        wall = time.perf_counter() - started
        measured = metrics[metrics["step"] > settings["warmup_steps"]]
        samples_per_s = float(measured["samples_per_s"].median())
        losses = ["step", "loss", "loss_infonce", "loss_mfm", "loss_paat"]
        rows.append(
            {
                "batch": batch,
                "steps": steps,
                "measured_steps": int(measured["step"].max() - settings["warmup_steps"]),
                "samples_per_s": samples_per_s,
                "step_s": batch / samples_per_s,
                "data_wait": float(measured["data_wait_fraction"].mean()),
                "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
                "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if device == "cuda" else None,
                "run_s": wall,
                "loss_curve": metrics[losses].to_dict("records"),
            }
        )
        log.info("throughput batch %d: %s", batch, {k: v for k, v in rows[-1].items() if k != "loss_curve"})
    workers = loader_workers("auto", device, torch.get_num_threads())
    best = max(r["samples_per_s"] for r in rows)
    return {
        "model": settings["model"],
        "train": train_options(settings, device),
        "workers": workers,
        "rows": rows,
        "targets": TARGETS,
        "reached": {
            "samples_per_s": best >= TARGETS["samples_per_s"],
            "data_wait": all(r["data_wait"] < TARGETS["data_wait"] for r in rows),
        },
    }


# -- part 2: profile and host-device syncs -----------------------------------------------------


def _device_time(event) -> float:
    """Self time on the GPU of a profiler event (µs; the attribute was renamed in torch 2.4)."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, name):
            return float(getattr(event, name))
    return 0.0


def _is_kernel(event) -> bool:
    """A GPU activity (kernel, memcpy, memset) rather than a CPU-side operator or runtime call."""
    return getattr(event, "device_type", None) == torch.autograd.DeviceType.CUDA


SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::item", "aten::is_nonzero")
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


class StepHooks:
    """Wraps ``Trainer._train_step`` for one run: host-device syncs of steps ``audit`` (CUDA's
    sync debug mode, each warning traced to its line of comtip) and a profile of steps ``profiled``."""

    def __init__(self, device: str, audit: range, profiled: range, trace: Path | None):
        self.device, self.audit, self.profiled, self.trace = device, audit, profiled, trace
        self.sites: Counter = Counter()
        self.profile: dict = {}

    def _record(self, message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" not in str(message):
            return
        stack = traceback.extract_stack()[:-1]
        ours = [f for f in stack if f.filename.startswith(PACKAGE)]
        frame = ours[-1] if ours else stack[-1]
        where = f"{Path(frame.filename).relative_to(REPO) if ours else frame.filename}:{frame.lineno}"
        inner = stack[-1]
        if inner is not frame:  # the library line that synchronised, below comtip's line
            where += f" via {Path(inner.filename).name}:{inner.lineno}"
        self.sites[f"{where}: {(frame.line or '').strip()}"] += 1

    def wrap(self, original):
        hooks, state = self, {"step": 0}

        def step(trainer, batches, window):
            index = state["step"]
            state["step"] += 1
            audit = hooks.device == "cuda" and index in hooks.audit
            if index == hooks.profiled.start:
                hooks._start_profile()
            if audit:
                torch.cuda.synchronize()
                with warnings.catch_warnings():
                    warnings.simplefilter("always")
                    warnings.showwarning = hooks._record
                    torch.cuda.set_sync_debug_mode("warn")
                    try:
                        out = original(trainer, batches, window)
                    finally:
                        torch.cuda.set_sync_debug_mode("default")
            else:
                out = original(trainer, batches, window)
            if index == hooks.profiled.stop - 1:
                hooks._stop_profile()
            return out

        return step

    def _start_profile(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize()
        self._prof = torch.profiler.profile(activities=activities)
        self._prof.start()
        self._wall = time.perf_counter()

    def _stop_profile(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - self._wall
        self._prof.stop()
        steps = len(self.profiled)
        events = self._prof.key_averages()
        kernels = [e for e in events if _is_kernel(e)]
        gpu_us = sum(_device_time(e) for e in kernels)
        by_cpu = sorted((e for e in events if not _is_kernel(e)), key=lambda e: e.self_cpu_time_total, reverse=True)
        by_gpu = sorted(kernels, key=_device_time, reverse=True)
        self.profile = {
            "steps": steps,
            "wall_s_per_step": wall / steps,
            "gpu_busy_fraction": gpu_us / 1e6 / wall if self.device == "cuda" else None,
            "sync_ops_per_step": {e.key: e.count / steps for e in events if e.key in SYNC_OPS + SYNC_CALLS},
            "top_cpu": [{"op": e.key, "ms_per_step": e.self_cpu_time_total / 1e3 / steps} for e in by_cpu[:12]],
            "top_gpu": [{"op": e.key, "ms_per_step": _device_time(e) / 1e3 / steps} for e in by_gpu[:12]],
        }
        if self.trace is not None:
            import gzip

            raw = self.trace.with_suffix("")
            self._prof.export_chrome_trace(str(raw))
            with open(raw, "rb") as src, gzip.open(self.trace, "wb") as dst:
                shutil.copyfileobj(src, dst)
            raw.unlink()
            self.profile["trace"] = self.trace.name


def profile(cohort: dict, work: Path, settings: dict, device: str, trace: Path | None) -> dict:
    from comtip.training import loop

    warm = settings["warmup_steps"]
    audit, profiled = range(warm, warm + 3), range(warm + 3, warm + 6)
    hooks = StepHooks(device, audit, profiled, trace)
    original = loop.Trainer._train_step
    loop.Trainer._train_step = hooks.wrap(original)
    try:
        train = train_options(settings, device, batch_size=settings["profile_batch"], max_steps=profiled.stop)
        one_run(cohort, work / "profile", settings["model"], train)
    finally:
        loop.Trainer._train_step = original
    per_step = {site: n / len(audit) for site, n in hooks.sites.most_common()}
    return {
        "batch": settings["profile_batch"],
        "audited_steps": [audit.start + 1, audit.stop],
        "profiled_steps": [profiled.start + 1, profiled.stop],
        "sync_audit": "cuda sync debug mode" if device == "cuda" else "not available on CPU",
        "syncs_per_step": per_step if device == "cuda" else None,
        **hooks.profile,
    }


# -- the runner --------------------------------------------------------------------------------


def run_part(results: dict, name: str, func, budget_end: float, *args) -> None:
    """Run one part; record its result or its error with traceback, and its time."""
    if time.monotonic() > budget_end:
        results["parts"][name] = {"ok": False, "skipped": "time budget spent before this part started"}
        return
    log.info("part %s ...", name)
    started = time.perf_counter()
    try:
        results["parts"][name] = {"ok": True, "result": func(*args)}
    except BaseException as err:  # a part's failure, whatever it is, must not stop the others
        if isinstance(err, KeyboardInterrupt):
            raise
        log.exception("part %s failed", name)
        results["parts"][name] = {
            "ok": False,
            "error": f"{type(err).__name__}: {err}",
            "traceback": traceback.format_exc(),
        }
    results["parts"][name]["seconds"] = time.perf_counter() - started
    log.info("part %s done in %.1f s (ok: %s)", name, results["parts"][name]["seconds"], results["parts"][name]["ok"])


def save(results: dict, out: Path, started: float) -> None:
    """``gpu_check.json`` (NaN and infinities as null) and ``gpu_check.md`` made from it."""
    results["total_s"] = time.perf_counter() - started
    clean = json.loads(json.dumps(results, default=str), parse_constant=lambda _: None)
    (out / "gpu_check.json").write_text(json.dumps(clean, indent=1, allow_nan=False) + "\n")
    (out / "gpu_check.md").write_text(markdown(clean))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps (the CPU check)")
    parser.add_argument("--out", type=Path, default=Path("gpu_check_out"), help="folder for the JSON, markdown, log")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed at the end)")
    parser.add_argument("--skip", nargs="*", default=[], choices=PARTS, help="parts not to run")
    parser.add_argument(
        "--budget-s", type=float, help="no part starts after this many seconds (default 400; --quick: 3600)"
    )
    parser.add_argument(
        "--overrun-s", type=float, default=90.0, help="a part's subprocesses are stopped this long after the budget"
    )
    parser.add_argument("--commit", help="commit of the checkout (when the copy has no .git)")
    parser.add_argument("--command", help="the command line to record (default: this one)")
    parser.add_argument("--from-json", type=Path, help="only write the markdown of an earlier run's JSON")
    parser.add_argument("--markdown", type=Path, help="also write the section into this file (BENCHMARKS.md)")
    args = parser.parse_args(argv)

    if args.from_json:
        results = json.loads(args.from_json.read_text())
        if args.markdown:
            return write_benchmarks(results, args.markdown)
        sys.stdout.write(markdown(results))
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=[logging.StreamHandler(sys.stderr), logging.FileHandler(args.out / "gpu_check.log", mode="w")],
    )
    if args.device == "cuda" and not torch.cuda.is_available():
        log.error("--device cuda but torch %s sees no CUDA device", torch.__version__)
    mode = "quick" if args.quick else "full"
    settings = MODES[mode]
    command = args.command or "bash benchmarks/gpu_check.sh " + " ".join(argv if argv is not None else sys.argv[1:])
    started = time.perf_counter()
    results: dict = {"command": command, "mode": mode, "settings": settings}
    results["parts"] = {}
    try:
        results["environment"] = environment(args.device, args.commit)
    except Exception as err:  # the environment is a record; it must not stop the run
        results["environment"] = {"device": args.device, "error": f"{type(err).__name__}: {err}"}
    log.info("environment: %s", results["environment"])
    budget_end = time.monotonic() + (args.budget_s if args.budget_s is not None else 3600.0 if args.quick else 400.0)
    deadline = budget_end + args.overrun_s  # the workflow and the resume runs are killed then
    work = Path(tempfile.mkdtemp(prefix="gpu_check_")) if args.work is None else args.work
    work.mkdir(parents=True, exist_ok=True)
    try:
        written = time.perf_counter()
        results["data"] = {"samples": 2, "spots_per_sample": settings["spots_per_sample"], "patch_px": 224}
        try:
            cohort = write_cohort(work / "data", settings["spots_per_sample"], settings["distinct_patches"])
            results["data"]["written_s"] = time.perf_counter() - written
        except Exception as err:  # the parts that train say so; the workflow makes its own data
            log.exception("simulated cohort not written")
            cohort = None
            results["data"]["error"] = f"{type(err).__name__}: {err}"
        trace = args.out / "profile_trace.json.gz" if args.device == "cuda" else None
        jobs = {
            "throughput": (throughput, cohort, work, settings, args.device),
            "profile": (profile, cohort, work, settings, args.device, trace),
            "resume": (resume_check, cohort, work / "resume", settings, args.device, train_options, deadline),
            "workflow": (workflow_check, work / "workflow", args.device, settings, args.out, deadline),
        }
        for name in PARTS:
            if name in args.skip:
                results["parts"][name] = {"ok": False, "skipped": "--skip"}
            elif cohort is None and name != "workflow":
                results["parts"][name] = {"ok": False, "error": f"no simulated cohort: {results['data']['error']}"}
            else:
                run_part(results, name, jobs[name][0], budget_end, *jobs[name][1:])
            save(results, args.out, started)
    finally:
        save(results, args.out, started)
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.markdown:
        write_benchmarks(json.loads((args.out / "gpu_check.json").read_text()), args.markdown)
    failed = [n for n, p in results["parts"].items() if not p["ok"] and "skipped" not in p]
    log.info("wrote %s (failed parts: %s)", args.out / "gpu_check.json", ", ".join(failed) or "none")
    return 1 if failed else 0


def write_benchmarks(results: dict, path: Path) -> int:
    """The section into BENCHMARKS.md: only from a CUDA run (CPU figures are no GPU proof)."""
    if results.get("environment", {}).get("device") != "cuda":
        raise SystemExit(f"not writing {SECTION!r} into {path}: this run was on {results['environment']['device']}")
    write_section(path, SECTION, markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

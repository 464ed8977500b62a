"""Parts 3 and 4 of benchmarks/gpu_check.py: kill-and-resume against an uninterrupted run, and the
tiny workflow end to end on the device."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

from comtip.training.launch import PRETRAIN

REPO = Path(__file__).resolve().parents[1]
LOSS_COLUMNS = ("loss", "loss_infonce", "loss_mfm", "loss_paat", "loss_value", "logit_scale")
# the rules that run on the GPU when one is there (tests/_helpers/workflow.py: GPU_RULES)
GPU_RULES = ("pretrain", "finetune", "embed_spots", "predict_finetuned", "predict_slide")


def _env() -> dict[str, str]:
    """This checkout's src first on PYTHONPATH (carried wheels, if any, stay after it)."""
    parts = [str(REPO / "src")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(parts), "PYTHONUNBUFFERED": "1"}


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"({path} absent)"


# -- part 3: resume ----------------------------------------------------------------------------


class Run:
    """``python -m comtip.training.launch ARGS.json`` (the entry point torchrun starts) in ``folder``."""

    def __init__(self, folder: Path, cohort: dict, model: dict, train: dict):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        args = {k: ([str(p) for p in v] if isinstance(v, list) else str(v)) for k, v in cohort.items()}
        args.update(
            out_checkpoint=str(folder / "comtip.pt"),
            out_metrics=str(folder / "comtip.metrics.tsv"),
            out_retrieval=str(folder / "comtip.retrieval.tsv"),
            model_config=model,
            train_config=train,
        )
        # the worker entry point's format: launch.run_processes writes the same
        (folder / "args.json").write_text(json.dumps({"target": PRETRAIN, "kwargs": args}))
        self.last = folder / "comtip.resume" / "last.pt"
        self.process: subprocess.Popen | None = None

    def start(self, name: str) -> Run:
        self.log = self.folder / f"{name}.log"
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "comtip.training.launch", str(self.folder / "args.json")],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=_env(),
                cwd=self.folder,
            )
        return self

    def wait(self, timeout: float) -> None:
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise RuntimeError(f"{self.log.name} still running after {timeout:.0f} s:\n{_tail(self.log)}") from None
        if code != 0:
            raise RuntimeError(f"{self.log.name} exited {code}:\n{_tail(self.log)}")


def compare_weights(a: Path, b: Path) -> dict:
    """Per tensor of two checkpoints' model_state: bit-exact or not, max |a - b|."""
    sa = torch.load(a, map_location="cpu", weights_only=True)["model_state"]
    sb = torch.load(b, map_location="cpu", weights_only=True)["model_state"]
    if sa.keys() != sb.keys():
        raise RuntimeError(f"{a} and {b} hold different tensors: {sorted(set(sa) ^ set(sb))[:5]}")
    diffs, exact = {}, 0
    scale = 0.0
    for key in sa:
        x, y = sa[key].double(), sb[key].double()
        exact += bool(torch.equal(sa[key], sb[key]))
        diffs[key] = float((x - y).abs().max()) if x.numel() else 0.0
        scale = max(scale, float(x.abs().max()) if x.numel() else 0.0)
    largest = sorted(diffs.items(), key=lambda kv: kv[1], reverse=True)[:5]
    worst = max(diffs.values())
    return {
        "tensors": len(sa),
        "bit_exact_tensors": exact,
        "bit_exact": exact == len(sa),
        "max_abs_diff": worst,
        "max_abs_diff_relative_to_max_weight": worst / scale if scale else None,
        "largest": [{"tensor": k, "max_abs_diff": v} for k, v in largest],
    }


def compare_metrics(a: Path, b: Path) -> float:
    """Largest difference in the loss columns of two metrics.tsv (timing columns left out)."""
    ma, mb = pd.read_csv(a, sep="\t"), pd.read_csv(b, sep="\t")
    if list(ma["step"]) != list(mb["step"]):
        raise RuntimeError(f"{a} and {b} log different steps")
    return float((ma[list(LOSS_COLUMNS)] - mb[list(LOSS_COLUMNS)]).abs().max().max())


def explain(device: str, resumed: dict, repeat: dict | None) -> str:
    if resumed["bit_exact"]:
        return f"bit-exact on {device}: the resumed run computed exactly what the uninterrupted one did"
    if device == "cpu":
        return "NOT bit-exact on CPU, where deterministic kernels are enforced: a resume bug"
    if repeat is None:
        return "not bit-exact on CUDA; no repeat of the uninterrupted run to compare with"
    if repeat["bit_exact"]:
        return (
            "not bit-exact on CUDA, although two uninterrupted runs are: the resume does not restore "
            "everything (a bug to find)"
        )
    ratio = resumed["max_abs_diff"] / repeat["max_abs_diff"] if repeat["max_abs_diff"] else math.inf
    verdict = "the same order" if ratio < 10 else "much larger: look for state the resume misses"
    return (
        f"not bit-exact on CUDA: resumed vs uninterrupted differ by at most {resumed['max_abs_diff']:.3g}, two "
        f"uninterrupted runs of the same seed by {repeat['max_abs_diff']:.3g} ({verdict}). CUDA kernels "
        "are not deterministic by default (atomic adds in backward passes such as embedding and "
        "index gradients, split-K matrix products in bf16), so bit-identity is promised on CPU only"
    )


def resume_check(cohort: dict, work: Path, settings: dict, device: str, options, deadline: float) -> dict:
    """SIGKILL a run after its first resume checkpoint, rerun it, compare with an uninterrupted run
    (and on CUDA that with its repeat); every run is stopped at ``deadline`` (time.monotonic())."""
    spec = settings["resume"]
    train = options(
        settings,
        device,
        batch_size=spec["batch_size"],
        max_steps=spec["steps"],
        checkpoint_every=spec["checkpoint_every"],
    )
    model = settings["model"]
    timeout = lambda: max(10.0, deadline - time.monotonic())  # noqa: E731
    runs = [Run(work / "uninterrupted", cohort, model, train), Run(work / "killed", cohort, model, train)]
    if device == "cuda":  # two uninterrupted runs: what CUDA's own non-determinism gives
        runs.append(Run(work / "repeat", cohort, model, train))
    reference, killed, repeat = (runs + [None])[:3]
    try:
        reference.start("run")
        killed.start("first")
        while not killed.last.exists() and killed.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        if killed.process.poll() is not None:
            raise RuntimeError(f"the run to kill ended before it was killed:\n{_tail(killed.log)}")
        os.kill(killed.process.pid, signal.SIGKILL)
        code = killed.process.wait()
        if not killed.last.exists():
            raise RuntimeError(f"no resume checkpoint before the deadline:\n{_tail(killed.log)}")
        if code != -signal.SIGKILL or (killed.folder / "comtip.pt").exists():
            raise RuntimeError(f"the run was not killed mid-way (exit {code}):\n{_tail(killed.log)}")
        saved = torch.load(killed.last, map_location="cpu", weights_only=True, mmap=True)["step"]
        killed.start("resumed")
        if repeat is not None:
            repeat.start("run")
        for run in runs:
            run.wait(timeout())
    finally:
        for run in runs:
            if run.process is not None and run.process.poll() is None:
                run.process.kill()
                run.process.wait()
    resumed_log = killed.log.read_text(errors="replace")
    if f"resuming from step {saved} of {spec['steps']}" not in resumed_log:
        raise RuntimeError(f"the rerun did not resume from step {saved}:\n{resumed_log[-3000:]}")
    final = lambda r: r.folder / "comtip.pt"  # noqa: E731
    metrics = lambda r: r.folder / "comtip.metrics.tsv"  # noqa: E731
    resumed = compare_weights(final(reference), final(killed))
    resumed["metrics_max_abs_diff"] = compare_metrics(metrics(reference), metrics(killed))
    again = None
    if repeat is not None:
        again = compare_weights(final(reference), final(repeat))
        again["metrics_max_abs_diff"] = compare_metrics(metrics(reference), metrics(repeat))
    for run in runs:  # 1.4 GB a run with ViT-B/32
        shutil.rmtree(run.folder / "comtip.resume", ignore_errors=True)
        (run.folder / "comtip.pt").unlink(missing_ok=True)
    return {
        "model": model,
        "batch_size": spec["batch_size"],
        "steps": spec["steps"],
        "checkpoint_every": spec["checkpoint_every"],
        "killed_after_checkpoint_of_step": int(saved),
        "resumed_vs_uninterrupted": resumed,
        "uninterrupted_vs_repeat": again,
        "explanation": explain(device, resumed, again),
    }


# -- part 4: the tiny workflow ---------------------------------------------------------------


def _rule_seconds(logs: Path) -> dict[str, float]:
    """Wall seconds per rule (summed over its jobs) from Snakemake's benchmark files."""
    seconds: dict[str, float] = {}
    for tsv in sorted((logs / "benchmark").rglob("*.tsv")):
        rule = tsv.relative_to(logs / "benchmark").parts[0]
        seconds[rule] = seconds.get(rule, 0.0) + float(pd.read_csv(tsv, sep="\t")["s"].sum())
    return seconds


def _pack_logs(work: Path, out: Path) -> None:
    with tarfile.open(out / "workflow_logs.tar.gz", "w:gz") as tar:
        for path in [work / "snakemake.log", work / "logs"]:
            if path.exists():
                tar.add(path, arcname=path.relative_to(work))


def workflow_check(work: Path, device: str, settings: dict, out: Path, deadline: float) -> dict:
    """The tiny workflow (.test/config) with pretrain.device and finetune.device = ``device``."""
    # a second call with the same --work continues what the first one left (--rerun-incomplete)
    shutil.copytree(REPO / ".test" / "config", work / "config", copy_function=shutil.copyfile, dirs_exist_ok=True)
    shutil.rmtree(work / ".snakemake" / "locks", ignore_errors=True)  # left by a run this script stopped
    config_path = work / "config" / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    for section in ("pretrain", "finetune"):
        config.setdefault(section, {})["device"] = device
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    cores = os.cpu_count() if device == "cuda" else 2
    command = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(work),
        "--cores",
        str(cores),
        "--rerun-incomplete",
        "--scheduler",
        "greedy",  # the ILP scheduler needs pulp, which the GPU machine lacks (benchmarks/gpu_wheels.txt)
    ]
    started = time.perf_counter()
    timeout = min(settings["workflow_timeout_s"], max(10.0, deadline - time.monotonic()))
    try:
        with open(work / "snakemake.log", "w") as log:
            # its own process group, so that a timeout stops the rule jobs too, not only snakemake
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True
            )
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise RuntimeError(
                f"snakemake stopped after {timeout:.0f} s:\n{_tail(work / 'snakemake.log', 6000)}"
            ) from None
        wall = time.perf_counter() - started
        if code != 0:
            raise RuntimeError(f"snakemake exited {code}:\n{_tail(work / 'snakemake.log', 6000)}")
        return {"command": " ".join(command[1:]), "cores": cores, "wall_s": wall, **check_outputs(work, device)}
    finally:
        _pack_logs(work, out)


def check_outputs(work: Path, device: str) -> dict:
    """What the tiny run must have made, read back; an AssertionError names the first miss."""
    import anndata as ad
    import numpy as np

    from comtip.training import load_pretrained

    results, logs = work / "results", work / "logs"
    from comtip.config import validate_config

    config = yaml.safe_load((work / "config" / "config.yaml").read_text())
    methods = validate_config(config, REPO / "workflow" / "schemas" / "config.schema.yaml")["evaluate"]["methods"]
    _, info = load_pretrained(results / "models" / "pretrain" / "comtip.pt")
    assert info["train_config"]["device"] == device, info["train_config"]["device"]
    metrics = pd.read_csv(results / "models" / "pretrain" / "comtip.metrics.tsv", sep="\t")
    assert np.isfinite(metrics["loss"]).all() and len(metrics) > 0, "pretraining losses not finite"
    summary = pd.read_csv(results / "evaluation" / "summary.tsv", sep="\t")
    missing = sorted(set(methods) - set(summary["method"]))
    assert not missing, f"methods missing from summary.tsv: {missing}"
    overall = summary[summary["gene_set"] == "all"].set_index("method")
    pearson = {m: float(overall.loc[m, "pearson_mean"]) for m in methods if m != "mean"}
    assert all(np.isfinite(v) for v in pearson.values()), pearson
    slide = ad.read_h5ad(results / "predictions" / "tiny_p" / "virtual_visium.h5ad")
    assert slide.n_obs > 0 and np.isfinite(np.asarray(slide.X)).all(), "virtual Visium prediction empty or not finite"
    on_device = {}
    for rule in GPU_RULES:  # each of their jobs logs where it ran ("... on cuda", "... on cuda:0")
        texts = [p.read_text(errors="replace") for p in sorted((logs / rule).rglob("*.log"))]
        on_device[rule] = {"jobs": len(texts), "on_device": sum(bool(re.search(rf"\bon {device}\b", t)) for t in texts)}
    elsewhere = {rule: n for rule, n in on_device.items() if n["jobs"] == 0 or n["on_device"] < n["jobs"]}
    assert not elsewhere, f"jobs whose log does not say they ran on {device}: {elsewhere}"
    return {
        "pretrain_steps": int(info["step"]),
        "final_loss": float(metrics["loss"].iloc[-1]),
        "methods": methods,
        "pearson_all_genes": pearson,
        "virtual_visium_tiles": int(slide.n_obs),
        "gpu_rules": on_device,
        "rule_seconds": _rule_seconds(logs),
    }

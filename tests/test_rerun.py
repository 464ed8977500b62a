"""Reruns of the whole workflow: reproducible from scratch, resumable after a kill, incremental
when samples are added."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from _helpers.workflow import PREDICT_SAMPLE, SAMPLES, snakemake, snakemake_command, write_tiny_run_folder
from compare_results import assert_same_results
from conftest import dry_run_jobs

pytestmark = pytest.mark.e2e


def _wait_for(predicate, process: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"snakemake ended ({process.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


PRETRAINED = "results/models/pretrain/comtip.pt"


def test_killed_run_reruns_incomplete_jobs_resumes_pretraining_and_ends_identical(tiny_run, tmp_path):
    """SIGKILL to Snakemake and its jobs while pretraining is midway; the same command with
    --rerun-incomplete (after --unlock) finishes, pretraining resumes from its last checkpoint,
    and every result equals the uninterrupted run's (which also shows: same config and seed, run
    twice from scratch, give identical results). The run targets the pretrained model, to keep
    CI time down; the SLURM test compares a whole second run with the local one."""
    root = write_tiny_run_folder(tmp_path / "killed")
    resume = root / "results" / "models" / "pretrain" / "comtip.resume" / "last.pt"
    cmd = snakemake_command(root, "--cores", "2", PRETRAINED)
    with open(tmp_path / "first.log", "w") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_for(resume.exists, process, 900, "a pretraining resume checkpoint")
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert not (root / "results" / "models" / "pretrain" / "comtip.pt").exists()

    snakemake(root, "--unlock")
    result = snakemake(root, "--rerun-incomplete", PRETRAINED)
    log = (root / "logs" / "pretrain" / "comtip.log").read_text()
    resumed = re.search(r"resuming from step (\d+) of (\d+)", log)
    assert resumed and 0 < int(resumed.group(1)) < int(resumed.group(2)), log[-2000:]
    assert "Nothing to be done" not in result.stdout + result.stderr
    assert_same_results(tiny_run, root, only_in_both=True)


def _planned_jobs(text: str) -> set[tuple[str, str]]:
    """(rule, wildcards) of every job a dry run lists."""
    jobs = set()
    for rule, block in dry_run_jobs(text):
        wildcards = re.search(r"^\s+wildcards: (.*)$", block, re.M)
        jobs.add((rule, wildcards.group(1).strip() if wildcards else ""))
    return jobs


def test_adding_samples_reruns_only_what_depends_on_them(tiny_run):
    """A new test sample and a new H&E-only slide: their own jobs, the evaluation, nothing else
    (the panel, pretraining and fine-tuning are reused)."""
    sheet = (tiny_run / "config" / "samples.tsv").read_text()
    more = tiny_run / "config" / "samples_more.tsv"
    more.write_text(
        sheet + "tiny_c\t../resources/demo/tiny_c/outs\t../resources/demo/tiny_c/slide.tif\ttest\t\t\tdemo\ttiny_c\n"
        "tiny_q\t\t../resources/demo/tiny_q/slide.tif\tpredict\t\t\t\t\n"
    )
    try:
        result = snakemake(tiny_run, "-n", "--config", "samples=config/samples_more.tsv")
    finally:
        more.unlink()
    jobs = _planned_jobs(result.stdout + result.stderr)
    rules = {rule for rule, _ in jobs}
    assert jobs, result.stdout[-3000:]
    for rule, wildcards in jobs:
        if rule in ("all", "evaluate", "evaluation_figures", "batch_mixing"):
            continue
        assert "tiny_c" in wildcards or "tiny_q" in wildcards, f"{rule} ({wildcards}) reruns for an old sample"
    assert not rules & {"select_genes", "pretrain", "finetune"}, rules
    assert {
        "ingest",
        "extract_patches",
        "build_gene_sentences",
        "embed_spots",
        "predict_baseline",
        "predict_finetuned",
        "evaluate",
        "predict_slide",
    } <= rules
    assert ("predict_slide", "sample=tiny_q") in jobs
    old = set(SAMPLES) | {PREDICT_SAMPLE}
    assert not any(f"sample={s}" in w.split(", ") for _, w in jobs for s in old)
    assert Path(tiny_run / "results" / "genes" / "gene_panel.tsv").exists()

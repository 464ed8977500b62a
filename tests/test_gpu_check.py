"""benchmarks/gpu_check.sh in its CPU mode (--device cpu --quick): every part but the workflow
(tests/test_workflow_e2e.py runs the tiny workflow end to end) runs and reports real figures, the
killed-and-resumed run ends bit-exact with the uninterrupted one, and the markdown section is made
from the JSON. Between GPU runs this keeps the GPU check working."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from _helpers import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def test_the_script_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_check")
    out, work = root / "out", root / "work"
    command = ["bash", str(SCRIPT), "--device", "cpu", "--quick", "--skip", "workflow", "--out", str(out)]
    result = subprocess.run(
        [*command, "--work", str(work)],
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text(), out


def positive(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_throughput_rows_hold_finite_positive_figures_and_the_full_loss(quick_run):
    results, _, _ = quick_run
    part = results["parts"]["throughput"]
    assert part["ok"], part.get("traceback")
    rows = part["result"]["rows"]
    assert [r["batch"] for r in rows] == [8, 16]
    for row in rows:
        assert positive(row["samples_per_s"]) and positive(row["step_s"]) and row["measured_steps"] == 4
        assert 0 <= row["data_wait"] < 1
        assert row["peak_memory_gib"] is None  # GPU memory only on CUDA
        last = row["loss_curve"][-1]
        assert last["step"] == 6 and positive(last["loss"]) and positive(last["loss_paat"]), "PAAT must be on"
    assert part["result"]["reached"]["samples_per_s"] is False  # 3,000 samples/s is a GPU target


def test_profile_counts_the_steps_operators(quick_run):
    results, _, _ = quick_run
    part = results["parts"]["profile"]
    assert part["ok"], part.get("traceback")
    profile = part["result"]
    assert profile["steps"] == 3 and positive(profile["wall_s_per_step"])
    assert profile["top_cpu"] and all(positive(op["ms_per_step"]) for op in profile["top_cpu"][:3])
    assert profile["syncs_per_step"] is None and profile["gpu_busy_fraction"] is None  # CUDA only


def test_killed_run_resumes_bit_exact_on_cpu(quick_run):
    results, _, _ = quick_run
    part = results["parts"]["resume"]
    assert part["ok"], part.get("traceback")
    resume = part["result"]
    assert 4 <= resume["killed_after_checkpoint_of_step"] < resume["steps"] == 8
    same = resume["resumed_vs_uninterrupted"]
    assert same["bit_exact"] and same["bit_exact_tensors"] == same["tensors"] > 50
    assert same["max_abs_diff"] == 0 and same["metrics_max_abs_diff"] == 0
    assert resume["uninterrupted_vs_repeat"] is None  # the repeat only measures CUDA's non-determinism
    assert resume["explanation"].startswith("bit-exact on cpu")


def test_markdown_section_comes_from_the_json_and_says_it_is_no_gpu_result(quick_run, tmp_path):
    results, text, out = quick_run
    assert text.startswith("## GPU check\n") and "CPU only: a check that the script works" in text
    for title in ("### Pretraining throughput", "### Profile of the training step", "### Kill and resume"):
        assert title in text
    assert "| 16 | " in text and "bit-exact on cpu" in text and "Not run: --skip." in text
    assert results["parts"]["workflow"] == {"ok": False, "skipped": "--skip"}
    # regenerated from the JSON alone: the same text; a CPU run is refused for BENCHMARKS.md
    script = REPO / "benchmarks" / "gpu_check.py"
    again = subprocess.run(
        [sys.executable, str(script), "--from-json", str(out / "gpu_check.json")], capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout == text
    benchmarks = tmp_path / "BENCHMARKS.md"
    refused = subprocess.run(
        [sys.executable, str(script), "--from-json", str(out / "gpu_check.json"), "--markdown", str(benchmarks)],
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0 and "this run was on cpu" in refused.stderr and not benchmarks.exists()

"""The shipped profiles: what they ask of the scheduler, resolved by Snakemake itself (dry run,
no cluster needed). The real-scheduler run is tests/test_slurm_e2e.py."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from _helpers.workflow import GPU_RULES, SAMPLES, snakemake_command, write_tiny_run_folder
from conftest import REPO, dry_run_jobs, rule_blocks

SLURM = REPO / "profiles" / "slurm" / "config.yaml"
LOCAL = REPO / "profiles" / "local" / "config.yaml"


def _rules_declaring_gpu() -> set[str]:
    return {name for _, name, block in rule_blocks() if re.search(r"^\s+gpu=1,", block, re.M)}


def test_gpu_rules_of_the_workflow_are_the_profiles_gpu_rules():
    assert _rules_declaring_gpu() == GPU_RULES


def test_slurm_profile_settings_a_facility_relies_on():
    profile = yaml.safe_load(SLURM.read_text())
    assert profile["executor"] == "slurm" and profile["software-deployment-method"] == "conda"
    assert profile["slurm-requeue"] is True and profile["rerun-incomplete"] is True
    assert profile["jobs"] >= 1 and profile["latency-wait"] >= 30
    defaults = profile["default-resources"]
    assert {"slurm_account", "slurm_partition", "mem_mb", "runtime"} <= set(defaults)
    for rule in GPU_RULES:
        res = profile["set-resources"][rule]
        assert res["slurm_partition"] != defaults["slurm_partition"] and res["gpu"] >= 1 and res["cpus_per_gpu"] >= 1
        assert res["mem_mb"] > 0 and res["runtime"] > 0
    for rule, res in profile["set-resources"].items():
        if rule not in GPU_RULES:
            assert "gpu" not in res and "slurm_partition" not in res, f"{rule} is a CPU rule"
    # one SLURM job per sample for ingest -> extract_patches (docs/cluster.md); no parallel members
    groups = dict(entry.split("=") for entry in profile["groups"])
    assert groups == {"ingest": "sample_prep", "extract_patches": "sample_prep"}
    assert "group-components" not in profile
    # every line a facility must edit says so
    for line in SLURM.read_text().splitlines():
        setting = line.split("#", 1)[0]
        if "slurm_account:" in setting or "slurm_partition:" in setting:
            assert "<-- SET" in line, line


def test_local_profile_runs_here_without_conda_or_scheduler():
    profile = yaml.safe_load(LOCAL.read_text())
    assert "executor" not in profile and "software-deployment-method" not in profile
    assert profile["cores"] >= 1


def _job_resources(dry_run_output: str) -> list[tuple[str, dict[str, str]]]:
    jobs = []
    for rule, block in dry_run_jobs(dry_run_output):
        res = re.search(r"^\s+resources: (.*)$", block, re.M)
        if res:
            jobs.append((rule, dict(kv.split("=", 1) for kv in res.group(1).split(", "))))
    return jobs


def test_slurm_profile_resolves_gpu_rules_to_the_gpu_partition(tmp_path):
    """Snakemake reads the shipped profile (all keys, plugin options included) and gives every
    GPU job the GPU partition and one GPU, every other job the CPU partition and none. Only the
    conda setting is dropped: conda is not installed here, and a dry run would ask it."""
    root = write_tiny_run_folder(tmp_path / "run")
    profile = yaml.safe_load(SLURM.read_text())
    profile.pop("software-deployment-method")
    (tmp_path / "profile").mkdir()
    (tmp_path / "profile" / "config.yaml").write_text(yaml.safe_dump(profile))
    result = subprocess.run(
        snakemake_command(root, "--profile", str(tmp_path / "profile"), "-n"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    jobs = _job_resources(result.stdout + result.stderr)
    # embed_foundation runs only with a foundation model's file, which the tiny config has none of
    # (tests/test_foundation_presets.py dry-runs it with one)
    assert {rule for rule, _ in jobs} >= (GPU_RULES - {"embed_foundation"}) | {"tile_slide", "evaluate"}
    # ingest and extract_patches of each sample with counts are one group job (listed as such)
    groups = re.findall(r"Group job sample_prep \(jobs in lexicogr. order\)", result.stdout + result.stderr)
    assert len(groups) == len(SAMPLES), result.stdout[-3000:]
    for rule, res in jobs:
        assert res["slurm_account"] == "CHANGE_ME", rule
        if rule in GPU_RULES:
            assert res["slurm_partition"] == "gpu" and res["gpu"] == "1" and "cpus_per_gpu" in res, (rule, res)
        else:
            assert res["slurm_partition"] == "cpu" and res.get("gpu", "0") == "0", (rule, res)
    assert Path(root / "results").exists() is False, "a dry run writes no result"

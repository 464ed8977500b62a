"""profiles/slurm proven on a real scheduler: a one-node SLURM cluster on localhost runs the tiny
synthetic workflow through `snakemake --profile`, and its results equal the local run's.

The cluster needs root and the Debian packages slurmctld, slurmd, slurm-client and munge, which
.ci/run installs. On a machine without them the tests skip, unless COMTIP_REQUIRE_SLURM=1 (set
by .ci/run), which turns the skip into a failure: in CI this test must run.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from _helpers.workflow import GPU_RULES, snakemake_command, write_tiny_run_folder
from compare_results import assert_same_results
from conftest import REPO
from slurm_localhost import ClusterError, LocalSlurm, missing_requirements

pytestmark = pytest.mark.e2e

PROFILE = REPO / "profiles" / "slurm" / "config.yaml"
OVERLAY = Path(__file__).with_name("slurm_overlay.yaml")
# What the SLURM run builds: a part of the tiny DAG in which every GPU rule, the per-sample job
# group and the ridge path run at least once (CoMTIP, BLEEP, mclSTExp, the fine-tuned head, the
# whole-slide prediction), and which leaves out the rules that only repeat those on other
# encoders (the ablation's pretraining, the random encoder, the other prediction rules) and the
# evaluation tables that need them all. The whole DAG through SLURM took ~15 of the CI's 37 min.
SLURM_TARGETS = (
    "results/predictions/tiny_b/ridge_comtip.h5ad",
    "results/predictions/tiny_b/bleep.h5ad",
    "results/predictions/tiny_b/mclstexp.h5ad",
    "results/predictions/tiny_b/finetune_linear.h5ad",
    "results/predictions/tiny_p/virtual_visium.h5ad",
)


def merge(base: dict, overlay: dict) -> dict:
    """``overlay`` over ``base``, key by key into nested mappings; a None value removes the key."""
    merged = dict(base)
    for key, value in overlay.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def test_overlay_merge_replaces_nested_keys_and_removes_nulls():
    base = {"a": 1, "r": {"x": {"gpu": 1, "mem": 9}, "y": {"mem": 2}}, "d": {"acct": "X", "p": "cpu"}}
    over = {"a": None, "r": {"x": {"gpu": 0}}, "d": {"acct": None}}
    assert merge(base, over) == {"r": {"x": {"gpu": 0, "mem": 9}, "y": {"mem": 2}}, "d": {"p": "cpu"}}


def test_overlay_asks_for_no_gpu_in_every_rule_the_profile_gives_one():
    """The test node has no GPU device: a rule left at the profile's gpu: 1 makes sbatch refuse
    the job ('Invalid generic resource (gres) specification'), as train_bleep once did."""
    profile = merge(yaml.safe_load(PROFILE.read_text()), yaml.safe_load(OVERLAY.read_text()))
    shipped = yaml.safe_load(PROFILE.read_text())["set-resources"]
    gpu_rules = {rule for rule, res in shipped.items() if int(res.get("gpu", 0)) > 0}
    assert gpu_rules >= {"pretrain", "train_bleep", "embed_bleep"}, gpu_rules
    assert gpu_rules == GPU_RULES, gpu_rules ^ GPU_RULES
    left = {rule for rule in gpu_rules if int(profile["set-resources"][rule].get("gpu", 0)) != 0}
    assert not left, f"slurm_overlay.yaml leaves a GPU request in {sorted(left)}"


def write_test_profile(folder: Path) -> Path:
    profile = merge(yaml.safe_load(PROFILE.read_text()), yaml.safe_load(OVERLAY.read_text()))
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return folder


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = missing_requirements()
    if missing:
        message = "no SLURM cluster can start here: " + "; ".join(missing)
        if os.environ.get("COMTIP_REQUIRE_SLURM") == "1":
            pytest.fail(message + " (COMTIP_REQUIRE_SLURM=1: .ci/run installs slurmctld slurmd slurm-client munge)")
        pytest.skip(message)
    slurm = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        slurm.start()
    except ClusterError as error:
        pytest.fail(str(error))
    yield slurm
    slurm.stop()


def run_snakemake(cluster: LocalSlurm, root: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = snakemake_command(root, "--profile", str(root / "profile"), *args)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=2400, env=cluster.env)


def slurm_job_logs(root: Path, tail: int = 40) -> str:
    parts = []
    for log in sorted((root / "logs" / "slurm").rglob("*.log")):
        lines = log.read_text(errors="replace").splitlines()
        if any("error" in line.lower() for line in lines):
            parts.append(f"== {log} ==\n" + "\n".join(lines[-tail:]))
    return "\n".join(parts[:5])


@pytest.fixture(scope="module")
def slurm_run(cluster, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    root = write_tiny_run_folder(tmp_path_factory.mktemp("slurm_run"))
    write_test_profile(root / "profile")
    result = run_snakemake(cluster, root, *SLURM_TARGETS)
    if result.returncode != 0:
        pytest.fail(
            f"snakemake --profile (slurm) failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
            f"{result.stderr[-6000:]}\n{slurm_job_logs(root)}\n{cluster.logs()}"
        )
    return root, result


def slurm_jobs(cluster: LocalSlurm) -> list[dict[str, str]]:
    """Every job the cluster has seen: id, partition, state, comment (the plugin writes the rule)."""
    out = subprocess.run(
        ["squeue", "--states=all", "-h", "-o", "%i|%P|%T|%k"],
        capture_output=True,
        text=True,
        env=cluster.env,
        check=True,
    ).stdout
    return [
        dict(zip(("id", "partition", "state", "comment"), line.split("|", 3), strict=True))
        for line in out.splitlines()
        if line.strip()
    ]


def test_every_job_ran_on_slurm_in_its_partition(cluster, slurm_run):
    root, result = slurm_run
    log = result.stdout + result.stderr
    submitted = re.findall(r"Job \S+ has been submitted with SLURM jobid (\d+)", log)  # group jobs: a uuid
    done = re.search(r"(\d+) of (\d+) steps \(100%\) done", log)
    assert done and submitted, log[-3000:]
    local = re.findall(r"^localrule (\w+):", log, re.M)
    assert local == [], local  # every job of the DAG goes to SLURM (files are the targets: no `all`)
    jobs = {j["id"]: j for j in slurm_jobs(cluster)}
    rules_seen: list[str] = []
    for jobid in submitted:
        job = jobs[jobid]
        assert job["state"] == "COMPLETED", job
        rule = re.match(r"rule_(\w+?)(_wildcards_.*)?$", job["comment"]).group(1)
        # a group job is named by its group and its rules: rule_sample_prep_extract_patches_ingest
        rule = "sample_prep" if rule.startswith("sample_prep_") else rule
        rules_seen.append(rule)
        expected = "gpu" if rule in GPU_RULES else "cpu"
        assert job["partition"] == expected, f"{rule} ran in {job['partition']}, the profile says {expected}"
    # every GPU rule of the tiny DAG (a foundation-model encoder has no weights file here), the
    # cohort-wide CPU rules and the ridge path
    tiny_gpu_rules = {"pretrain", "train_bleep", "train_mclstexp", "finetune", "embed_spots", "embed_bleep",
                      "embed_mclstexp", "predict_finetuned", "predict_slide"}  # fmt: skip
    assert tiny_gpu_rules <= GPU_RULES
    assert tiny_gpu_rules | {"fit_ridge", "predict_baseline", "select_genes"} <= set(rules_seen), set(rules_seen)
    # the profile's job groups: one SLURM job per sample with Space Ranger output for ingest ->
    # extract_patches, never one of those rules alone
    sheet = pd.read_csv(root / "config" / "samples.tsv", sep="\t", dtype=str).fillna("")
    with_counts = int((sheet["spaceranger_dir"] != "").sum())
    assert rules_seen.count("sample_prep") == with_counts, rules_seen
    assert not {"ingest", "extract_patches"} & set(rules_seen), rules_seen
    grouped_away = with_counts  # the jobs that rode along in another job's SLURM job
    assert len(submitted) == int(done.group(2)) - grouped_away, "every other job of the DAG is submitted"


def test_slurm_run_equals_the_local_run(slurm_run, tiny_run):
    """Same config and seed, run from scratch twice (here, and locally): every file the SLURM run
    made equals the local run's, and the SLURM run made every target."""
    root, _ = slurm_run
    assert all((root / target).is_file() for target in SLURM_TARGETS)
    assert_same_results(tiny_run, root, only_in_both=True)


def test_rerun_through_the_profile_has_nothing_to_do(cluster, slurm_run):
    root, _ = slurm_run
    result = run_snakemake(cluster, root, "-n", *SLURM_TARGETS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Nothing to be done" in result.stdout + result.stderr

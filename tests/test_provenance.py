"""Provenance records: config, sample sheet, package versions and git commit, per run."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import yaml

from comtip._core.provenance import finish_run_record, git_state, pinned_packages, start_run_record
from conftest import REPO


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


@pytest.fixture
def checkout(tmp_path):
    """A minimal pipeline checkout under git: pyproject with pins, one env file."""
    repo = tmp_path / "pipeline"
    (repo / "envs").mkdir(parents=True)
    (repo / "pyproject.toml").write_text(
        '[project]\nname = "x"\ndependencies = ["numpy==1.0", "pyyaml==6.0.3"]\n'
        '[project.optional-dependencies]\ntest = ["pytest==9.2.0"]\n'
    )
    (repo / "envs" / "torch.yaml").write_text("name: comtip-torch\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    return repo


@pytest.fixture
def run_inputs(tmp_path):
    sheet = tmp_path / "run" / "config" / "samples.tsv"
    sheet.parent.mkdir(parents=True)
    sheet.write_text("sample\tsplit\nA\ttrain\n")
    return {"samples": str(sheet), "seed": 3, "model": {"embed_dim": 64}}, sheet


def test_record_holds_config_sheet_versions_and_commit(checkout, run_inputs, tmp_path):
    config, sheet = run_inputs
    run_dir = start_run_record(
        tmp_path / "results", config, sample_sheet=sheet, pipeline_dir=checkout, argv=["snakemake", "--cores", "2"]
    )
    record = json.loads((run_dir / "run.json").read_text())
    head = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert record["git"] == {"commit": head.strip(), "dirty": False, "changed_files": []}
    assert record["status"] == "running" and record["finished_utc"] is None
    assert record["command"] == ["snakemake", "--cores", "2"] and record["seed"] == 3
    assert record["packages"]["numpy"] == np.__version__  # the installed version, not the pin
    assert record["packages"]["pytest"] is not None
    assert set(record["sha256"]) == {"config", "samples", "envs/torch.yaml"}
    assert yaml.safe_load((run_dir / "config.yaml").read_text()) == config
    assert (run_dir / "samples.tsv").read_bytes() == sheet.read_bytes()
    assert [p.name for p in run_dir.parent.iterdir()] == [run_dir.name], "no staging folder left"

    finished = finish_run_record(run_dir, "success")
    assert finished["status"] == "success" and finished["finished_utc"] >= record["started_utc"]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "success"


def test_each_run_adds_a_record_and_uncommitted_changes_are_flagged(checkout, run_inputs, tmp_path):
    config, sheet = run_inputs
    first = start_run_record(tmp_path / "results", config, sample_sheet=sheet, pipeline_dir=checkout, argv=[])
    (checkout / "envs" / "torch.yaml").write_text("name: comtip-torch\n# edited\n")
    second = start_run_record(tmp_path / "results", config, sample_sheet=sheet, pipeline_dir=checkout, argv=[])
    assert first != second and first.exists() and second.exists()
    state = json.loads((second / "run.json").read_text())["git"]
    assert state["dirty"] is True and state["changed_files"] == ["envs/torch.yaml"]
    hashes = [json.loads((d / "run.json").read_text())["sha256"]["envs/torch.yaml"] for d in (first, second)]
    assert hashes[0] != hashes[1]


def test_outside_git_the_commit_is_none_with_the_reason(tmp_path):
    state = git_state(tmp_path)
    assert state["commit"] is None and "not a git checkout" in state["reason"]


def test_missing_sample_sheet_writes_nothing(checkout, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.tsv"):
        start_run_record(tmp_path / "results", {}, sample_sheet=tmp_path / "nowhere.tsv", pipeline_dir=checkout)
    assert not (tmp_path / "results" / "provenance").exists() or not any(
        (tmp_path / "results" / "provenance").iterdir()
    )


def test_finish_refuses_an_unknown_status(checkout, run_inputs, tmp_path):
    config, sheet = run_inputs
    run_dir = start_run_record(tmp_path / "results", config, sample_sheet=sheet, pipeline_dir=checkout, argv=[])
    with pytest.raises(ValueError, match="status"):
        finish_run_record(run_dir, "done")


def test_pinned_packages_cover_the_project_dependencies():
    names = pinned_packages(REPO)
    assert {"torch", "timm", "snakemake", "scanpy", "snakemake-executor-plugin-slurm"} <= set(names)


@pytest.mark.e2e
def test_workflow_run_records_its_provenance(tiny_run):
    records = sorted((tiny_run / "results" / "provenance").iterdir())
    assert len(records) == 1, records
    record = json.loads((records[0] / "run.json").read_text())
    assert record["status"] == "success"
    assert record["working_dir"] == str(tiny_run.resolve())
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert record["git"]["commit"] == head.stdout.strip()
    used = yaml.safe_load((records[0] / "config.yaml").read_text())
    given = yaml.safe_load((tiny_run / "config" / "config.yaml").read_text())
    assert used["seed"] == given["seed"] and used["model"]["embed_dim"] == given["model"]["embed_dim"]
    assert "patches" in used and "size_px" in used["patches"], "schema defaults are recorded too"
    assert (records[0] / "samples.tsv").read_bytes() == (tiny_run / "config" / "samples.tsv").read_bytes()

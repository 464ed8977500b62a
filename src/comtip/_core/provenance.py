"""Provenance of each workflow run: what ran, on what, with which code and libraries.

Every ``snakemake`` invocation that has jobs to run writes ``results/provenance/{run_id}/``:

* ``run.json``: run id, start/end time (UTC), status (``running`` → ``success``/``failed``),
  command line, working folder, host, Python, git commit of the pipeline checkout (and whether
  it had uncommitted changes), versions of every pinned package, sha256 of the config, sample
  sheet and conda env files;
* ``config.yaml``: the configuration as the run used it (schema defaults filled in);
* ``samples.tsv``: a byte copy of the sample sheet.

Records are written atomically (a folder renamed into place, ``run.json`` replaced by rename)
and never overwritten: reruns add records, so ``results/provenance/`` is the history of how
``results/`` came to be. Versions are those of the environment Snakemake runs in; with
``--sdm conda`` the rules run in the envs of ``envs/``, whose files' hashes are recorded.
"""

from __future__ import annotations

import datetime
import getpass
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from comtip._core.atomic import atomic_path

# Installed next to the pinned dependencies when running on SLURM (not imported by the package).
EXTRA_PACKAGES = (
    "comtip-pipeline",
    "snakemake-executor-plugin-slurm",
    "snakemake-executor-plugin-slurm-jobstep",
    "pytest",
)


def _utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (also used by comtip.finetune)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_state(pipeline_dir: str | Path) -> dict:
    """Commit of the pipeline checkout and whether tracked files differ from it.

    ``commit`` is None, with the reason, when the folder is not a git checkout or git is absent.
    """
    try:
        commit = subprocess.run(
            ["git", "-C", str(pipeline_dir), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30
        )
    except (FileNotFoundError, subprocess.TimeoutExpired) as error:
        return {"commit": None, "reason": f"git not usable: {error}"}
    if commit.returncode != 0:
        return {"commit": None, "reason": f"not a git checkout: {commit.stderr.strip()}"}
    status = subprocess.run(
        ["git", "-C", str(pipeline_dir), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    changed = [line[3:] for line in status.stdout.splitlines() if line.strip()]
    return {"commit": commit.stdout.strip(), "dirty": bool(changed), "changed_files": changed}


def pinned_packages(pipeline_dir: str | Path) -> list[str]:
    """Names of pyproject's dependencies (all extras included), then the extra packages."""
    project = tomllib.loads((Path(pipeline_dir) / "pyproject.toml").read_text())["project"]
    specs = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        specs += extra
    names = [re.split(r"[=<>!~\[; ]", spec, maxsplit=1)[0].strip() for spec in specs]
    return list(dict.fromkeys(names + list(EXTRA_PACKAGES)))


def package_versions(names: Sequence[str]) -> dict[str, str | None]:
    """Installed version of each distribution, None where it is not installed."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def run_record(config: dict, *, sample_sheet: Path, pipeline_dir: Path, run_id: str, argv: Sequence[str]) -> dict:
    """The run's ``run.json``; ``config`` as plain YAML types (see :func:`_plain`)."""
    pipeline_dir = Path(pipeline_dir)
    return {
        "run_id": run_id,
        "status": "running",
        "started_utc": _utc_now(),
        "finished_utc": None,
        "command": list(argv),
        "working_dir": os.getcwd(),
        "host": socket.gethostname(),
        "user": getpass.getuser(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "pipeline_dir": str(pipeline_dir.resolve()),
        "git": git_state(pipeline_dir),
        "packages": package_versions(pinned_packages(pipeline_dir)),
        "seed": config.get("seed"),
        "sha256": {
            "config": hashlib.sha256(yaml.safe_dump(config, sort_keys=True).encode()).hexdigest(),
            "samples": file_sha256(sample_sheet),
            **{f"envs/{p.name}": file_sha256(p) for p in sorted((pipeline_dir / "envs").glob("*.yaml"))},
        },
    }


def start_run_record(
    results_dir: str | Path,
    config: Mapping,
    *,
    sample_sheet: str | Path,
    pipeline_dir: str | Path,
    argv: Sequence[str] | None = None,
) -> Path:
    """Write ``results_dir/provenance/{run_id}/`` (status ``running``); returns that folder."""
    sample_sheet = Path(sample_sheet)
    if not sample_sheet.is_file():
        raise FileNotFoundError(f"sample sheet {sample_sheet.absolute()} does not exist")
    base = Path(results_dir) / "provenance"
    base.mkdir(parents=True, exist_ok=True)
    run_id = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)
    config = _plain(config)
    record = run_record(
        config,
        sample_sheet=sample_sheet,
        pipeline_dir=Path(pipeline_dir),
        run_id=run_id,
        argv=sys.argv if argv is None else argv,
    )
    staging = base / f".{run_id}.tmp"
    staging.mkdir()
    try:
        (staging / "run.json").write_text(json.dumps(record, indent=2) + "\n")
        (staging / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        shutil.copyfile(sample_sheet, staging / "samples.tsv")
        staging.rename(base / run_id)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return base / run_id


def finish_run_record(run_dir: str | Path, status: str) -> dict:
    """Set the record's status (``success`` or ``failed``) and end time."""
    if status not in ("success", "failed"):
        raise ValueError(f"status must be 'success' or 'failed', got {status!r}")
    path = Path(run_dir) / "run.json"
    record = json.loads(path.read_text())
    record.update(status=status, finished_utc=_utc_now())
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(record, indent=2) + "\n")
    return record


def _plain(value):
    """Config as plain YAML types (Snakemake's config may hold its own mapping types)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value

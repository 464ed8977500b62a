"""Conda env files: they parse, every rule names one, their pins agree with pyproject, and each
env installs the comtip package (its post-deploy script, run here in a fresh venv)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from conftest import REPO, rule_blocks

ENVS = sorted((REPO / "envs").glob("*.yaml"))


def _pyproject_pins() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        specs += extra
    pins = {}
    for spec in specs:
        name, _, version = spec.partition("==")
        assert version, f"pyproject dependency {spec!r} is not pinned with =="
        pins[name.strip().lower()] = version.strip()
    return pins


def _env_pins(env: dict) -> dict[str, str]:
    """Pins of the env's pip section; conda packages other than python and pip are refused,
    so that conda and pip users run the same builds."""
    pins = {}
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            for spec in dep.get("pip", []):
                name, _, version = spec.partition("==")
                assert version, f"pip entry {spec!r} is not pinned with =="
                pins[name.strip().lower()] = version.strip()
        else:
            name = re.split(r"[=<>]", dep)[0].strip()
            assert name in {"python", "pip", "setuptools"}, (
                f"conda package {dep!r}: list it under pip: with the pyproject pin"
            )
    return pins


def test_there_are_env_files():
    assert ENVS, "envs/ holds no conda env file"


@pytest.mark.parametrize("path", ENVS, ids=lambda p: p.name)
def test_env_parses_and_pins_agree_with_pyproject(path):
    env = yaml.safe_load(path.read_text())
    assert env["name"].startswith("comtip-")
    assert "conda-forge" in env["channels"]
    assert any(isinstance(d, str) and d.startswith("python=3.11") for d in env["dependencies"])
    pins, project = _env_pins(env), _pyproject_pins()
    assert pins, f"{path.name} pins nothing"
    for name, version in pins.items():
        assert name in project, f"{path.name}: {name} is not a pyproject dependency"
        assert version == project[name], f"{path.name}: {name}=={version}, pyproject has {project[name]}"


def test_every_rule_has_conda_log_benchmark_threads_resources():
    rules = list(rule_blocks())
    assert rules, "no rule found under workflow/rules"
    for smk, name, block in rules:
        for key in ("log:", "benchmark:", "threads:", "resources:", "conda:"):
            assert f"    {key}" in block, f"{smk.name}: rule {name} has no {key}"
        env = re.search(r'conda:\s*\n\s*"([^"]+)"', block).group(1)
        assert (smk.parent / env).resolve().exists(), f"{smk.name}: rule {name} names missing env {env}"


@pytest.mark.parametrize("path", ENVS, ids=lambda p: p.name)
def test_env_can_build_the_package(path):
    """setuptools in the env satisfies pyproject's build requirement (editable, no isolation)."""
    env = yaml.safe_load(path.read_text())
    build = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
    assert build == ["setuptools>=68"], "update the env files' setuptools when the build backend changes"
    assert "setuptools>=70.1" in env["dependencies"], f"{path.name}: needs setuptools>=70.1 (PEP 660 without wheel)"


@pytest.mark.parametrize("path", ENVS, ids=lambda p: p.name)
def test_every_env_has_a_post_deploy_script_that_installs_the_package(path):
    script = path.with_name(path.stem + ".post-deploy.sh")
    assert script.exists(), f"{script.name} missing: the env would not contain the comtip package"
    text = script.read_text()
    assert "pip install --no-deps" in text and '-e "$COMTIP_PIPELINE_DIR"' in text
    assert "set -euo pipefail" in text


def test_snakefile_tells_the_post_deploy_scripts_where_the_checkout_is(monkeypatch, tmp_path):
    from comtip._core.runtime import PIPELINE_DIR_VARIABLE, export_pipeline_dir

    assert "export_pipeline_dir(workflow.basedir)" in (REPO / "Snakefile").read_text()
    assert all(f'"${{{PIPELINE_DIR_VARIABLE}' in p.read_text() for p in (REPO / "envs").glob("*.post-deploy.sh"))
    monkeypatch.delenv(PIPELINE_DIR_VARIABLE, raising=False)
    export_pipeline_dir(tmp_path / "." / "checkout")
    assert os.environ[PIPELINE_DIR_VARIABLE] == str((tmp_path / "checkout").resolve())


def test_post_deploy_script_installs_the_package_into_a_fresh_environment(tmp_path):
    """What Snakemake does after creating an env, with a venv standing in for the conda env
    (same python + pip + setuptools>=70.1, no comtip): afterwards the env imports this checkout's
    package from any folder."""
    venv = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    python = venv / "bin" / "python"
    setup = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "setuptools>=70.1"], capture_output=True, text=True
    )
    if setup.returncode != 0:
        pytest.skip(f"cannot install setuptools into a fresh venv here (no package index?): {setup.stderr[-500:]}")
    script = REPO / "envs" / "torch.post-deploy.sh"
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", "COMTIP_PIPELINE_DIR": str(REPO)}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    where = subprocess.run(
        [str(python), "-c", "import comtip; print(comtip.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).resolve() == (REPO / "src" / "comtip" / "__init__.py").resolve()


def test_post_deploy_script_without_the_checkout_variable_fails_clearly(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "COMTIP_PIPELINE_DIR"}
    result = subprocess.run(
        ["bash", str(REPO / "envs" / "imaging.post-deploy.sh")], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert result.returncode != 0 and "COMTIP_PIPELINE_DIR" in result.stderr


def test_report_dependency_is_a_core_dependency_not_only_a_test_one():
    """`snakemake --report report.html` is a README step after a plain `pip install -e .`; it
    needs pygments, which only pytest pulled in before (found by running the README from a
    fresh clone)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = {spec.partition("==")[0].strip().lower() for spec in project["dependencies"]}
    assert "pygments" in core

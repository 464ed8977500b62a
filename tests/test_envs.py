"""Conda env files: they parse, every rule names one, and their pins agree with pyproject."""

from __future__ import annotations

import re
import tomllib

import pytest
import yaml

from conftest import REPO

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
            assert name in {"python", "pip"}, f"conda package {dep!r}: list it under pip: with the pyproject pin"
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
    for smk in (REPO / "workflow" / "rules").glob("*.smk"):
        text = smk.read_text()
        for block in re.split(r"\n(?=rule \w+:)", text):
            if not block.startswith("rule "):
                continue
            name = block.split(":")[0]
            for key in ("log:", "benchmark:", "threads:", "resources:", "conda:"):
                assert f"    {key}" in block, f"{smk.name}: {name} has no {key}"
            env = re.search(r'conda:\s*\n\s*"([^"]+)"', block).group(1)
            assert (smk.parent / env).resolve().exists(), f"{smk.name}: {name} names missing env {env}"

"""Style and shape of the code: ruff (lint + format) and snakefmt are clean, the package's
subpackages import only from the stages below them, and no module passes 400 lines."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "src" / "comtip"
# Each stage may import the stages listed before it (docs/architecture.md); config and demo sit
# on _core alone.
ORDER = ("_core", "io", "data", "model", "training", "finetune", "baselines", "predict", "evaluation", "export")
ALLOWED = {stage: set(ORDER[:i]) for i, stage in enumerate(ORDER)} | {"config": {"_core"}, "demo": {"_core"}}
MAX_LINES = 400


def _tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "command",
    [
        ("ruff", "check", "."),
        ("ruff", "format", "--check", "."),
        ("snakefmt", "--check", "Snakefile", "workflow/rules"),
    ],
    ids=["ruff-check", "ruff-format", "snakefmt"],
)
def test_formatter_and_linter_are_clean(command):
    result = _tool(*command)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]


def _stage(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def _imported_stages(path: Path) -> set[str]:
    stages = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = (
            [node.module]
            if isinstance(node, ast.ImportFrom) and node.module and not node.level
            else [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else []
        )
        for name in names:
            parts = name.split(".")
            if parts[0] == "comtip" and len(parts) > 1:
                stages.add(parts[1])
    return stages


def test_every_stage_imports_only_the_stages_below_it():
    offences = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent == PACKAGE and path.name == "__init__.py":
            continue
        stage = _stage(path)
        assert stage in ALLOWED, f"{path}: stage {stage!r} is not in the map of docs/architecture.md"
        bad = _imported_stages(path) - ALLOWED[stage] - {stage}
        if bad:
            offences.append(f"{path.relative_to(REPO)} ({stage}) imports {sorted(bad)}")
    assert not offences, "\n".join(offences)


def test_the_import_rule_sees_a_violation(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("from comtip.predict.registry import METHODS\nimport comtip.training.loop\n")
    assert _imported_stages(module) == {"predict", "training"}


def test_no_module_passes_the_size_limit():
    long = [
        f"{p.relative_to(REPO)}: {n} lines"
        for p in sorted(PACKAGE.rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    ]
    assert not long, "\n".join(long)

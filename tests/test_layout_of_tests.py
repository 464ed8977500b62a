"""The test suite's own layout: no test module imports another one. Shared helpers live in
tests/_helpers/, shared fixtures in conftest.py; a test module importing another would run (or
re-collect) that module's fixtures and tests in the wrong place and tie unrelated tests together."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def imported_test_modules(source: str) -> list[str]:
    """Names of the ``test_*`` modules that ``source`` imports (anywhere: top level, functions)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            # `from test_x import y`, `from pkg.test_x import y`; `from . import test_x` names it in the aliases
            names = [node.module] if node.module else []
            if node.level:
                names += [alias.name for alias in node.names]
        else:
            continue
        found += [name for name in names if any(part.startswith("test_") for part in name.split("."))]
    return found


def modules_to_check() -> list[Path]:
    """Every test module, conftest.py and the helper modules (they must not import tests either)."""
    return sorted(
        {
            *TESTS.glob("test_*.py"),
            TESTS / "conftest.py",
            *TESTS.glob("_helpers/*.py"),
            *(p for p in TESTS.glob("*.py") if not p.name.startswith("test_")),
        }
    )


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from test_train import TINY_MODEL", ["test_train"]),
        ("import test_slide", ["test_slide"]),
        ("import numpy, test_slide as ts", ["test_slide"]),
        ("def f():\n    from test_workflow_e2e import snakemake\n", ["test_workflow_e2e"]),
        ("from . import test_profiles", ["test_profiles"]),
        ("from tests.test_finetune import GENES", ["tests.test_finetune"]),
        ("from _helpers.workflow import snakemake\nfrom conftest import REPO\nimport pytest", []),
        ("from comtip.training import pretrain\nimport testing_tools", []),
    ],
    ids=["from", "import", "import-as", "in-a-function", "relative", "dotted", "helpers-ok", "test-prefix-ok"],
)
def test_the_check_finds_imports_of_test_modules(source, expected):
    assert imported_test_modules(source) == expected


def test_the_check_sees_every_test_module_and_conftest():
    names = {p.name for p in modules_to_check()}
    assert {"conftest.py", "test_workflow_e2e.py", "test_layout_of_tests.py", "workflow.py"} <= names
    assert len([n for n in names if n.startswith("test_")]) >= 30


def test_no_test_module_imports_another_test_module():
    offenders = {
        str(p.relative_to(TESTS)): found for p in modules_to_check() if (found := imported_test_modules(p.read_text()))
    }
    assert not offenders, (
        f"test modules import test modules: {offenders}; move what they share into "
        "tests/_helpers/ (plain functions, constants) or tests/conftest.py (fixtures)"
    )

"""`snakemake --lint` stays clean (rules have log, benchmark, conda, no absolute paths, ...)."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_snakemake_lint_is_clean():
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--lint", "--cores", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "Congratulations, your workflow is in a good condition!" in output, output[-4000:]

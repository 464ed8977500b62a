"""Shared by the benchmark scripts: write one section of BENCHMARKS.md, leaving the others alone."""

from __future__ import annotations

import re
from pathlib import Path


def write_section(path: Path, section: str, text: str) -> None:
    """Add or replace the section headed ``section`` (a ``## `` line) in ``path`` (created with a
    title when missing) with ``text``."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text + "\n", old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    path.write_text(new)

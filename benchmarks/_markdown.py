"""Shared by the benchmark scripts: write one section of BENCHMARKS.md, leaving the others alone."""

from __future__ import annotations

import re
from pathlib import Path


def _level(heading: str) -> int:
    match = re.match(r"(#{2,6}) ", heading)
    if not match:
        raise ValueError(f"section must be a '## ' to '###### ' heading line, got {heading!r}")
    return len(match.group(1))


def _section_pattern(heading: str) -> re.Pattern:
    """The heading line and everything up to the next heading of the same or a higher level
    (``#`` titles and code-block comments are not headings here), or the end of the file."""
    return re.compile(rf"^{re.escape(heading)}\n.*?(?=^#{{2,{_level(heading)}}} |\Z)", re.S | re.M)


def write_section(path: Path, section: str, text: str, *, parent: str | None = None) -> None:
    """Add or replace the section headed ``section`` (a ``## `` line, or deeper) in ``path``
    (created with a title when missing) with ``text``.

    A new section goes at the end of the file, or, with ``parent`` (a higher-level heading such as
    ``## Prediction quality``), at the end of that section, which is added at the end of the file
    first when missing. Subsections of a replaced section are replaced with it."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = _section_pattern(section)
    if pattern.search(old):
        new = pattern.sub(lambda _: text.rstrip("\n") + "\n\n", old, count=1)
    elif parent is not None:
        if _level(parent) >= _level(section):
            raise ValueError(f"parent {parent!r} must be a higher-level heading than {section!r}")
        parent_pattern = _section_pattern(parent)
        if not parent_pattern.search(old):
            old = old.rstrip("\n") + "\n\n" + parent + "\n"
        new = parent_pattern.sub(lambda m: m.group(0).rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n\n", old, count=1)
    else:
        new = old.rstrip("\n") + "\n\n" + text
    path.write_text(new.rstrip("\n") + "\n")


def head_commit(repo: Path, *, mark_dirty: bool = False) -> str:
    """The short hash of ``repo``'s HEAD, for the provenance line of a section (from the run
    record's :func:`comtip._core.provenance.git_state`); with ``mark_dirty``, "+dirty" appended
    when tracked files have uncommitted changes."""
    from comtip._core.provenance import git_state

    state = git_state(repo)
    if state["commit"] is None:
        return f"unknown ({state['reason']})"
    return state["commit"][:7] + ("+dirty" if mark_dirty and state["dirty"] else "")

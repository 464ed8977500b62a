"""Shared by the benchmark scripts that compare this checkout with a peer commit in the same run:
the checkouts (with ``--peer-ref``, a ``git worktree`` of the peer, removed afterwards) and the
one-liner that measures a child process's wall time and peak RSS."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

# argv[1:] is the command to measure; prints "seconds peak_rss_kb returncode" and writes the
# command's stdout to stderr (with its stderr tail when it failed)
MEASURE = (
    "import resource, subprocess, sys, time; t = time.perf_counter(); "
    "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
    "dt = time.perf_counter() - t; "
    "print(dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode); "
    "sys.stderr.write(r.stdout[-3000:] + r.stderr[-3000:] if r.returncode else r.stdout)"
)


@contextlib.contextmanager
def checkouts(repo: Path, peer_ref: str | None, tmp: Path) -> Iterator[dict[str, Path]]:
    """``{"this checkout": repo}``, plus ``{"peer REF": worktree}`` when ``peer_ref`` is given."""
    found = {"this checkout": repo}
    if peer_ref is None:
        yield found
        return
    peer = tmp / "peer"
    subprocess.run(
        ["git", "-C", str(repo), "worktree", "add", "--detach", str(peer), peer_ref], check=True, capture_output=True
    )
    try:
        yield {**found, f"peer {peer_ref}": peer}
    finally:
        subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(peer)], check=False)
        shutil.rmtree(peer, ignore_errors=True)

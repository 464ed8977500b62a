"""Atomic outputs: write to a temporary file beside the target, rename only on success.

A job that is killed or fails leaves no file that looks complete; the temporary file is
removed on error (a hard kill may leave a ``.tmp-`` file, which never has the final name).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def _tmp_name(path: Path) -> Path:
    # Keep the suffix(es) so writers that infer the format from the name still work.
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{''.join(path.suffixes[-1:])}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it is renamed onto ``path``."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(final)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_paths(*paths: str | os.PathLike) -> Iterator[list[Path]]:
    """Like :func:`atomic_path` for several outputs that must appear together or not at all."""
    finals = [Path(p) for p in paths]
    tmps = []
    try:
        for final in finals:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmps.append(_tmp_name(final))
        yield tmps
        for tmp, final in zip(tmps, finals, strict=True):
            os.replace(tmp, final)
    except BaseException:
        for tmp in tmps:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Like :func:`atomic_path` for an output that is a folder (a ``.zarr`` store): the
    temporary folder (not created: the writer makes it) is renamed onto ``path`` on success,
    replacing a previous one, and removed with its contents on error."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(final)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

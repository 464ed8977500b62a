"""Row access to an (N, ...) array that may be larger than a job's memory: the training reference
of the prediction methods (800,000 spots at cohort scale).

:class:`Rows` wraps an array in memory or a member of an uncompressed ``.npz``
(:func:`open_rows`). A mapped member is read with ``preadv`` (:func:`comtip._core.npzmap.read_rows`)
and never indexed through the mapping: touched pages of a mapping count in the process's RSS
(and in Snakemake's ``max_rss``), pages read with ``preadv`` only in the shared page cache. A
caller reads row ranges (:meth:`Rows.read`, :meth:`Rows.chunks`), chosen rows (:meth:`Rows.take`)
or all rows of a few columns (:meth:`Rows.columns`), so its memory is what it asks for.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from comtip._core.npzmap import open_npz, read_rows

CHUNK_BYTES = 32 * 2**20  # rows per read of chunks() / columns(): about this many bytes


class Rows:
    """Rows of ``array`` (an ndarray, or a C-ordered memory map read through ``fd``)."""

    def __init__(self, array: np.ndarray, fd: int | None = None):
        if np.ndim(array) < 1:
            raise ValueError(f"need an array with rows, got shape {np.shape(array)}")
        self._array = array if isinstance(array, np.memmap) else np.asarray(array)
        self._fd = fd if isinstance(array, np.memmap) else None

    @property
    def shape(self) -> tuple[int, ...]:
        return self._array.shape

    @property
    def dtype(self) -> np.dtype:
        return self._array.dtype

    @property
    def ndim(self) -> int:
        return self._array.ndim

    def __len__(self) -> int:
        return self._array.shape[0]

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Rows ``lo:hi`` (one read for a mapped member)."""
        if self._fd is None:
            return self._array[lo:hi]
        return read_rows(self._array, np.arange(lo, min(hi, len(self))), self._fd)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """``array[rows]`` (runs of consecutive rows in one read)."""
        return read_rows(self._array, np.asarray(rows, dtype=np.int64), self._fd)

    def chunk_rows(self, nbytes: int = CHUNK_BYTES) -> int:
        row = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        return max(1, nbytes // max(row, 1))

    def chunks(self, size: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """``(lo, rows lo:lo+size)`` over all rows, ``size`` rows of about :data:`CHUNK_BYTES` by default."""
        size = size or self.chunk_rows()
        for lo in range(0, len(self), size):
            yield lo, self.read(lo, lo + size)

    def columns(self, lo: int, hi: int, dtype: np.dtype | type | None = None) -> np.ndarray:
        """All rows of columns ``lo:hi`` of a 2-D array, (N, hi - lo) C-ordered, in ``dtype``."""
        if self.ndim != 2:
            raise ValueError(f"columns() needs a 2-D array, got shape {self.shape}")
        out = np.empty((len(self), len(range(*slice(lo, hi).indices(self.shape[1])))), dtype or self.dtype)
        for start, chunk in self.chunks():
            out[start : start + len(chunk)] = chunk[:, lo:hi]
        return out


def as_rows(array: np.ndarray | Rows) -> Rows:
    """``array`` as :class:`Rows` (itself if it already is)."""
    return array if isinstance(array, Rows) else Rows(array)


def open_rows(path: str | Path, key: str) -> Rows:
    """Member ``key`` of the ``.npz`` at ``path`` as :class:`Rows`: read with ``preadv`` when it is
    stored uncompressed, in memory otherwise (:func:`comtip._core.npzmap.open_npz`). The file
    descriptor is closed when the :class:`Rows` is garbage-collected."""
    array = open_npz(path)[key]
    if not isinstance(array, np.memmap):
        return Rows(array)
    fd = os.open(path, os.O_RDONLY)
    rows = Rows(array, fd)
    weakref.finalize(rows, os.close, fd)
    return rows

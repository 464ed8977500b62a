"""Memory-mapped members of an uncompressed ``.npz`` (what ``np.savez`` writes).

``np.load`` of an ``.npz`` reads (and decompresses) a whole member into the process's memory
each time it is accessed. A member stored without compression is a plain ``.npy`` file at a known
offset inside the zip, so it can be memory-mapped like one: the pages come from the page cache,
only what is touched is read, and every process of a node that maps the same file shares them.
This is what keeps the pretraining data path's memory flat in the cohort's size
(``comtip.training.data``).

A compressed member (``np.savez_compressed``: files written by earlier versions of the pipeline)
cannot be mapped; :func:`open_npz` reads it into memory instead and says so in the log, with the
rule to rerun, so the result is the same and only the memory differs.
"""

from __future__ import annotations

import logging
import os
import struct
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # zip local file header, 30 bytes
_LOCAL_MAGIC = b"PK\x03\x04"


def _member_offset(path: Path, info: zipfile.ZipInfo) -> int:
    """Byte offset of a stored member's data: after its local header, name and extra field
    (whose lengths may differ from the central directory's, so they are read here)."""
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        header = _LOCAL_HEADER.unpack(fh.read(_LOCAL_HEADER.size))
    if header[0] != _LOCAL_MAGIC:
        raise ValueError(f"{path}: member {info.filename} has no zip local header at {info.header_offset}")
    name_len, extra_len = header[-2], header[-1]
    return info.header_offset + _LOCAL_HEADER.size + name_len + extra_len


def _map_npy(path: Path, offset: int) -> np.ndarray:
    with open(path, "rb") as fh:
        fh.seek(offset)
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            raise ValueError(f"{path}: .npy format {version} inside the .npz is not supported for mapping")
        data_offset = fh.tell()
    if dtype.hasobject:
        raise ValueError(f"{path}: a member holds Python objects; it cannot be memory-mapped")
    if int(np.prod(shape)) == 0:
        return np.empty(shape, dtype, order="F" if fortran else "C")
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, order="F" if fortran else "C", offset=data_offset)


class MappedNpz(Mapping[str, np.ndarray]):
    """Read-only mapping key → array of one ``.npz``: stored members memory-mapped, compressed
    ones read into memory (logged once per file). Arrays are opened on first access and kept."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with zipfile.ZipFile(self.path) as zf:
            self._infos = {
                info.filename[: -len(".npy")]: info for info in zf.infolist() if info.filename.endswith(".npy")
            }
        self._arrays: dict[str, np.ndarray] = {}
        self._warned = False

    @property
    def compressed(self) -> bool:
        return any(info.compress_type != zipfile.ZIP_STORED for info in self._infos.values())

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._arrays:
            info = self._infos[key]  # KeyError for an absent member, as np.load's NpzFile
            if info.compress_type == zipfile.ZIP_STORED:
                self._arrays[key] = _map_npy(self.path, _member_offset(self.path, info))
            else:
                if not self._warned:
                    log.warning(
                        "%s is compressed (written by an earlier version): its arrays are read into memory "
                        "instead of memory-mapped; delete it and rerun the rule that writes it to map it",
                        self.path,
                    )
                    self._warned = True
                with np.load(self.path) as npz:
                    self._arrays[key] = npz[key]
        return self._arrays[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)


def open_npz(path: str | Path) -> MappedNpz:
    """The members of ``path`` as arrays, memory-mapped where stored uncompressed."""
    return MappedNpz(path)


def read_rows(array: np.ndarray, rows: np.ndarray, fd: int | None) -> np.ndarray:
    """``array[rows]`` for a C-ordered memory map, read with ``preadv`` from ``fd`` (the mapped
    file) instead of through the mapping: the pages go to the page cache, shared by every
    process that reads the file, but not into this process's RSS, which would otherwise grow
    with every row ever touched (read-around included). Runs of consecutive rows are one read.
    Other arrays (or no ``preadv``) are indexed as usual."""
    rows = np.asarray(rows, dtype=np.int64)
    if fd is None or not hasattr(os, "preadv") or not isinstance(array, np.memmap) or not array.flags.c_contiguous:
        return np.asarray(array[rows])
    out = np.empty((len(rows), *array.shape[1:]), array.dtype)
    row_bytes = out[0].nbytes if len(out) else 0
    if row_bytes == 0:
        return out
    starts = np.flatnonzero(np.diff(rows, prepend=-2) != 1)  # first position of each run
    ends = np.append(starts[1:], len(rows))
    for lo, hi in zip(starts.tolist(), ends.tolist(), strict=True):
        got = os.preadv(fd, [out[lo:hi]], array.offset + int(rows[lo]) * row_bytes)
        if got != (hi - lo) * row_bytes:
            raise OSError(f"short read: {got} of {(hi - lo) * row_bytes} bytes at row {int(rows[lo])}")
    return out


def member_header(path: str | Path, key: str) -> tuple[tuple[int, ...], np.dtype, bool]:
    """``(shape, dtype, fortran_order)`` of member ``key`` of an ``.npz``, from its ``.npy`` header
    alone (compressed or not): nothing of the array is read."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as fh:
        version = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(fh)
    return tuple(shape), dtype, bool(fortran)


def copy_member_data(path: str | Path, key: str, out, nbytes: int = 16 * 2**20) -> None:
    """Append the data bytes of member ``key`` (a C-ordered ``.npy`` inside the ``.npz``) to the
    writable binary ``out``, ``nbytes`` at a time: memory O(nbytes), whatever the array's size."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as fh:
        version = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        read(fh)
        while block := fh.read(nbytes):
            out.write(block)


class NpzWriter:
    """An uncompressed ``.npz`` (as ``np.savez`` writes it: ``key.npy`` members, ZIP_STORED, zip64)
    written one member at a time, and each member in pieces: :meth:`member` writes the ``.npy``
    header of the whole array and returns the open member, to which the caller appends the
    array's bytes in C order (the rows of one sample after another). Memory O(one piece)."""

    def __init__(self, path: str | Path):
        self._zip = zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True)

    def member(self, key: str, shape: tuple[int, ...], dtype: np.dtype):
        fh = self._zip.open(f"{key}.npy", "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
        try:
            np.lib.format.write_array_header_1_0(fh, header)
        except ValueError:  # a header too long for format 1.0
            np.lib.format.write_array_header_2_0(fh, header)
        return fh

    def write(self, key: str, array: np.ndarray) -> None:
        """A whole (small) array as one member."""
        array = np.ascontiguousarray(array)
        with self.member(key, array.shape, array.dtype) as fh:
            fh.write(array.data if array.size else b"")

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> NpzWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""Give freed heap memory back to the operating system between the samples of a long loop.

glibc's malloc keeps freed small and medium blocks (below its mmap threshold, which grows up to
32 MB as larger blocks are freed) in its arenas. A loop that allocates and frees a sample's
arrays again and again (the end-of-pretraining retrieval over every training sample) leaves the
process's resident size growing with the number of samples although nothing is retained:
measured at 94 training samples, 1.81 GB peak against 1.05 GB with the threshold held low
(BENCHMARKS.md, "Cohort scale"). ``malloc_trim(0)`` returns the free pages; on a C library
without it (musl, macOS) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_freed_memory() -> bool:
    """Return the C heap's free pages to the OS; True when the C library could (glibc)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True

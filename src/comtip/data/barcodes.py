"""Where two barcode lists part ways: for error messages that point at the first difference."""

from __future__ import annotations

import numpy as np


def first_mismatch(a: np.ndarray, b: np.ndarray) -> int:
    """Index of the first position where ``a`` and ``b`` differ (the shorter length if one is a
    prefix of the other)."""
    n = min(len(a), len(b))
    differs = np.flatnonzero(a[:n] != b[:n])
    return int(differs[0]) if len(differs) else n


def value_at(values: np.ndarray, i: int) -> str | None:
    """``values[i]`` as text, or None past the end."""
    return str(values[i]) if i < len(values) else None

"""Seeds: every random choice of the pipeline derives from the config seed through here."""

from __future__ import annotations

import numpy as np


def derive_seed(seed: int, stream: int, *keys: int) -> int:
    """A 63-bit seed from the config seed, a stream id and integer keys (step, rank, epoch)."""
    state = np.random.SeedSequence([seed, stream, *keys]).generate_state(1, dtype=np.uint64)[0]
    return int(state) >> 1

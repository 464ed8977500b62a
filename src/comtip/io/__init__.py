"""Readers of what facilities bring: whole-slide images (``slide``, ``readers``) and Space Ranger
output (``layout``: where the files are, standard library only; ``spaceranger``: reading them).
"""

# Names resolve on first use (comtip._core.lazy): the workflow parse imports ``layout`` alone.
from __future__ import annotations

from comtip._core.lazy import lazy_exports

_EXPORTS = {
    "spaceranger_files": "comtip.io.layout",
    "Slide": "comtip.io.slide",
    "check_positive": "comtip.io.slide",
    "resolve_mpp": "comtip.io.slide",
    "open_slide": "comtip.io.readers",
    "read_spaceranger": "comtip.io.spaceranger",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

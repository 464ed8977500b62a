"""Published methods trained as themselves, on the pipeline's data and budget (not heads on
CoMTIP's embeddings): BLEEP (``bleep_config``, ``bleep_model``, ``bleep_train``, ``bleep_embed``)
and mclSTExp (``mclstexp_config``, ``mclstexp_model``, ``mclstexp_train``, ``mclstexp_embed``; its
image side and loss are BLEEP's, its trainer BLEEP's with other hooks).
Their predictions are methods of the registry (``comtip.predict.registry``)."""

# Names resolve on first use (comtip._core.lazy): importing the config does not import torch.
from __future__ import annotations

from comtip._core.lazy import lazy_exports

_EXPORTS = {
    "BleepConfig": "comtip.baselines.bleep_config",
    "BLEEP": "comtip.baselines.bleep_model",
    "ProjectionHead": "comtip.baselines.bleep_model",
    "bleep_loss": "comtip.baselines.bleep_model",
    "train_bleep": "comtip.baselines.bleep_train",
    "embed_bleep_sample": "comtip.baselines.bleep_embed",
    "load_bleep": "comtip.baselines.bleep_embed",
    "MclstexpConfig": "comtip.baselines.mclstexp_config",
    "MclSTExp": "comtip.baselines.mclstexp_model",
    "train_mclstexp": "comtip.baselines.mclstexp_train",
    "embed_mclstexp_sample": "comtip.baselines.mclstexp_embed",
    "load_mclstexp": "comtip.baselines.mclstexp_embed",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

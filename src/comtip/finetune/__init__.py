"""Fine-tuning: an expression head on the pretrained image encoder (linear probe or full
fine-tune), trained on the training slides with early stopping on the validation slides, and
its predictions. Design: ``docs/prediction.md``.

``config`` is torch-free (the workflow checks the ``finetune`` key when it parses); ``head``
holds the model, ``data`` the samples, ``train`` the loop, ``predict`` the fine-tuned predictor.
"""

# Names resolve on first use (comtip._core.lazy): importing the config does not import torch.
from __future__ import annotations

from comtip._core.lazy import lazy_exports

_EXPORTS = {
    "FinetuneConfig": "comtip.finetune.config",
    "MODES": "comtip.finetune.config",
    "ExpressionHead": "comtip.finetune.head",
    "build_vit": "comtip.finetune.head",
    "pooled_features": "comtip.finetune.head",
    "ExpressionData": "comtip.finetune.data",
    "load_samples": "comtip.finetune.data",
    "METRIC_COLUMNS": "comtip.finetune.train",
    "finetune": "comtip.finetune.train",
    "FinetunedPredictor": "comtip.finetune.predict",
    "load_finetuned": "comtip.finetune.predict",
    "predict_finetuned": "comtip.finetune.predict",
    "predict_images": "comtip.finetune.predict",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

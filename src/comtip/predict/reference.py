"""The training reference of the prediction methods: the training samples' panel values, or their
embeddings by one encoder, stacked in sample-sheet order into one file (rules
``training_values`` and ``training_embeddings``).

Every prediction job reads that one file instead of every training sample's: for a cohort of
120 training slides this turns ~240 inputs per job (and ~50,000 edges of the workflow's DAG for
40 test slides) into one, which is what keeps a dry run of a 200-sample sheet fast. The rows are
the training spots of every training sample in sheet order, with ``barcodes`` and ``sample`` per
row; the arrays are exactly those of the per-sample files, concatenated.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from comtip._core.atomic import atomic_path
from comtip._core.errors import PipelineInputError

VALUE_KEYS = ("panel_values",)
EMBEDDING_KEYS = ("features", "image_embeddings", "sentence_embeddings")


def stack_training(
    files: Sequence[str | Path], samples: Sequence[str], keys: Sequence[str], out_npz: str | Path
) -> dict[str, np.ndarray]:
    """Concatenate ``keys`` (and ``barcodes``) of the per-sample ``files`` of ``samples``; a
    ``panel_genes`` array, where the files have one, must be the same in all and is kept once."""
    if len(files) != len(samples) or not files:
        raise ValueError(f"need one file per training sample, got {len(files)} files for {len(samples)} samples")
    parts: dict[str, list[np.ndarray]] = {key: [] for key in (*keys, "barcodes")}
    owners, genes, first = [], None, None
    for sample, path in zip(samples, files, strict=True):
        with np.load(path) as npz:
            missing = [key for key in (*keys, "barcodes") if key not in npz]
            if missing:
                raise PipelineInputError(
                    f"lacks {missing}; rebuild it with this version of the pipeline", sample=sample, path=path
                )
            # each npz[key] access reads and decompresses the array again: read every one once
            loaded = {key: npz[key] for key in (*keys, "barcodes")}
            panel = npz["panel_genes"] if "panel_genes" in npz else None
            rows = len(loaded["barcodes"])
            for key, array in loaded.items():
                if len(array) != rows:
                    raise PipelineInputError(
                        f"{key} has {len(array)} rows for {rows} barcodes", sample=sample, path=path
                    )
                parts[key].append(array)
            if panel is not None:
                if genes is None:
                    genes, first = panel, path
                elif not np.array_equal(panel, genes):
                    raise PipelineInputError(
                        f"panel genes differ from those of {Path(first).absolute()}; build "
                        "every sample's gene sentences from the same gene_panel.tsv",
                        sample=sample,
                        path=path,
                    )
        owners.append(np.full(rows, sample))
    arrays = {key: np.concatenate(value, axis=0) for key, value in parts.items()}
    arrays["sample"] = np.concatenate(owners).astype(str)
    if genes is not None:
        arrays["panel_genes"] = genes
    with atomic_path(out_npz) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    return arrays

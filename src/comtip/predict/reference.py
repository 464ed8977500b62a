"""The training reference of the prediction methods: the training samples' panel values, or their
embeddings by one encoder, stacked in sample-sheet order into one file (rules
``training_values`` and ``training_embeddings``).

Every prediction job reads that one file instead of every training sample's: for a cohort of
120 training slides this turns ~240 inputs per job (and ~50,000 edges of the workflow's DAG for
40 test slides) into one, which is what keeps a dry run of a 200-sample sheet fast. The rows are
the training spots of every training sample in sheet order, with ``barcodes`` and ``sample`` per
row; the arrays are exactly those of the per-sample files, concatenated (``np.concatenate``'s
dtype where samples differ).

The file is written one sample at a time (memory O(one sample), not O(cohort): at 800,000 spots
the ViT-B embeddings alone are ~4 GB), uncompressed, so that the prediction jobs read it through
:mod:`comtip._core.rows` without loading it.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from comtip._core.atomic import atomic_path
from comtip._core.errors import PipelineInputError
from comtip._core.npzmap import MappedNpz, NpzWriter, copy_member_data, member_header, open_npz

VALUE_KEYS = ("panel_values",)
EMBEDDING_KEYS = ("features", "image_embeddings", "sentence_embeddings")


def _headers(path: str | Path, sample: str, keys: Sequence[str]) -> dict[str, tuple]:
    """Each key's (shape, dtype, fortran_order), checked: every key present, one row per barcode."""
    with zipfile.ZipFile(path) as zf:
        present = {name[: -len(".npy")] for name in zf.namelist() if name.endswith(".npy")}
    missing = [key for key in keys if key not in present]
    if missing:
        raise PipelineInputError(
            f"lacks {missing}; rebuild it with this version of the pipeline", sample=sample, path=path
        )
    headers = {key: member_header(path, key) for key in keys}
    rows = headers["barcodes"][0][0]
    for key, (shape, _, _) in headers.items():
        if not shape or shape[0] != rows:
            raise PipelineInputError(
                f"{key} has {shape[0] if shape else 0} rows for {rows} barcodes", sample=sample, path=path
            )
    return headers


def same_panel(
    genes: np.ndarray | None, first: str | Path | None, panel: np.ndarray, sample: str, path: str | Path
) -> tuple[np.ndarray, str | Path]:
    """The panel genes and file of the first sample seen (``genes``, ``first``; None before it),
    after refusing ``sample``'s ``panel`` (read from ``path``) if it differs from them."""
    if genes is None:
        return panel, path
    if not np.array_equal(panel, genes):
        raise PipelineInputError(
            f"panel genes differ from those of {Path(first).absolute()}; build "
            "every sample's gene sentences from the same gene_panel.tsv",
            sample=sample,
            path=path,
        )
    return genes, first


def stack_training(
    files: Sequence[str | Path], samples: Sequence[str], keys: Sequence[str], out_npz: str | Path
) -> MappedNpz:
    """Concatenate ``keys`` (and ``barcodes``) of the per-sample ``files`` of ``samples`` into
    ``out_npz``, one sample at a time; a ``panel_genes`` array, where the files have one, must be
    the same in all and is kept once. Returns the written file's members, memory-mapped."""
    if len(files) != len(samples) or not files:
        raise ValueError(f"need one file per training sample, got {len(files)} files for {len(samples)} samples")
    keys = (*keys, "barcodes")
    headers, genes, first = [], None, None
    for sample, path in zip(samples, files, strict=True):
        headers.append(_headers(path, sample, keys))
        with np.load(path) as npz:
            panel = npz["panel_genes"] if "panel_genes" in npz else None
        if panel is not None:
            genes, first = same_panel(genes, first, panel, sample, path)
    rows = [h["barcodes"][0][0] for h in headers]
    with atomic_path(out_npz) as tmp, NpzWriter(tmp) as out:
        for key in keys:
            trailing = headers[0][key][0][1:]
            for sample, path, header in zip(samples, files, headers, strict=True):
                if header[key][0][1:] != trailing:
                    raise PipelineInputError(
                        f"{key} has rows of shape {header[key][0][1:]}, those of {Path(files[0]).absolute()} "
                        f"{trailing}; rebuild the training samples with one configuration",
                        sample=sample,
                        path=path,
                    )
            dtype = np.result_type(*(h[key][1] for h in headers))
            with out.member(key, (sum(rows), *trailing), dtype) as fh:
                for path, header in zip(files, headers, strict=True):
                    _, own, fortran = header[key]
                    if own == dtype and not fortran:
                        copy_member_data(path, key, fh)
                    else:
                        with np.load(path) as npz:
                            fh.write(np.ascontiguousarray(npz[key], dtype=dtype).data)
        owner = np.result_type(*(np.array(str(s)).dtype for s in samples))
        with out.member("sample", (sum(rows),), owner) as fh:
            for sample, n in zip(samples, rows, strict=True):
                fh.write(np.full(n, str(sample), dtype=owner).data)
        if genes is not None:
            out.write("panel_genes", genes)
    return open_npz(out_npz)

"""Training spots of several samples, read from their patch and gene-sentence files per batch.

Nothing that grows with the cohort is held in a process's memory except two small integer
arrays per spot (its sample and its row): patches (``spot_patches.npy``) and gene sentences
(``gene_sentences.npz``, written uncompressed by ``build_gene_sentences``) stay in their files,
located through memory maps (:mod:`comtip._core.npzmap`) and read row by row with ``preadv``.
The pages go to the page cache, which the processes of one node share, and not into any
process's RSS. The batch order is :mod:`comtip.training.sampling`'s.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from comtip._core.errors import ConfigError, PipelineInputError
from comtip._core.npzmap import MappedNpz, open_npz
from comtip.data.barcodes import first_mismatch, value_at
from comtip.training.sampling import BatchPlan, MicroBatches  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

SENTENCE_KEYS = ("gene_ids", "values", "bins", "pad")
# every vocabulary gene's value at the spot, zeros included (pretrain.subsample_genes: vocabulary)
DENSE_KEY = "vocabulary_values"
# what each spot contributes to a batch besides its image
BATCH_KEYS = (*SENTENCE_KEYS, DENSE_KEY)
# dtypes the model takes (batch dict of CoMTIP.forward)
TORCH_DTYPES = {
    "gene_ids": torch.long,
    "values": torch.float32,
    "bins": torch.long,
    "pad": torch.bool,
    DENSE_KEY: torch.float32,
}


@dataclass(frozen=True)
class SampleFiles:
    """The three per-sample files pretraining reads (rows aligned by construction)."""

    name: str
    patches: Path  # spot_patches.npy
    index: Path  # spot_patches.parquet
    sentences: Path  # gene_sentences.npz


def sample_files(
    samples: Sequence[str],
    patches: Sequence[str | Path],
    indexes: Sequence[str | Path],
    sentences: Sequence[str | Path],
) -> list[SampleFiles]:
    if not len(samples) == len(patches) == len(indexes) == len(sentences):
        raise ValueError(
            f"{len(samples)} samples but {len(patches)} patch files, {len(indexes)} patch "
            f"indexes and {len(sentences)} sentence files"
        )
    if not samples:
        raise PipelineInputError("no training sample: pretraining needs at least one sample with split = train")
    return [SampleFiles(s, Path(p), Path(i), Path(t)) for s, p, i, t in zip(samples, patches, indexes, sentences)]


def _open_patches(files: SampleFiles) -> np.ndarray:
    try:
        patches = np.load(files.patches, mmap_mode="r")
    except (ValueError, OSError) as err:  # not an .npy, or shorter than its header says
        raise PipelineInputError(
            f"cannot be read as a patch array ({err}); rerun extract_patches", sample=files.name, path=files.patches
        ) from err
    if patches.dtype != np.uint8 or patches.ndim != 4 or patches.shape[3] != 3:
        raise PipelineInputError(
            f"expected uint8 patches of shape (N, H, W, 3), found {patches.dtype} {patches.shape}",
            sample=files.name,
            path=files.patches,
        )
    return patches


def _check_sentences(files: SampleFiles, npz: MappedNpz, n_patches: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Vocabulary, the panel column of each vocabulary gene and the barcodes of one sample,
    after checking that row i of its sentences is the spot of patch i."""
    missing_keys = [
        k for k in (*SENTENCE_KEYS, "barcodes", "vocabulary", "panel_genes", "panel_values") if k not in npz
    ]
    if missing_keys:
        raise PipelineInputError(
            f"lacks {missing_keys}; rerun build_gene_sentences with this version",
            sample=files.name,
            path=files.sentences,
        )
    vocabulary = [str(g) for g in npz["vocabulary"]]
    column = {str(g): j for j, g in enumerate(npz["panel_genes"])}
    missing = [g for g in vocabulary if g not in column]
    if missing:
        raise PipelineInputError(
            f"vocabulary genes {missing[:3]} are not among panel_genes; rerun build_gene_sentences",
            sample=files.name,
            path=files.sentences,
        )
    index_barcodes = pd.read_parquet(files.index, columns=["barcode"])["barcode"].to_numpy(dtype=str)
    if len(index_barcodes) != n_patches:
        raise PipelineInputError(
            f"{len(index_barcodes)} rows but {files.patches.name} holds {n_patches} patches; rerun extract_patches",
            sample=files.name,
            path=files.index,
        )
    barcodes = np.asarray(npz["barcodes"]).astype(str)
    if len(barcodes) != n_patches or not np.array_equal(barcodes, index_barcodes):
        mismatch = first_mismatch(barcodes, index_barcodes)
        raise PipelineInputError(
            f"gene sentences are not aligned with the patches: row {mismatch} is barcode "
            f"{value_at(barcodes, mismatch)!r} here but {value_at(index_barcodes, mismatch)!r} in {files.index} "
            f"({len(barcodes)} vs {len(index_barcodes)} rows); rerun build_gene_sentences and "
            "extract_patches from the same spots.h5ad",
            sample=files.name,
            path=files.sentences,
        )
    for key in SENTENCE_KEYS:
        if len(npz[key]) != n_patches:
            raise PipelineInputError(
                f"{key} has {len(npz[key])} rows for {n_patches} barcodes", sample=files.name, path=files.sentences
            )
    return vocabulary, np.asarray([column[g] for g in vocabulary], np.int64), barcodes


class SpotData:
    """Every usable training spot of every sample, addressable by one global index.

    Global indices run sample by sample, in patch-file order within a sample (what the
    ``blocks`` sampler relies on). ``data[indices]`` returns a batch: ``images`` uint8
    (B, H, W, 3) plus the sentence tensors in the dtypes the model takes. Files are mapped
    lazily in each process, so the object can be handed to DataLoader workers without copying
    arrays. ``readahead_block`` > 0 (set by the trainer with the ``blocks`` sampler): the first
    time a block of that many consecutive spots is touched, the kernel is asked to read the
    block's patches whole (``posix_fadvise(WILLNEED)``), so the disk sees runs, not single patches.
    """

    def __init__(self, samples: Sequence[SampleFiles]):
        self.samples = list(samples)
        shapes, vocabulary, sample_of, rows, digests, columns = [], None, [], [], [], []
        top_bin = 0
        for k, files in enumerate(self.samples):
            patches = _open_patches(files)
            npz = open_npz(files.sentences)
            vocab, cols, barcodes = _check_sentences(files, npz, len(patches))
            if vocabulary is None:
                vocabulary, first = vocab, files
            elif vocab != vocabulary:
                raise PipelineInputError(
                    f"vocabulary differs from the one of sample {first.name} "
                    f"({first.sentences}); rebuild every sample's gene sentences from "
                    "the same gene_panel.tsv",
                    sample=files.name,
                    path=files.sentences,
                )
            pad = np.asarray(npz["pad"])
            if shapes and (patches.shape[1:], pad.shape[1]) != shapes[0]:
                raise PipelineInputError(
                    f"patches {patches.shape[1:]} / sentence length {pad.shape[1]} differ from sample "
                    f"{self.samples[0].name}'s {shapes[0]}",
                    sample=files.name,
                    path=files.patches,
                )
            shapes.append((patches.shape[1:], pad.shape[1]))
            keep = ~pad.all(axis=1)
            if not keep.all():
                log.info(
                    "[%s] %d of %d spots express no pretraining gene: skipped",
                    files.name,
                    int((~keep).sum()),
                    len(keep),
                )
            top_bin = max(top_bin, int(np.max(npz["bins"], initial=0)))
            sample_of.append(np.full(int(keep.sum()), k, np.int32))
            rows.append(np.flatnonzero(keep))
            columns.append(cols)
            digests.append(hashlib.sha256("\n".join(barcodes[keep]).encode()).hexdigest())
        assert vocabulary is not None
        self.vocabulary: list[str] = vocabulary
        self.patch_shape: tuple[int, int, int] = tuple(int(v) for v in shapes[0][0])
        self.top_bin = top_bin  # the largest value bin any sentence holds
        self.sample_sizes = tuple(int(len(r)) for r in rows)
        self.sample_start = np.concatenate([[0], np.cumsum(self.sample_sizes)]).astype(np.int64)
        self.sample_of = np.concatenate(sample_of)
        self.row_of = np.concatenate(rows)
        self._columns = np.stack(columns)  # (samples, vocabulary): each sample's panel column of each gene
        if len(self) == 0:
            raise PipelineInputError(
                "no training spot expresses any pretraining gene",
                sample=self.samples[0].name,
                path=self.samples[0].sentences,
            )
        # What a resume checkpoint must have been trained on (cheap to compute, changes whenever
        # a sample, its spots or the gene vocabulary change).
        self.fingerprint = {
            "samples": [f.name for f in self.samples],
            "spots": list(self.sample_sizes),
            "barcodes_sha256": digests,
            "patch_shape": list(self.patch_shape),
            "vocabulary_sha256": hashlib.sha256("\n".join(vocabulary).encode()).hexdigest(),
        }
        self.readahead_block = 0
        self._reset_handles()

    def check_options(self, n_bins: int, *, rot90: bool) -> None:
        """ConfigError unless the model has an embedding for every value bin of the sentences and,
        with ``rot90``, the patches are square."""
        if self.top_bin >= n_bins:
            raise ConfigError(
                f"config key 'model.n_bins': {n_bins}, but the gene sentences hold value "
                f"bin {self.top_bin}; set model.n_bins to at least genes.n_bins"
            )
        height, width, _ = self.patch_shape
        if rot90 and height != width:
            raise ConfigError(
                f"config key 'pretrain.rot90': needs square patches, the patches are {height} x {width} px"
            )

    def held_out(self, samples: Sequence[SampleFiles]) -> SpotData:
        """The spots of other ``samples`` (validation slides), refused unless their vocabulary
        and patch shape are this data's."""
        other = SpotData(samples)
        if other.vocabulary != self.vocabulary or other.patch_shape != self.patch_shape:
            first = other.samples[0]
            raise PipelineInputError(
                f"vocabulary or patch shape {other.patch_shape} differ from the training samples' "
                f"({self.samples[0].name}: {self.patch_shape}); build every sample's patches and gene "
                "sentences with the same settings and gene_panel.tsv",
                sample=first.name,
                path=first.sentences,
            )
        return other

    def _reset_handles(self) -> None:
        self._patches: list[np.ndarray] | None = None
        self._sentences: list[MappedNpz] | None = None
        self._fds: dict[Path, int] = {}
        self._layouts: dict[tuple[int, str], tuple[int | None, int, np.ndarray, Path]] = {}
        self._specs: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        self._advised: set[tuple[int, int]] = set()

    def __len__(self) -> int:
        return len(self.row_of)

    def patches(self, k: int) -> np.ndarray:
        """Memory-mapped patches of sample ``k`` (opened on first use in this process)."""
        if self._patches is None:
            self._patches = [np.load(f.patches, mmap_mode="r") for f in self.samples]
        return self._patches[k]

    def sentence_file(self, k: int) -> MappedNpz:
        """Memory-mapped gene sentences of sample ``k`` (opened on first use in this process)."""
        if self._sentences is None:
            self._sentences = [open_npz(f.sentences) for f in self.samples]
        return self._sentences[k]

    def _layout(self, k: int, key: str) -> tuple[int | None, int, np.ndarray, Path]:
        """(descriptor or None, byte offset of row 0, array, file) of ``key`` (``patches`` or a
        sentence array) of sample ``k``; its rows must have the shape and dtype of sample 0's."""
        found = self._layouts.get((k, key))
        if found is None:
            if key == "patches":
                array, path = self.patches(k), self.samples[k].patches
            else:
                array, path = self.sentence_file(k)[key], self.samples[k].sentences
            spec = self._specs.setdefault(key, (array.shape[1:], array.dtype))
            if (array.shape[1:], array.dtype) != spec:
                raise PipelineInputError(
                    f"{key} rows are {array.dtype} {array.shape[1:]}, sample {self.samples[0].name}'s "
                    f"{spec[1]} {spec[0]}; rebuild every sample's files with the same pipeline version",
                    sample=self.samples[k].name,
                    path=path,
                )
            direct = hasattr(os, "preadv") and isinstance(array, np.memmap) and array.flags.c_contiguous
            found = (self._descriptor(path) if direct else None, array.offset if direct else 0, array, path)
            self._layouts[(k, key)] = found
        return found

    def _gather(self, key: str, indices: np.ndarray) -> np.ndarray:
        """Rows of ``key`` of the global ``indices``, in that order, read one by one with
        ``preadv`` in file order (the page cache is shared; this process's RSS does not grow with
        what it has read, as it would through the memory maps)."""
        owners, rows = self.sample_of[indices], self.row_of[indices]
        array = self._layout(int(owners[0]) if len(indices) else 0, key)[2]
        out = np.empty((len(indices), *array.shape[1:]), array.dtype)
        row_bytes = out[0].nbytes if len(out) else 0
        order = np.lexsort((rows, owners))
        for i, k, row in zip(order.tolist(), owners[order].tolist(), rows[order].tolist(), strict=True):
            fd, offset, array, path = self._layout(k, key)
            if fd is None:
                out[i] = array[row]
            elif os.preadv(fd, [out[i]], offset + row * row_bytes) != row_bytes:
                raise PipelineInputError(
                    f"row {row} of {key} is cut short; rerun the rule that writes the file",
                    sample=self.samples[k].name,
                    path=path,
                )
        return out

    def _advise(self, indices: np.ndarray) -> None:
        """Ask the kernel to read whole the patch blocks that ``indices`` fall in (once per block)."""
        if not self.readahead_block or not hasattr(os, "posix_fadvise"):
            return
        owners = self.sample_of[indices]
        blocks = (indices - self.sample_start[owners]) // self.readahead_block
        if len(self._advised) > 1_000_000:
            self._advised.clear()
        for k, block in set(zip(owners.tolist(), blocks.tolist(), strict=True)) - self._advised:
            self._advised.add((k, block))
            fd, offset, _, _ = self._layout(k, "patches")
            if fd is None:
                continue
            lo = int(self.sample_start[k]) + block * self.readahead_block
            hi = min(lo + self.readahead_block, int(self.sample_start[k + 1])) - 1
            first, last = int(self.row_of[lo]), int(self.row_of[hi])
            row_bytes = int(np.prod(self.patch_shape))
            os.posix_fadvise(fd, offset + first * row_bytes, (last - first + 1) * row_bytes, os.POSIX_FADV_WILLNEED)

    def images(self, indices: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W, 3) patches of the global ``indices``, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        self._advise(indices)
        return self._gather("patches", indices)

    def _descriptor(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def sentence_arrays(self, indices: np.ndarray, keys: Sequence[str] = BATCH_KEYS) -> dict[str, np.ndarray]:
        """Sentence arrays (numpy, file dtypes; ``vocabulary_values`` float32) of the global ``indices``."""
        indices = np.asarray(indices, dtype=np.int64)
        out = {key: self._gather(key, indices) for key in keys if key != DENSE_KEY}
        if DENSE_KEY in keys:
            values = self._gather("panel_values", indices)
            columns = self._columns[self.sample_of[indices]]
            out[DENSE_KEY] = np.take_along_axis(values, columns, axis=1).astype(np.float32)
        return {key: out[key] for key in keys}

    def __getitem__(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        indices = np.asarray(indices)
        batch = {"images": torch.from_numpy(self.images(indices))}
        for key, array in self.sentence_arrays(indices).items():
            batch[key] = torch.from_numpy(array).to(TORCH_DTYPES[key])
        return batch

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for key in ("_patches", "_sentences", "_fds", "_layouts", "_specs", "_advised"):
            state.pop(key)  # memory maps and descriptors are reopened by each worker, never pickled
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset_handles()

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass

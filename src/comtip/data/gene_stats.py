"""Per-gene statistics of the training cohort, streamed one sample at a time.

Gene selection used to concatenate every training spot's dense values (about 1 GB per Visium
slide). Here each sample is read, normalised as a sparse matrix and folded into running sums, so
memory is one sample plus O(genes):

* :class:`GeneMoments` — mean, variance and detection rate of the normalised values, and the
  moments of ``expm1`` of them that Seurat's dispersion (scanpy ``flavor="seurat"``) needs;
  :func:`seurat_dispersion_norm` repeats scanpy's binning and z-scoring on those sums.
* :class:`ExactQuantiles` — exact quantiles (``np.quantile``'s default ``linear`` method) of the
  non-zero values of some genes over all spots, from two histogram passes over the samples
  instead of one array of every value: positive float32 values sort as their bit patterns, so a
  histogram of the high 16 bits finds the bucket of each wanted order statistic, and a histogram
  of the low 16 bits within those buckets finds the value itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

TARGET_SUM = 1e4
SEURAT_MEAN_BINS = 20  # scanpy's default n_bins for flavor="seurat"


def normalised_csr(counts) -> sp.csr_matrix:
    """log1p(counts / library size × 1e4) as float32 CSR (spots × genes), without densifying.

    The arithmetic is the dense formula's, element by element in float64, so the values are
    bit-identical to it."""
    x = sp.csr_matrix(counts, dtype=np.float64, copy=True)
    library = np.asarray(x.sum(axis=1), dtype=np.float64).ravel()
    library[library == 0] = 1.0
    x.data = np.log1p(x.data / np.repeat(library, np.diff(x.indptr)) * TARGET_SUM)
    out = x.astype(np.float32)
    out.eliminate_zeros()
    return out


def read_normalised(path: str | Path, genes: Sequence[str] | None = None) -> tuple[pd.Index, sp.csr_matrix]:
    """Barcodes and normalised values of one sample; with ``genes``, those columns in that order
    (a gene the sample lacks is an all-zero column)."""
    adata = ad.read_h5ad(path)
    values = normalised_csr(adata.X)
    if genes is not None:
        columns = pd.Index(adata.var_names).get_indexer(pd.Index(genes))
        present = np.flatnonzero(columns >= 0)
        picked = values[:, columns[present]].tocoo()
        values = sp.csr_matrix(
            (picked.data, (picked.row, present[picked.col])), shape=(adata.n_obs, len(genes)), dtype=np.float32
        )
    return pd.Index(adata.obs_names), values


class GeneMoments:
    """Running sums over spots of one gene list's normalised values."""

    def __init__(self, n_genes: int):
        self.n_spots = 0
        self.sum = np.zeros(n_genes)
        self.sum_sq = np.zeros(n_genes)
        self.detected = np.zeros(n_genes, np.int64)
        self.counts_sum = np.zeros(n_genes)  # of expm1(value): Seurat's dispersion is on this scale
        self.counts_sum_sq = np.zeros(n_genes)

    def add(self, values: sp.csr_matrix) -> None:
        n_genes = self.sum.shape[0]
        values = values.tocsr()
        positive = values.data > 0
        data = values.data[positive].astype(np.float64)
        genes = values.indices[positive]
        expm1 = np.expm1(values.data[positive]).astype(np.float64)  # float32 expm1, as scanpy does
        self.n_spots += values.shape[0]
        self.sum += np.bincount(genes, weights=data, minlength=n_genes)
        self.sum_sq += np.bincount(genes, weights=data * data, minlength=n_genes)
        self.detected += np.bincount(genes, minlength=n_genes)
        self.counts_sum += np.bincount(genes, weights=expm1, minlength=n_genes)
        self.counts_sum_sq += np.bincount(genes, weights=expm1 * expm1, minlength=n_genes)

    @property
    def mean(self) -> np.ndarray:
        return self.sum / self.n_spots

    @property
    def variance(self) -> np.ndarray:
        """Population variance (ddof 0, as ``np.var``)."""
        return np.maximum(self.sum_sq / self.n_spots - self.mean**2, 0.0)

    @property
    def spot_fraction(self) -> np.ndarray:
        return self.detected / self.n_spots


def seurat_dispersion_norm(moments: GeneMoments, n_bins: int = SEURAT_MEAN_BINS) -> np.ndarray:
    """scanpy's ``highly_variable_genes(flavor="seurat")["dispersions_norm"]`` from running sums.

    Mean and unbiased variance of expm1(values) (scanpy's ``_get_mean_var``), dispersion
    log(var / mean), genes binned by log1p(mean) into ``n_bins`` equal-width bins, dispersion
    z-scored within its bin; a bin holding one gene gets that gene's dispersion as its deviation
    and 0 as its mean (scanpy's rule). Genes with no dispersion are ``-inf`` (never chosen)."""
    n = moments.n_spots
    mean = moments.counts_sum / n
    variance = moments.counts_sum_sq / n - mean**2
    if n != 1:
        variance *= n / (n - 1)
    mean[mean == 0] = 1e-12
    dispersion = variance / mean
    dispersion[dispersion == 0] = np.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        dispersion = np.log(dispersion)
    frame = pd.DataFrame({"means": np.log1p(mean), "dispersions": dispersion})
    frame["mean_bin"] = pd.cut(frame["means"], bins=n_bins)
    stats = frame.groupby("mean_bin", observed=True)["dispersions"].agg(avg="mean", dev="std")
    single = stats["dev"].isnull()
    stats.loc[single, "dev"] = stats.loc[single, "avg"]
    stats.loc[single, "avg"] = 0
    stats = stats.loc[frame["mean_bin"]].set_index(frame.index)
    norm = ((frame["dispersions"] - stats["avg"]) / stats["dev"]).to_numpy(np.float64)
    return np.nan_to_num(norm, nan=-np.inf)


class ExactQuantiles:
    """Exact ``np.quantile(all_positive_values, q)`` from two passes over the samples.

    Pass 1 (:meth:`add_coarse` for every sample, then :meth:`finish_coarse`) counts the values by
    their float32 bit pattern's high 16 bits; pass 2 (:meth:`add_fine`) counts, within the buckets
    that hold a wanted order statistic, the low 16 bits. Memory is 65,536 counters per wanted order
    statistic, whatever the cohort size."""

    _BUCKETS = 1 << 16

    def __init__(self, quantiles: np.ndarray):
        self.q = np.asarray(quantiles, np.float64)
        self.coarse = np.zeros(self._BUCKETS, np.int64)
        self.total = 0
        self._wanted: np.ndarray | None = None

    @staticmethod
    def _keys(values: np.ndarray) -> np.ndarray:
        values = np.ascontiguousarray(values, np.float32)
        return values[values > 0].view(np.uint32)

    def add_coarse(self, values: np.ndarray) -> None:
        keys = self._keys(values)
        self.total += keys.size
        self.coarse += np.bincount(keys >> 16, minlength=self._BUCKETS)

    def finish_coarse(self) -> None:
        """Fix the order statistics the quantiles need (numpy's ``linear`` rule) and their buckets."""
        if self.total == 0:
            raise ValueError("no positive value to take quantiles of")
        n = self.total
        virtual = (n - 1) * self.q  # numpy's "linear" virtual index
        previous = np.floor(virtual)
        self._gamma = virtual - previous
        above = virtual >= n - 1
        below = virtual < 0
        lo = np.where(above, n - 1, np.where(below, 0, previous)).astype(np.int64)
        hi = np.where(above, n - 1, np.where(below, 0, previous + 1)).astype(np.int64)
        self._lo, self._hi = lo, np.minimum(hi, n - 1)
        self._wanted = np.unique(np.concatenate([self._lo, self._hi]))
        ends = np.cumsum(self.coarse)
        self._bucket = np.searchsorted(ends, self._wanted, side="right")
        self._offset = self._wanted - (ends[self._bucket] - self.coarse[self._bucket])
        self._fine_buckets = np.unique(self._bucket)
        self.fine = np.zeros((len(self._fine_buckets), self._BUCKETS), np.int64)

    def add_fine(self, values: np.ndarray) -> None:
        keys = self._keys(values)
        high = keys >> 16
        for row, bucket in enumerate(self._fine_buckets):
            self.fine[row] += np.bincount(keys[high == bucket] & 0xFFFF, minlength=self._BUCKETS)

    def result(self) -> np.ndarray:
        """The quantiles, as ``np.quantile`` of the float32 values would give them."""
        value_of = {}
        for rank, bucket, offset in zip(self._wanted, self._bucket, self._offset):
            row = int(np.searchsorted(self._fine_buckets, bucket))
            low = int(np.searchsorted(np.cumsum(self.fine[row]), offset, side="right"))
            value_of[int(rank)] = np.array([(int(bucket) << 16) | low], np.uint32).view(np.float32)[0]
        a = np.array([value_of[int(r)] for r in self._lo], np.float32)
        b = np.array([value_of[int(r)] for r in self._hi], np.float32)
        t = self._gamma
        diff = b - a  # numpy's _lerp
        out = np.add(a, diff * t)
        np.subtract(b, diff * (1 - t), out=out, where=t >= 0.5)
        return out

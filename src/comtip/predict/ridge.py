"""The HEST ridge probe fitted once per encoder by streaming the training samples (rule
``fit_ridge``): memory O(D² + D·G), whatever the number of training spots.

One pass over the training samples, one sample (and at most :data:`BLOCK` rows) at a time,
accumulates in float64 the feature mean, the centred co-moment Σ (x − x̄)(x − x̄)ᵀ (D × D), the
target mean and the cross co-moment Σ (x − x̄)(y − ȳ)ᵀ (D × G); blocks are merged with Chan, Golub
and LeVeque's pairwise update of centred moments (no raw sums of squares). From these follow
exactly what :func:`comtip.predict.baselines.fit_hest_ridge` computes from the stacked arrays:

* the StandardScaler: x̄ and the population std √(Cᵢᵢ / N); a constant feature (min = max over
  every training spot, tracked exactly) keeps scale 1 and contributes nothing;
* the PCA: the scaled co-moment C / (s sᵀ) = Zᵀ Z (Z the centred scaled features); its top-K
  eigenvectors are the principal axes (right singular vectors of Z), K = min(pca_dim, N − 1, D);
* the ridge on the scores S = Z V: SᵀS = diag(μ), μ the top eigenvalues, so the ridge solution
  is closed-form per component, coef_k = (Vᵀ Zᵀ Y)_k / (μ_k + alpha), alpha = alpha_scale / (K·G)
  as HEST. Zᵀ Y = Zᵀ (Y − ȳ) because Z's columns sum to 0: with or without intercept the
  coefficients are the same; the intercept adds ȳ back.

HEST solves the same ridge with LSQR (tolerance 1e-4), an approximation of this exact solution;
``tests/test_ridge.py`` checks both agree. Component signs follow sklearn's ``svd_flip``
convention (each axis's largest-magnitude entry positive) so the file is the same on every BLAS;
predictions do not depend on signs, nor on the basis chosen inside an eigenspace of equal μ.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from comtip._core.atomic import atomic_path
from comtip._core.errors import PipelineInputError
from comtip.data.barcodes import first_mismatch, value_at
from comtip.predict.baselines import RidgeProbe
from comtip.predict.reference import same_panel

log = logging.getLogger(__name__)

BLOCK = 8192  # rows per float64 block: bounds the per-block copies to BLOCK × (D + G) × 8 bytes


class RidgeMoments:
    """Running centred moments of features (N, D) and targets (N, G), merged block by block."""

    def __init__(self, n_features: int, n_targets: int) -> None:
        self.n = 0
        self.x_mean = np.zeros(n_features)
        self.y_mean = np.zeros(n_targets)
        self.xx = np.zeros((n_features, n_features))  # Σ (x − x̄)(x − x̄)ᵀ
        self.xy = np.zeros((n_features, n_targets))  # Σ (x − x̄)(y − ȳ)ᵀ
        self.x_min = np.full(n_features, np.inf)
        self.x_max = np.full(n_features, -np.inf)

    def update(self, feats: np.ndarray, targets: np.ndarray) -> None:
        """Add the rows of ``feats`` (n, D) and ``targets`` (n, G), in blocks of :data:`BLOCK` rows."""
        if feats.ndim != 2 or targets.ndim != 2 or len(feats) != len(targets):
            raise ValueError(
                f"features (n, D) and targets (n, G) must have the same n, got {feats.shape}, {targets.shape}"
            )
        if feats.shape[1] != len(self.x_mean) or targets.shape[1] != len(self.y_mean):
            raise ValueError(
                f"expected {len(self.x_mean)} features and {len(self.y_mean)} targets, "
                f"got {feats.shape[1]} and {targets.shape[1]}"
            )
        for lo in range(0, len(feats), BLOCK):
            self._merge(
                np.asarray(feats[lo : lo + BLOCK], np.float64), np.asarray(targets[lo : lo + BLOCK], np.float64)
            )

    def _merge(self, x: np.ndarray, y: np.ndarray) -> None:
        nb = len(x)
        if nb == 0:
            return
        xb, yb = x.mean(axis=0), y.mean(axis=0)
        xc = x - xb
        xx_b, xy_b = xc.T @ xc, xc.T @ (y - yb)
        self.x_min = np.minimum(self.x_min, x.min(axis=0))
        self.x_max = np.maximum(self.x_max, x.max(axis=0))
        na, n = self.n, self.n + nb
        dx, dy = xb - self.x_mean, yb - self.y_mean
        w = na * nb / n  # Chan et al.: C = C_a + C_b + δ δᵀ · n_a n_b / n
        self.xx += xx_b + w * np.outer(dx, dx)
        self.xy += xy_b + w * np.outer(dx, dy)
        self.x_mean += dx * (nb / n)
        self.y_mean += dy * (nb / n)
        self.n = n

    def probe(self, *, pca_dim: int = 256, alpha_scale: float = 100.0, fit_intercept: bool = False) -> RidgeProbe:
        """The HEST probe of the rows added so far (see the module docstring)."""
        if self.n < 2:
            raise ValueError(f"need at least 2 training spots, got {self.n}")
        if pca_dim < 1 or alpha_scale <= 0:
            raise ValueError(f"pca_dim must be >= 1 and alpha_scale > 0, got {pca_dim}, {alpha_scale}")
        d, g = self.xy.shape
        constant = self.x_min == self.x_max
        x_mean = np.where(constant, self.x_min, self.x_mean)  # exact for a constant feature
        scale = np.sqrt(np.clip(np.diag(self.xx), 0.0, None) / self.n)
        scale[constant | (scale == 0)] = 1.0
        zz = self.xx / np.outer(scale, scale)
        zy = self.xy / scale[:, None]
        zz[constant, :] = zz[:, constant] = 0.0
        zy[constant, :] = 0.0
        k = min(pca_dim, self.n - 1, d)
        mu, vecs = np.linalg.eigh((zz + zz.T) / 2)  # ascending
        mu, vecs = np.clip(mu[::-1][:k], 0.0, None), vecs[:, ::-1][:, :k]
        pivot = np.argmax(np.abs(vecs), axis=0)
        vecs = vecs * np.sign(vecs[pivot, np.arange(k)])  # svd_flip: largest entry of each axis > 0
        alpha = alpha_scale / (k * g)
        coef = (vecs.T @ zy) / (mu + alpha)[:, None]
        log.info(
            "streamed ridge probe: %d training spots, %d → %d PCA dims, %d genes, alpha %.3g%s",
            self.n,
            d,
            k,
            g,
            alpha,
            ", with intercept" if fit_intercept else "",
        )
        return RidgeProbe(
            x_mean, scale, np.zeros(d), vecs.T.copy(), coef, alpha, self.y_mean.copy() if fit_intercept else None
        )


def _read_sample(
    sample: str, embedding: str | Path, sentences: str | Path
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features, panel values, panel genes) of one training sample, rows checked to be the same spots."""
    with np.load(embedding) as emb, np.load(sentences) as sent:
        for npz, path, keys in (
            (emb, embedding, ("barcodes", "features")),
            (sent, sentences, ("barcodes", "panel_values", "panel_genes")),
        ):
            missing = [key for key in keys if key not in npz]
            if missing:
                raise PipelineInputError(
                    f"lacks {missing}; rebuild it with this version of the pipeline", sample=sample, path=path
                )
        emb_codes, sent_codes = np.asarray(emb["barcodes"], dtype=str), np.asarray(sent["barcodes"], dtype=str)
        if not np.array_equal(emb_codes, sent_codes):
            i = first_mismatch(emb_codes, sent_codes)
            raise PipelineInputError(
                f"embedding rows are not the spots of {Path(sentences).absolute()} in order (first difference at row "
                f"{i}: {value_at(emb_codes, i)!r} vs {value_at(sent_codes, i)!r}); rebuild the embeddings",
                sample=sample,
                path=embedding,
            )
        return emb["features"], sent["panel_values"], np.asarray(sent["panel_genes"], dtype=str)


def fit_ridge_probe(
    samples: Sequence[str],
    embedding_files: Sequence[str | Path],
    sentence_files: Sequence[str | Path],
    out_npz: str | Path,
    *,
    pca_dim: int = 256,
    alpha_scale: float = 100.0,
    fit_intercept: bool = True,
) -> RidgeProbe:
    """Fit the probe on the training samples' ``features`` and ``panel_values``, one sample in
    memory at a time, and write it to ``out_npz`` (atomically; see :func:`load_ridge_probe`).
    ``fit_intercept=True`` is what the ``ridge_*`` methods use (HEST: False)."""
    if not samples or not len(samples) == len(embedding_files) == len(sentence_files):
        raise ValueError(f"need one embedding and one sentence file per training sample, got {len(samples)} samples")
    moments, genes, first = None, None, None
    for sample, embedding, sentences in zip(samples, embedding_files, sentence_files, strict=True):
        feats, values, panel = _read_sample(sample, embedding, sentences)
        if moments is None:
            moments = RidgeMoments(feats.shape[1], values.shape[1])
        genes, first = same_panel(genes, first, panel, sample, sentences)
        try:
            moments.update(feats, values)
        except ValueError as err:
            raise PipelineInputError(str(err), sample=sample, path=embedding) from None
    probe = moments.probe(pca_dim=pca_dim, alpha_scale=alpha_scale, fit_intercept=fit_intercept)
    arrays = {
        "scaler_mean": probe.scaler_mean,
        "scaler_scale": probe.scaler_scale,
        "components": probe.components,
        "coef": probe.coef,
        "target_mean": moments.y_mean,
        "fit_intercept": np.array(fit_intercept),
        "alpha": np.array(probe.alpha),
        "alpha_scale": np.array(alpha_scale),
        "pca_dim": np.array(pca_dim),
        "n_components": np.array(len(probe.components)),
        "n_train": np.array(moments.n),
        "panel_genes": genes,
        "samples": np.asarray(samples, dtype=str),
    }
    with atomic_path(out_npz) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    return probe


def load_ridge_probe(path: str | Path) -> tuple[RidgeProbe, dict[str, np.ndarray]]:
    """The probe written by :func:`fit_ridge_probe`, and the file's other arrays (``panel_genes``,
    ``pca_dim``, ``n_train``, ``samples``...)."""
    with np.load(path) as npz:
        arrays = {key: npz[key] for key in npz.files}
    probe = RidgeProbe(
        arrays["scaler_mean"],
        arrays["scaler_scale"],
        np.zeros_like(arrays["scaler_mean"]),
        arrays["components"],
        arrays["coef"],
        float(arrays["alpha"]),
        arrays["target_mean"] if bool(arrays["fit_intercept"]) else None,
    )
    return probe, arrays

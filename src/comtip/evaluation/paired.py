"""Paired differences CoMTIP − X with bootstrap 95 % intervals, for Pearson per slide and pooled.

The question a user asks is "does CoMTIP predict better than method X on my slides?". Every
method predicts the same spots and genes, so the comparison is paired: the difference of the two
methods' correlations on the same (slide, gene), not two means with their own spreads.

Two Pearson correlations, because published tables use both and they differ a lot:

* ``per_slide``: Pearson over one slide's spots per (slide, gene); the set's genes averaged
  within each slide, then the slides averaged (mclSTExp's leave-one-slide-out tables; our
  ``summary.tsv`` ``pearson_mean``).
* ``pooled``: Pearson per gene over the test spots of all slides together, then averaged over the
  set's genes (HEST-Benchmark correlates over all test spots of a fold). Differences between
  slides' mean expression count in it, so it is usually higher than per slide.

The interval resamples both sources of variation the user's next cohort has: slides (the unit of
replication; with replacement, when there are at least 2) and genes (with replacement, within
the gene set), ``n_boot`` times with a fixed seed; the 2.5 and 97.5 percentiles of the resampled
statistic. ``p_not_better`` is the fraction of resamples where the reference does not beat X
(difference ≤ 0): a one-sided bootstrap p-value. For the pooled Pearson the slides are resampled
through per-slide sufficient statistics (n, Σt, Σp, Σt², Σp², Σtp per gene), so no spot is
held in memory beyond one slide.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from comtip._core.errors import ConfigError

PEARSON_KINDS = ("per_slide", "pooled")
# Which method stands for CoMTIP when evaluate.paired_reference is "auto": the first of these
# among evaluate.methods. The ridge probe first: the same probe as ridge_random (and HEST's),
# so its difference to them isolates the encoder.
AUTO_REFERENCE_ORDER = (
    "ridge_comtip",
    "finetune_linear",
    "finetune_full",
    "zeroshot",
    "retrieval_weighted_comtip",
    "retrieval_mean_comtip",
)
PAIRED_COLUMNS = (
    "reference",
    "method",
    "gene_set",
    "pearson",
    "n_slides",
    "n_genes",
    "reference_value",
    "method_value",
    "difference",
    "ci_low",
    "ci_high",
    "p_not_better",
    "resampled",
    "n_boot",
)


def paired_reference(setting: str | None, methods: Sequence[str]) -> str | None:
    """The method that stands for CoMTIP in the paired table: ``setting`` itself (it must be
    one of ``methods``), the first of :data:`AUTO_REFERENCE_ORDER` in ``methods`` for
    ``"auto"``, or None (no paired table) for None or when ``auto`` finds none."""
    if setting is None:
        return None
    if setting == "auto":
        return next((m for m in AUTO_REFERENCE_ORDER if m in methods), None)
    if setting not in methods:
        raise ConfigError(
            f"evaluate.paired_reference is {setting!r}, which is not in evaluate.methods {list(methods)}: "
            "add it there, or set paired_reference to auto or null"
        )
    return setting


def sufficient_stats(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """(6, G) float64: n, Σt, Σp, Σt², Σp², Σtp of each gene over one slide's spots."""
    t = np.asarray(truth, dtype=np.float64)
    p = np.asarray(pred, dtype=np.float64)
    n = np.full(t.shape[1], float(t.shape[0]))
    return np.stack([n, t.sum(0), p.sum(0), (t * t).sum(0), (p * p).sum(0), (t * p).sum(0)])


def pooled_pearson(stats: np.ndarray) -> np.ndarray:
    """Per gene Pearson from summed :func:`sufficient_stats` (6, G); NaN where a side is constant.

    Centred sums from raw moments lose digits when the mean is large against the spread; the
    values here are log1p-normalised (means of a few units), far from that."""
    n, st, sp, stt, spp, stp = stats
    with np.errstate(invalid="ignore", divide="ignore"):
        ctt = stt - st * st / n
        cpp = spp - sp * sp / n
        ctp = stp - st * sp / n
        scale = np.maximum(np.abs(stt), np.abs(spp)) + 1.0
        constant = (ctt <= 1e-12 * scale) | (cpp <= 1e-12 * scale)
        r = np.clip(ctp / np.sqrt(ctt * cpp), -1.0, 1.0)
    r[constant | (n < 2)] = np.nan
    return r


def _per_slide_statistic(d: np.ndarray) -> float:
    """Mean over slides of the slide's mean over genes (NaN excluded; a slide with none left out)."""
    valid = ~np.isnan(d)
    counts = valid.sum(axis=1)
    sums = np.where(valid, d, 0.0).sum(axis=1)
    keep = counts > 0
    return float((sums[keep] / counts[keep]).mean()) if keep.any() else float("nan")


def _pooled_r(stats: np.ndarray, weights: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Pooled Pearson of genes ``cols`` over the slides, slide i counted ``weights[i]`` times."""
    return pooled_pearson(np.tensordot(weights, stats[:, :, cols], axes=(0, 0)))


def _nanmean(values: np.ndarray) -> float:
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def _interval(values: np.ndarray) -> tuple[float, float, float]:
    values = values[np.isfinite(values)]
    if not len(values):
        return float("nan"), float("nan"), float("nan")
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high), float((values <= 0).mean())


def paired_differences(
    per_slide: Mapping[str, np.ndarray],
    stats: Mapping[str, np.ndarray],
    genes: Sequence[str],
    gene_sets: Mapping[str, Sequence[str]],
    reference: str,
    *,
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """The paired table: one row per (method other than ``reference``, gene set, Pearson kind).

    ``per_slide[m]`` is (slides, genes) Pearson per slide and gene of method ``m`` (NaN where
    undefined), ``stats[m]`` (slides, 6, genes) its :func:`sufficient_stats`; slides in the same
    order in all, genes in ``genes`` order. The same resampled slides and genes serve every
    method and both kinds, so the rows are comparable with each other.
    """
    if reference not in per_slide:
        raise KeyError(f"reference method {reference!r} has no predictions")
    index = {g: i for i, g in enumerate(genes)}
    n_slides = per_slide[reference].shape[0]
    rng = np.random.default_rng(seed)
    draws = []
    for set_name, set_genes in gene_sets.items():
        cols = np.array([index[g] for g in set_genes])
        slide_draws = (
            rng.integers(0, n_slides, size=(n_boot, n_slides)) if n_slides > 1 else np.zeros((n_boot, 1), dtype=int)
        )
        gene_draws = rng.integers(0, len(cols), size=(n_boot, len(cols)))
        draws.append((set_name, cols, slide_draws, gene_draws))
    rows = []
    resampled = "slides+genes" if n_slides > 1 else "genes (one test slide)"
    for method in per_slide:
        if method == reference:
            continue
        d_slide = per_slide[reference] - per_slide[method]
        for set_name, cols, slide_draws, gene_draws in draws:
            for kind in PEARSON_KINDS:
                if kind == "per_slide":
                    point_ref = _per_slide_statistic(per_slide[reference][:, cols])
                    point_other = _per_slide_statistic(per_slide[method][:, cols])
                    point = _per_slide_statistic(d_slide[:, cols])
                    boot = np.array(
                        [
                            _per_slide_statistic(d_slide[np.ix_(s, cols[g])])
                            for s, g in zip(slide_draws, gene_draws, strict=True)
                        ]
                    )
                else:
                    r_ref = _pooled_r(stats[reference], np.ones(n_slides), cols)
                    r_other = _pooled_r(stats[method], np.ones(n_slides), cols)
                    point_ref, point_other, point = _nanmean(r_ref), _nanmean(r_other), _nanmean(r_ref - r_other)
                    boot = np.empty(n_boot)
                    for b, (s, g) in enumerate(zip(slide_draws, gene_draws, strict=True)):
                        weights = np.bincount(s, minlength=n_slides).astype(np.float64)
                        d = _pooled_r(stats[reference], weights, cols) - _pooled_r(stats[method], weights, cols)
                        boot[b] = _nanmean(d[g])
                low, high, p_not_better = _interval(boot)
                rows.append(
                    {
                        "reference": reference,
                        "method": method,
                        "gene_set": set_name,
                        "pearson": kind,
                        "n_slides": n_slides,
                        "n_genes": len(cols),
                        "reference_value": point_ref,
                        "method_value": point_other,
                        "difference": point,
                        "ci_low": low,
                        "ci_high": high,
                        "p_not_better": p_not_better,
                        "resampled": resampled,
                        "n_boot": n_boot,
                    }
                )
    return pd.DataFrame(rows, columns=list(PAIRED_COLUMNS))


FOLD_PAIRED_COLUMNS = (
    "reference",
    "method",
    "gene_set",
    "n_folds",
    "n_runs",
    "reference_value",
    "method_value",
    "difference",
    "ci_low",
    "ci_high",
    "p_not_better",
    "folds_better",
    "n_boot",
)


def fold_paired_differences(
    runs: Sequence[tuple[str, Mapping[str, pd.Series], Mapping[str, Sequence[str]]]],
    reference: str,
    *,
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Paired differences ``reference`` − X pooled over cross-validation folds and seeds.

    ``runs`` holds one ``(fold, pearson, gene_sets)`` per run (a fold trained with one seed):
    ``pearson[method]`` is the Pearson r per gene (a Series indexed by gene) on the fold's test
    slide, ``gene_sets`` that run's sets (each fold chooses its own panel, and the held-out genes
    depend on the seed, so sets differ between runs). The statistic of a gene set is the mean over
    folds of the mean over the fold's runs of the mean over the set's genes of the difference —
    every fold counts once, however many seeds it ran with. The bootstrap resamples folds (with
    replacement; the unit of replication) and, within each run, the set's genes (with
    replacement), ``n_boot`` times with a fixed seed; ``ci_low``/``ci_high`` are the 2.5 and 97.5
    percentiles, ``p_not_better`` the fraction of resamples with a difference ≤ 0, and
    ``folds_better`` the folds whose own mean difference is > 0.
    """
    if not runs:
        raise ValueError("no runs to compare")
    folds = list(dict.fromkeys(fold for fold, _, _ in runs))
    by_fold = {f: [i for i, (fold, _, _) in enumerate(runs) if fold == f] for f in folds}
    methods = [m for m in runs[0][1] if m != reference]
    if any(reference not in pearson for _, pearson, _ in runs):
        raise KeyError(f"reference method {reference!r} is missing from a run")
    set_names = [s for s in runs[0][2] if all(s in sets for _, _, sets in runs)]
    rng = np.random.default_rng(seed)
    fold_draws = rng.integers(0, len(folds), size=(n_boot, len(folds)))
    rows = []
    for set_name in set_names:
        genes = [list(sets[set_name]) for _, _, sets in runs]
        gene_draws = [rng.integers(0, len(g), size=(n_boot, len(g))) for g in genes]
        for method in methods:
            if not all(method in pearson for _, pearson, _ in runs):
                continue
            ref = [pearson[reference].reindex(g).to_numpy(np.float64) for (_, pearson, _), g in zip(runs, genes)]
            other = [pearson[method].reindex(g).to_numpy(np.float64) for (_, pearson, _), g in zip(runs, genes)]
            diff = [a - b for a, b in zip(ref, other, strict=True)]

            groups = [by_fold[f] for f in folds]
            per_fold = _fold_means(diff, groups)
            boot = np.array(
                [
                    _nanmean(
                        _fold_means([d[g[b]] for d, g in zip(diff, gene_draws, strict=True)], groups)[fold_draws[b]]
                    )
                    for b in range(n_boot)
                ]
            )
            low, high, p_not_better = _interval(boot)
            rows.append(
                {
                    "reference": reference,
                    "method": method,
                    "gene_set": set_name,
                    "n_folds": len(folds),
                    "n_runs": len(runs),
                    "reference_value": _nanmean(_fold_means(ref, groups)),
                    "method_value": _nanmean(_fold_means(other, groups)),
                    "difference": _nanmean(per_fold),
                    "ci_low": low,
                    "ci_high": high,
                    "p_not_better": p_not_better,
                    "folds_better": int((per_fold > 0).sum()),
                    "n_boot": n_boot,
                }
            )
    return pd.DataFrame(rows, columns=list(FOLD_PAIRED_COLUMNS))


def _fold_means(values: Sequence[np.ndarray], groups: Sequence[Sequence[int]]) -> np.ndarray:
    """Per fold: the mean over its runs (``groups[k]`` indexes ``values``) of each run's gene mean."""
    return np.array([_nanmean(np.array([_nanmean(values[i]) for i in group])) for group in groups])

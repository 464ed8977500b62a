"""Per-gene metrics of predicted spot expression, and their summaries over gene sets.

Definitions (also in ``docs/evaluation.md``):

* Metrics are computed per slide and gene, over the slide's spots: Pearson and Spearman
  correlation between truth and prediction, mean squared error and mean absolute error, on the
  normalised scale of ``panel_values`` (log1p of counts per 10,000).
* A correlation is undefined when either side is constant over the slide's spots (a gene never
  detected on a test slide, a method that predicts one value everywhere, e.g. the mean
  baseline). It is NaN then, never 0: a 0 would pull the mean towards "no relation" for a
  reason that has nothing to do with the image. Summaries exclude NaNs and report how many
  (slide, gene) pairs they used and dropped, so the exclusion is visible.
* Summaries aggregate over the set's genes within each slide first, then average the per-slide
  numbers over slides (slides are the unit of replication, as HEST-Benchmark's folds and
  mclSTExp's leave-one-slide-out), and give the standard deviation over slides.
* Gene sets come from the TRAINING statistics in ``gene_panel.tsv`` (:func:`gene_sets_from_panel`),
  never from the test slides' truth or from test performance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.stats import rankdata

METRIC_COLUMNS = ("pearson", "spearman", "mse", "mae")


def _columnwise_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each column of ``a`` with the same column of ``b`` (float64);
    NaN where either column is constant (zero spread: the correlation is undefined)."""
    constant = (np.ptp(a, axis=0) == 0) | (np.ptp(b, axis=0) == 0)
    ac = a - a.mean(axis=0)
    bc = b - b.mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (ac * bc).sum(axis=0) / np.sqrt((ac * ac).sum(axis=0) * (bc * bc).sum(axis=0))
    r = np.clip(r, -1.0, 1.0)
    r[constant] = np.nan
    return r


def gene_metrics(truth: np.ndarray, pred: np.ndarray, genes: Sequence[str]) -> pd.DataFrame:
    """Per-gene metrics of one slide: columns ``gene``, ``pearson``, ``spearman``, ``mse``, ``mae``,
    ``n_spots``.

    ``truth`` and ``pred`` are (N spots, G genes) on the same scale, columns in ``genes`` order.
    Pearson/Spearman are NaN for a gene whose truth or prediction is constant over the N spots
    (undefined correlation; see the module docstring). Spearman = Pearson of the average ranks
    (ties share their mean rank, as ``scipy.stats.spearmanr``).
    """
    truth = np.asarray(truth, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    if truth.ndim != 2 or truth.shape != pred.shape:
        raise ValueError(f"truth and pred must both be (N, G) of the same shape, got {truth.shape} and {pred.shape}")
    if truth.shape[1] != len(genes):
        raise ValueError(f"{truth.shape[1]} columns but {len(genes)} gene names")
    if truth.shape[0] < 2:
        raise ValueError(f"need at least 2 spots to compute correlations, got {truth.shape[0]}")
    if not (np.isfinite(truth).all() and np.isfinite(pred).all()):
        raise ValueError("truth and pred must be finite (a NaN/inf prediction is a bug upstream)")
    error = pred - truth
    return pd.DataFrame(
        {
            "gene": list(genes),
            "pearson": _columnwise_correlation(truth, pred),
            "spearman": _columnwise_correlation(rankdata(truth, axis=0), rankdata(pred, axis=0)),
            "mse": (error**2).mean(axis=0),
            "mae": np.abs(error).mean(axis=0),
            "n_spots": truth.shape[0],
        }
    )


def evaluate_predictions(
    truth_by_sample: Mapping[str, np.ndarray], preds: Mapping[tuple[str, str], np.ndarray], genes: Sequence[str]
) -> pd.DataFrame:
    """Long table, one row per (sample, method, gene): ``sample``, ``method`` + :func:`gene_metrics`.

    ``truth_by_sample[sample]`` and ``preds[(sample, method)]`` are (N, G) with columns in
    ``genes`` order and rows in the same spot order. A prediction for a sample without truth is
    an error (it would otherwise be dropped without a word).
    """
    unknown = sorted({s for s, _ in preds} - set(truth_by_sample))
    if unknown:
        raise KeyError(f"predictions for samples without truth: {unknown}")
    if not preds:
        raise ValueError("no predictions to evaluate")
    tables = []
    for (sample, method), pred in preds.items():
        try:
            table = gene_metrics(truth_by_sample[sample], pred, genes)
        except ValueError as err:
            raise ValueError(f"sample {sample!r}, method {method!r}: {err}") from err
        table.insert(0, "method", method)
        table.insert(0, "sample", sample)
        tables.append(table)
    return pd.concat(tables, ignore_index=True)


def gene_sets_from_panel(panel: pd.DataFrame, n_top: int = 50) -> dict[str, list[str]]:
    """Gene sets for :func:`summarise`, from ``gene_panel.tsv`` (training statistics only).

    * ``all``: the whole panel;
    * ``top{n}_heg``: the ``n_top`` panel genes with the highest mean normalised expression on the
      training samples (smallest ``mean_rank``), the HEG set of mclSTExp — chosen on training
      slides instead of mclSTExp's test-slide truth;
    * ``top{n}_hvg``: the ``n_top`` panel genes with the highest normalised dispersion on the
      training samples (smallest ``dispersion_rank``) — HEST's 50-HVG idea, without its leakage
      (HEST issue #89: lists computed on all samples);
    * ``heldout``: genes with ``heldout`` True (never seen in pretraining); present only when the
      panel has some.

    A panel smaller than ``n_top`` gives top sets equal to the panel (``n_genes`` in the summary
    shows it).
    """
    missing = sorted({"gene", "mean_rank", "dispersion_rank", "heldout"} - set(panel.columns))
    if missing:
        raise KeyError(f"gene panel lacks columns {missing}")
    sets = {
        "all": panel["gene"].tolist(),
        f"top{n_top}_heg": panel.sort_values("mean_rank")["gene"].head(n_top).tolist(),
        f"top{n_top}_hvg": panel.sort_values("dispersion_rank")["gene"].head(n_top).tolist(),
    }
    heldout = panel.loc[panel["heldout"].astype(bool), "gene"].tolist()
    if heldout:
        sets["heldout"] = heldout
    return sets


def summarise(metrics: pd.DataFrame, gene_sets: Mapping[str, Sequence[str]]) -> pd.DataFrame:
    """One row per (method, gene set) from the long table of :func:`evaluate_predictions`.

    For each slide: mean and median of the set's Pearson over genes (NaN excluded), mean
    Spearman (NaN excluded), mean MSE and MAE over the set's genes; then each number is averaged
    over slides. Columns: ``method``, ``gene_set``, ``n_genes`` (genes of the set),
    ``n_slides``, ``pearson_mean``, ``pearson_std_slides`` (std over slides of the per-slide
    mean, ddof 0 as HEST's fold std), ``pearson_median``, ``spearman_mean``, ``mse_mean``,
    ``mae_mean``, ``n_pearson_used`` / ``n_pearson_nan`` ((slide, gene) pairs kept / excluded).
    A slide where every gene of the set is NaN contributes nothing to the Pearson columns (it
    is counted in ``n_pearson_nan``). Every gene of a set must appear in ``metrics``.
    """
    rows = []
    evaluated = set(metrics["gene"])
    for set_name, genes in gene_sets.items():
        absent = sorted(set(genes) - evaluated)
        if absent:
            raise KeyError(f"gene set {set_name!r}: genes not in the metrics table: {absent[:10]}")
        if not genes:
            raise ValueError(f"gene set {set_name!r} is empty")
        subset = metrics[metrics["gene"].isin(set(genes))]
        for method, per_method in subset.groupby("method", sort=True):
            per_slide = per_method.groupby("sample").agg(
                pearson_mean=("pearson", "mean"),
                pearson_median=("pearson", "median"),
                spearman_mean=("spearman", "mean"),
                mse_mean=("mse", "mean"),
                mae_mean=("mae", "mean"),
            )
            used = int(per_method["pearson"].notna().sum())
            rows.append(
                {
                    "method": method,
                    "gene_set": set_name,
                    "n_genes": len(set(genes)),
                    "n_slides": len(per_slide),
                    "pearson_mean": per_slide["pearson_mean"].mean(),
                    "pearson_std_slides": per_slide["pearson_mean"].std(ddof=0),
                    "pearson_median": per_slide["pearson_median"].mean(),
                    "spearman_mean": per_slide["spearman_mean"].mean(),
                    "mse_mean": per_slide["mse_mean"].mean(),
                    "mae_mean": per_slide["mae_mean"].mean(),
                    "n_pearson_used": used,
                    "n_pearson_nan": len(per_method) - used,
                }
            )
    return pd.DataFrame(rows)

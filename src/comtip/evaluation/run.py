"""The evaluation run (rule ``evaluate``): every method's predictions on the test slides against
the truth, written as ``metrics.tsv`` (slide × gene × method) and ``summary.tsv`` (method × gene
set). The metrics themselves: :mod:`comtip.evaluation.metrics`."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from comtip._core.atomic import atomic_paths
from comtip._core.errors import PipelineInputError
from comtip.data.genes import read_panel
from comtip.evaluation.metrics import evaluate_predictions, gene_sets_from_panel, summarise
from comtip.evaluation.paired import PAIRED_COLUMNS, paired_differences, pooled_pearson, sufficient_stats

log = logging.getLogger(__name__)


def run_evaluation(
    truth_npzs: Mapping[str, str | Path],
    predictions: Mapping[tuple[str, str], str | Path],
    panel_tsv: str | Path,
    out_metrics: str | Path,
    out_summary: str | Path,
    out_paired: str | Path | None = None,
    *,
    reference: str | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    spots_h5ads: Mapping[str, str | Path] | None = None,
) -> pd.DataFrame:
    """Per slide × gene × method metrics, the per-method summary over the gene sets (with the
    pooled Pearson beside the per-slide one) and, when ``out_paired`` is given, the paired
    differences ``reference`` − every other method (:mod:`comtip.evaluation.paired`; a table
    with its header only when ``reference`` is None). With ``spots_h5ads`` (sample →
    ``spots.h5ad``, whose ``obsm["spatial"]`` rows are the truth's spots), the metrics gain
    Moran's I of the true and predicted maps (:mod:`comtip.evaluation.spatial`) and the summary
    ``morans_i_abs_diff_mean``."""
    panel = read_panel(panel_tsv)
    genes = list(panel["gene"])
    truth = {}
    for sample, path in truth_npzs.items():
        arrays = np.load(path)
        if list(arrays["panel_genes"]) != genes:
            raise PipelineInputError(f"panel genes differ from {Path(panel_tsv).absolute()}", sample=sample, path=path)
        truth[sample] = arrays["panel_values"]
    preds = {}
    for (sample, method), path in predictions.items():
        pred = ad.read_h5ad(path)
        if list(pred.var_names) != genes:
            raise PipelineInputError(f"genes predicted by {method} differ from the panel", sample=sample, path=path)
        if sample in truth and pred.n_obs != len(truth[sample]):
            raise PipelineInputError(
                f"{method} predicts {pred.n_obs} spots but the sample has {len(truth[sample])}",
                sample=sample,
                path=path,
            )
        preds[(sample, method)] = np.asarray(pred.X, dtype=np.float64)
    metrics = evaluate_predictions(truth, preds, genes)
    gene_sets = gene_sets_from_panel(panel)
    summary = summarise(metrics, gene_sets)
    if spots_h5ads is not None:
        from comtip.evaluation.spatial import add_morans_i  # squidpy: imported only when used

        metrics, summary = add_morans_i(metrics, summary, truth, preds, spots_h5ads, truth_npzs, genes, gene_sets)
    samples = sorted({s for s, _ in preds})
    methods = sorted({m for _, m in preds})
    stats = {m: np.stack([sufficient_stats(truth[s], preds[(s, m)]) for s in samples]) for m in methods}
    index = {g: i for i, g in enumerate(genes)}
    pooled = {}
    for method in methods:
        r = pooled_pearson(stats[method].sum(axis=0))
        for set_name, set_genes in gene_sets.items():
            values = r[[index[g] for g in set_genes]]
            pooled[(method, set_name)] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
    position = list(summary.columns).index("pearson_median")
    summary.insert(
        position,
        "pearson_pooled_mean",
        [pooled[(m, g)] for m, g in zip(summary["method"], summary["gene_set"], strict=True)],
    )
    paired = None
    if out_paired is not None:
        if reference is None:
            log.info("no paired table: no CoMTIP method among the evaluated ones (evaluate.paired_reference)")
        else:
            per_slide = {
                m: metrics[metrics["method"] == m]
                .pivot(index="sample", columns="gene", values="pearson")
                .loc[samples, genes]
                .to_numpy()
                for m in methods
            }
            paired = paired_differences(per_slide, stats, genes, gene_sets, reference, n_boot=n_boot, seed=seed)
            log.info(
                "paired differences %s - each other method over %d test slides, %d bootstrap resamples",
                reference,
                len(samples),
                n_boot,
            )
    outputs = [out_metrics, out_summary] + ([out_paired] if out_paired is not None else [])
    with atomic_paths(*outputs) as tmp:
        metrics.to_csv(tmp[0], sep="\t", index=False)
        summary.to_csv(tmp[1], sep="\t", index=False)
        if out_paired is not None:
            table = paired if paired is not None else pd.DataFrame(columns=list(PAIRED_COLUMNS))
            table.to_csv(tmp[2], sep="\t", index=False)
    return summary

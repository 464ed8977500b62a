"""The evaluation run (rule ``evaluate``): every method's predictions on the test slides against
the truth, written as ``metrics.tsv`` (slide × gene × method) and ``summary.tsv`` (method × gene
set). The metrics themselves: :mod:`comtip.evaluation.metrics`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from comtip._core.atomic import atomic_paths
from comtip._core.errors import PipelineInputError
from comtip.data.genes import read_panel
from comtip.evaluation.metrics import evaluate_predictions, gene_sets_from_panel, summarise


def run_evaluation(
    truth_npzs: Mapping[str, str | Path],
    predictions: Mapping[tuple[str, str], str | Path],
    panel_tsv: str | Path,
    out_metrics: str | Path,
    out_summary: str | Path,
) -> pd.DataFrame:
    """Per slide × gene × method metrics and the per-method summary over the gene sets."""
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
        preds[(sample, method)] = np.asarray(pred.X, dtype=np.float64)
    metrics = evaluate_predictions(truth, preds, genes)
    summary = summarise(metrics, gene_sets_from_panel(panel))
    with atomic_paths(out_metrics, out_summary) as (tmp_metrics, tmp_summary):
        metrics.to_csv(tmp_metrics, sep="\t", index=False)
        summary.to_csv(tmp_summary, sep="\t", index=False)
    return summary

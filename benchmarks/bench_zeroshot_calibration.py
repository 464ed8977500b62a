"""Why zero-shot goes below zero on her2st: library size, and a calibration that removes it.

Diagnostic, not part of the pipeline. On a finished run folder it prints, per evaluation slide:

* correlations of the spot-wise mean zero-shot prediction and of the mean truth with log total
  counts, and of sentence length (tokens) with log total counts;
* mean per-gene Pearson and MSE of zero-shot as the pipeline computes it ("plain": quantile grid,
  training prior, learned scale) and "calibrated": every prompt's text embedding minus the mean
  embedding of the same value for ``--ref-genes`` random vocabulary genes, i.e.
  s(x, g, v) − mean_g' s(x, g', v) (exact: the score is linear in the text embedding). That
  removes the part of the score that depends on the value alone, whatever the gene.

    .venv/bin/python benchmarks/bench_zeroshot_calibration.py RUN_DIR --train C3 C4 --eval C2

RUN_DIR needs ``results/models/pretrain/comtip.pt``, the samples' ``gene_sentences.npz`` and
``spots.h5ad``, and ``results/embeddings/comtip/{eval}.npz`` (made for test slides).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import anndata as ad
import numpy as np
import torch

from comtip.evaluation.metrics import gene_metrics
from comtip.predict.zeroshot import log_value_prior, prompt_embeddings, prompt_expectation, zero_shot_grid_and_prior
from comtip.training import load_pretrained


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--train", nargs="+", required=True)
    ap.add_argument("--eval", nargs="+", required=True)
    ap.add_argument("--ref-genes", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    results = args.run / "results"
    model, info = load_pretrained(results / "models" / "pretrain" / "comtip.pt")
    edges = np.asarray(info["bin_edges"], np.float32)
    train = np.concatenate([np.load(results / s / "gene_sentences.npz")["panel_values"] for s in args.train])
    grid, prior = zero_shot_grid_and_prior(train)
    log_prior = log_value_prior(prior, grid.shape)
    ref = list(np.random.default_rng(args.seed).choice(info["vocabulary"], args.ref_genes, replace=False))
    scale = model.scale().detach().float()
    for s in args.eval:
        sent = np.load(results / s / "gene_sentences.npz")
        genes, truth = list(sent["panel_genes"]), sent["panel_values"]
        x = torch.from_numpy(np.load(results / "embeddings" / "comtip" / f"{s}.npz")["image_embeddings"]).float()
        text = prompt_embeddings(model, genes, grid, edges)
        flat = grid.reshape(1, -1)
        reference = sum(prompt_embeddings(model, [g], flat, edges)[0] for g in ref) / len(ref)
        reference = reference.reshape(text.shape)
        counts = ad.read_h5ad(results / s / "spots.h5ad").obs.loc[sent["barcodes"].astype(str), "total_counts"]
        log_counts = np.log1p(counts.to_numpy(float))
        length = (~sent["pad"]).sum(1)
        for name, t in (("plain", text), ("calibrated", text - reference)):
            pred = prompt_expectation(x, t, grid, scale, log_prior)
            metrics = gene_metrics(truth, pred, genes)
            print(
                f"{s} {name:10s} Pearson {metrics['pearson'].mean():+.3f}  MSE {metrics['mse'].mean():.3f}  "
                f"corr(mean prediction, log counts) {np.corrcoef(pred.mean(1), log_counts)[0, 1]:+.2f}"
            )
        print(
            f"{s} corr(mean truth, log counts) {np.corrcoef(truth.mean(1), log_counts)[0, 1]:+.2f}; "
            f"corr(sentence length, log counts) {np.corrcoef(length, log_counts)[0, 1]:+.2f}"
        )


if __name__ == "__main__":
    main()

"""CoMTIP zero-shot variants on an existing run: value prior (none / training) × value grid
(shared 0..max / per-gene 0..max / per-gene training quantiles).

Reads a finished run's outputs and writes nothing under it: the pretrained checkpoint, the
training samples' ``panel_values`` (they alone set the grids and priors), and for each evaluation
sample its ``gene_sentences.npz`` (truth) and image embeddings — ``results/embeddings/comtip/``
when the pipeline made them, else computed here from ``spot_patches.npy`` into ``--cache``
(the validation slide has none in a standard run). Metrics per slide with
``comtip.evaluation.metrics.gene_metrics``, averaged over genes, then over slides (as ``summarise``), for all
panel genes and the held-out ones (``heldout`` in ``gene_panel.tsv``); then paired Pearson
differences over (slide, gene) pairs, mean ± standard error. Prints markdown:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_zeroshot.py --results results \\
        --train demo_01 demo_02 --eval demo_04 demo_03
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from comtip.evaluation.metrics import gene_metrics
from comtip.predict.embeddings import image_embeddings
from comtip.predict.zeroshot import default_value_grid, quantile_value_grid, value_prior, zero_shot
from comtip.training.checkpoint import load_pretrained


def _embeddings(results: Path, sample: str, barcodes: np.ndarray, model, info: dict, cache: Path) -> np.ndarray:
    made = results / "embeddings" / "comtip" / f"{sample}.npz"
    if made.exists():
        data = np.load(made)
        if not np.array_equal(data["barcodes"], barcodes):
            raise ValueError(f"{made}: rows are not {sample}'s spots")
        return data["image_embeddings"]
    cached = cache / f"{sample}_image_embeddings.npy"
    if not cached.exists():
        patches = np.load(results / sample / "spot_patches.npy", mmap_mode="r")
        np.save(cached, image_embeddings(model, patches, int(info["model_config"]["image_size"]), batch_size=64))
    return np.load(cached)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=Path("results"))
    ap.add_argument("--checkpoint", type=Path, help="default: RESULTS/models/pretrain/comtip.pt")
    ap.add_argument("--train", nargs="+", required=True, help="training samples (grids and priors)")
    ap.add_argument("--eval", nargs="+", required=True, help="evaluation samples (never training ones)")
    ap.add_argument("--grid-points", type=int, default=16)
    ap.add_argument("--smoothing", type=float, default=0.01, help="value_prior's uniform mixing weight")
    ap.add_argument("--cache", type=Path, help="where computed embeddings go (default: a temporary folder)")
    args = ap.parse_args()
    if set(args.train) & set(args.eval):
        ap.error("a sample cannot be both training and evaluation")
    torch.set_num_threads(1)
    results = args.results
    model, info = load_pretrained(args.checkpoint or results / "models" / "pretrain" / "comtip.pt")
    edges = np.asarray(info["bin_edges"], np.float32)
    train = np.concatenate([np.load(results / s / "gene_sentences.npz")["panel_values"] for s in args.train])
    panel = pd.read_csv(results / "genes" / "gene_panel.tsv", sep="\t").set_index("gene")
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or Path(tmp)
        cache.mkdir(parents=True, exist_ok=True)
        slides = {}
        for s in args.eval:
            sent = np.load(results / s / "gene_sentences.npz")
            slides[s] = (
                _embeddings(results, s, sent["barcodes"], model, info, cache),
                sent["panel_values"],
                list(sent["panel_genes"]),
            )
    genes = slides[args.eval[0]][2]
    if any(g != genes for *_, g in slides.values()):
        raise ValueError("evaluation samples have different panels")
    held = panel.loc[genes, "heldout"].to_numpy(bool)
    n = args.grid_points
    grids = {
        "shared": default_value_grid(train, n),
        "gene_range": np.stack([np.linspace(0.0, m, n) for m in train.max(0)]).astype(np.float32),
        "quantile": quantile_value_grid(train, n),
    }
    per_gene = {
        "mean baseline": {
            s: gene_metrics(truth, np.broadcast_to(train.mean(0), truth.shape), genes)
            for s, (_, truth, _) in slides.items()
        }
    }
    for gname, grid in grids.items():
        for pname in ("none", "training"):
            prior = value_prior(train, grid, smoothing=args.smoothing) if pname == "training" else None
            per_gene[f"{gname} / {pname}"] = {
                s: gene_metrics(truth, zero_shot(model, x, genes, grid, edges, prior=prior), genes)
                for s, (x, truth, _) in slides.items()
            }
    print(
        f"train {' '.join(args.train)}; evaluated on {' '.join(args.eval)}; {n} grid points; prior smoothing "
        f"{args.smoothing}; learned logit scale {float(model.scale().detach()):.2f}"
    )
    for label, sel in (("all", np.ones(len(genes), bool)), ("heldout", held)):
        rows = []
        for name, by_slide in per_gene.items():
            row = {"grid / prior": name}
            row.update({f"Pearson {s}": m.pearson[sel].mean() for s, m in by_slide.items()})
            for col in ("pearson", "spearman", "mse", "mae"):
                row[col] = np.mean([m[col][sel].mean() for m in by_slide.values()])
            rows.append(row)
        print(f"\n{label} genes ({int(sel.sum())})\n")
        print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3f"))
    print("\npaired Pearson differences over (slide, gene) pairs, mean ± s.e. (all genes / held-out)\n")
    for a, b in (
        ("shared / training", "shared / none"),
        ("quantile / training", "shared / none"),
        ("quantile / training", "shared / training"),
        ("quantile / training", "quantile / none"),
    ):
        cells = []
        for sel in (np.ones(len(genes), bool), held):
            d = np.concatenate([(per_gene[a][s].pearson - per_gene[b][s].pearson).to_numpy()[sel] for s in slides])
            cells.append(f"{d.mean():+.4f} ± {d.std(ddof=1) / np.sqrt(len(d)):.4f}")
        print(f"- {a} − {b}: {cells[0]} / {cells[1]}")


if __name__ == "__main__":
    main()

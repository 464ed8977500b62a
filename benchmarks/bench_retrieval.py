"""Pretraining retrieval on the demo cohort, against chance and against the cohort's own ceiling,
for the shipped model and its ablations; zero-shot Pearson of each checkpoint alongside.

Why a ceiling: the demo's expression is a function of a few things drawn on the slide (cell-type
fractions, nuclei density) plus counting noise and a per-spot library size, so even a perfect
image reader cannot tell apart spots whose difference is mostly noise. The "oracle" row reads
those latent values from ``truth.h5ad`` (what the simulator drew), fits a ridge regression from
them to every spot's normalised expression of the pretraining genes (5-fold cross-fitted, so a
spot's prediction never saw its own counts), and retrieves each spot's expression vector by cosine similarity of
z-scored profiles, over the same candidates as the model (all training spots of all training
samples). The model rows retrain ``comtip.training.pretrain`` on the run's training samples
with config overrides and read its ``retrieval.tsv``; zero-shot uses the shipped settings
(per-gene quantile grid, training prior) on the evaluation samples.

Needs a finished demo run (README command 1) in ``--run``; writes only under ``--out``:

    .venv/bin/python benchmarks/bench_retrieval.py --run . --out /tmp/bench_retrieval \\
        --seeds 0 1 --markdown BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
import yaml
from sklearn.linear_model import Ridge
from sklearn.model_selection import KFold, cross_val_predict

from _markdown import write_section  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from comtip.evaluation.metrics import gene_metrics
from comtip.predict.embeddings import image_embeddings
from comtip.predict.zeroshot import zero_shot, zero_shot_grid_and_prior
from comtip.training import load_pretrained, pretrain
from comtip.training.retrieval import accuracy_from_embeddings

SECTION = "### Pretraining retrieval against the demo cohort's ceiling"
PARENT = "## Prediction quality"
# name -> (model overrides, pretrain overrides) on top of the run folder's config/config.yaml
VARIANTS = {
    "config (InfoNCE + MFM + PAAT)": ({}, {}),
    "config, no PAAT": ({"paat": False}, {}),
    "config, no MFM": ({"mfm": False}, {}),
    "config, InfoNCE only": ({"paat": False, "mfm": False}, {}),
    "config, 3x epochs": ({}, {"epochs_factor": 3}),
    "config, cut sentences from expressed genes": ({}, {"subsample_genes": "expressed"}),
}


def _samples(run: Path) -> tuple[list[str], list[str]]:
    cfg = yaml.safe_load((run / "config" / "config.yaml").read_text())
    sheet = pd.read_csv(run / cfg["samples"], sep="\t")
    train = sheet.loc[sheet["split"] == "train", "sample"].tolist()
    evaluate = sheet.loc[sheet["split"].isin(["val", "test"]), "sample"].tolist()
    return train, evaluate


def oracle(
    run: Path, results: Path, train: list[str], vocabulary: list[str], *, shuffle_seed: int | None = None
) -> dict[str, float]:
    """Retrieval by a ridge model of expression on the simulator's own latent values
    (``shuffle_seed``: latent rows permuted across spots first, a control that must give chance)."""
    cfg = yaml.safe_load((run / "config" / "config.yaml").read_text())
    features, targets = [], []
    for s in train:
        truth = ad.read_h5ad(run / cfg["demo"]["dir"] / s / "truth.h5ad")
        sent = np.load(results / s / "gene_sentences.npz")
        obs = truth.obs.reset_index(drop=True)
        row = pd.Series(np.arange(len(obs)), index=obs["barcode"].astype(str))
        idx = row.loc[sent["barcodes"].astype(str)].to_numpy()
        genes = list(sent["panel_genes"])
        cols = [genes.index(g) for g in vocabulary]
        latent = np.column_stack(
            [
                truth.obsm["cell_type_fractions"][idx],
                obs["density_z"].to_numpy()[idx],
                np.log(obs["expected_library_size"].to_numpy()[idx]),
            ]
        )
        features.append(latent)
        targets.append(sent["panel_values"][:, cols])
    x, y = np.vstack(features), np.vstack(targets)
    if shuffle_seed is not None:
        x = np.random.default_rng(shuffle_seed).permutation(x)
    # cross-fitted: each spot's profile is predicted by a ridge fitted on the other folds, so the
    # ceiling does not profit from fitting the spot's own noise (it did, in-sample: a shuffled
    # control then ranked at 0.64 × chance on the 164-spot tiny cohort instead of ~1)
    pred = cross_val_predict(Ridge(alpha=1e-3), x, y, cv=KFold(5, shuffle=True, random_state=0))

    def unit(a: np.ndarray) -> torch.Tensor:
        a = (a - a.mean(0)) / (a.std(0) + 1e-8)
        return torch.from_numpy(a / (np.linalg.norm(a, axis=1, keepdims=True) + 1e-12)).float()

    return accuracy_from_embeddings(unit(pred), unit(y), (1, 5))


def variant_configs(cfg: dict, model_over: dict, train_over: dict, seed: int) -> tuple[dict, dict]:
    """(model, pretrain) options of a variant: the run's config with the overrides on top. Any
    pretrain key can be overridden; ``epochs_factor`` multiplies the config's epochs."""
    model = {**cfg.get("model", {}), **model_over}
    tr = {**cfg.get("pretrain", {}), **{k: v for k, v in train_over.items() if k != "epochs_factor"}, "seed": seed}
    tr["epochs"] = int(tr.get("epochs", 8)) * train_over.get("epochs_factor", 1)
    return model, tr


def train_variant(
    run: Path, results: Path, train: list[str], model_over: dict, train_over: dict, seed: int, out: Path
) -> tuple[dict[str, float], Path, float]:
    cfg = yaml.safe_load((run / "config" / "config.yaml").read_text())
    model, tr = variant_configs(cfg, model_over, train_over, seed)
    ckpt = out / "comtip.pt"
    start = time.perf_counter()
    if not ckpt.exists():
        pretrain(
            train,
            [results / s / "spot_patches.npy" for s in train],
            [results / s / "spot_patches.parquet" for s in train],
            [results / s / "gene_sentences.npz" for s in train],
            results / "genes" / "value_bins.tsv",
            ckpt,
            out / "comtip.metrics.tsv",
            out / "comtip.retrieval.tsv",
            model_config=model,
            train_config=tr,
            threads=torch.get_num_threads(),
        )
    seconds = time.perf_counter() - start
    table = pd.read_csv(out / "comtip.retrieval.tsv", sep="\t")
    table = table[table["spots"] == "all"].set_index("k")
    row = {
        "n": float(table["n_spots"].iloc[0]),
        "top1": float(table.loc[1, "accuracy"]),
        "top5": float(table.loc[5, "accuracy"]),
        "median_rank": float(table["median_rank"].iloc[0]),
        "chance_median_rank": float(table["chance_median_rank"].iloc[0]),
    }
    return row, ckpt, seconds


def zero_shot_pearson(ckpt: Path, results: Path, train: list[str], evaluate: list[str]) -> tuple[float, float]:
    """Mean over evaluation slides of the mean per-gene Pearson (all panel genes, held-out ones)."""
    model, info = load_pretrained(ckpt)
    edges = np.asarray(info["bin_edges"], np.float32)
    train_values = np.concatenate([np.load(results / s / "gene_sentences.npz")["panel_values"] for s in train])
    grid, prior = zero_shot_grid_and_prior(train_values)
    panel = pd.read_csv(results / "genes" / "gene_panel.tsv", sep="\t").set_index("gene")
    rows = []
    for s in evaluate:
        sent = np.load(results / s / "gene_sentences.npz")
        genes, truth = list(sent["panel_genes"]), sent["panel_values"]
        held = panel.loc[genes, "heldout"].to_numpy(bool)
        emb = image_embeddings(
            model,
            np.load(results / s / "spot_patches.npy", mmap_mode="r"),
            int(info["model_config"]["image_size"]),
            batch_size=128,
        )
        pearson = gene_metrics(truth, zero_shot(model, emb, genes, grid, edges, prior=prior), genes)["pearson"]
        rows.append((pearson.mean(), pearson[held].mean()))
    return float(np.mean([a for a, _ in rows])), float(np.mean([b for _, b in rows]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("."), help="folder of a finished demo run")
    ap.add_argument("--out", type=Path, required=True, help="where the variants' checkpoints go")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--markdown", type=Path, help="also write the section into this file")
    ap.add_argument("--section", default=SECTION, help="markdown heading of the section written")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    run = args.run.resolve()
    results = run / "results"
    train, evaluate = _samples(run)
    vocabulary = load_pretrained(results / "models" / "pretrain" / "comtip.pt")[1]["vocabulary"]
    ceiling = oracle(run, results, train, vocabulary)
    rows = [
        {
            "model": "oracle: ridge on the simulator's latent values",
            "seed": "—",
            "steps": "—",
            "top-1 × chance": ceiling["top1"] * ceiling["n"],
            "top-5 × chance": ceiling["top5"] * ceiling["n"] / 5,
            "median rank": ceiling["median_rank"],
            "zero-shot Pearson (all / held-out)": "—",
            "seconds": "—",
        }
    ]
    for name in args.variants:
        model_over, train_over = VARIANTS[name]
        for seed in args.seeds:
            out = args.out / f"{name.split(' (')[0].replace(' ', '_').replace(',', '')}_seed{seed}"
            out.mkdir(parents=True, exist_ok=True)
            row, ckpt, seconds = train_variant(run, results, train, model_over, train_over, seed, out)
            zs_all, zs_held = zero_shot_pearson(ckpt, results, train, evaluate)
            steps = int(pd.read_csv(out / "comtip.metrics.tsv", sep="\t")["step"].iloc[-1])
            rows.append(
                {
                    "model": name,
                    "seed": seed,
                    "steps": steps,
                    "top-1 × chance": row["top1"] * row["n"],
                    "top-5 × chance": row["top5"] * row["n"] / 5,
                    "median rank": row["median_rank"],
                    "zero-shot Pearson (all / held-out)": f"{zs_all:.3f} / {zs_held:.3f}",
                    "seconds": f"{seconds:.0f}",
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    table = pd.DataFrame(rows)
    n = int(ceiling["n"])
    command = "python benchmarks/bench_retrieval.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    text = (
        f"{args.section}\n\nCommand: `{command}` (on a finished README demo run; {n} training spots, "
        f"chance median rank {(n - 1) / 2:.0f}; model rows retrain with config overrides, on "
        f"{torch.get_num_threads()} CPU threads).\n\n" + table.to_markdown(index=False, floatfmt=".1f") + "\n"
    )
    print(text)
    if args.markdown:
        write_section(args.markdown, args.section, text + "\n", parent=PARENT)


if __name__ == "__main__":
    main()

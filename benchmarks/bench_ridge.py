"""Benchmark the HEST ridge probe at cohort scale: the streamed fit (rule ``fit_ridge``,
``comtip.predict.ridge.fit_ridge_probe``) against the in-memory fit that every ``ridge_*``
prediction job used to run (the training features and values stacked in float64, then
``comtip.predict.baselines.fit_hest_ridge``: SVD and LSQR).

Synthetic training samples of 4,000 spots × 768 features (ViT-B width) and 250 panel genes,
written as the pipeline writes them: ``features`` (float32) with ``barcodes`` in one npz per sample,
``panel_values`` (float32), ``panel_genes`` and ``barcodes`` in another. Features and values come
from one low-rank model plus noise (64 latent factors), so the PCA and the ridge have signal.
Each fit runs in a fresh process; wall time and peak RSS (``ru_maxrss`` of the child) are
reported. The in-memory fit runs only up to ``--old-max`` spots. Both fits predict the first
sample's spots, and their agreement (max relative difference, worst per-gene Pearson) is reported.

    .venv/bin/python benchmarks/bench_ridge.py --spots 50000 200000 800000 --old-max 200000 \
        --markdown BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _markdown import head_commit, write_section  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from _peer import MEASURE  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Ridge probe at cohort scale"
LATENT = 64

STREAMED = (
    "import sys, numpy as np; from comtip.predict.ridge import fit_ridge_probe; "
    "out, pca, n = sys.argv[1], int(sys.argv[2]), (len(sys.argv) - 3) // 2; "
    "embs, sents = sys.argv[3 : 3 + n], sys.argv[3 + n :]; "
    "probe = fit_ridge_probe([f'S{i:03d}' for i in range(n)], embs, sents, out + '.npz', pca_dim=pca); "
    "np.save(out + '.pred.npy', probe.predict(np.load(embs[0])['features']))"
)
IN_MEMORY = (
    "import sys, numpy as np; from comtip.predict.baselines import fit_hest_ridge; "
    "out, pca, n = sys.argv[1], int(sys.argv[2]), (len(sys.argv) - 3) // 2; "
    "embs, sents = sys.argv[3 : 3 + n], sys.argv[3 + n :]; "
    "x = np.concatenate([np.load(p)['features'] for p in embs]); "
    "y = np.concatenate([np.load(p)['panel_values'] for p in sents]); "
    "probe = fit_hest_ridge(x, y, pca_dim=pca, fit_intercept=True); "
    "np.save(out + '.pred.npy', probe.predict(np.load(embs[0])['features']))"
)


def write_sample(root: Path, i: int, n_spots: int, model: tuple[np.ndarray, np.ndarray]) -> tuple[Path, Path]:
    """One sample's embeddings and gene-sentence npz (only the arrays the ridge reads)."""
    w, b = model
    rng = np.random.default_rng(1000 + i)
    z = rng.normal(size=(n_spots, LATENT)).astype(np.float32)
    feats = z @ w + rng.normal(size=(n_spots, w.shape[1])).astype(np.float32)
    values = np.log1p(np.exp(z @ b + rng.normal(size=(n_spots, b.shape[1])).astype(np.float32)))  # ≥ 0, skewed
    barcodes = np.array([f"S{i:03d}_{j}" for j in range(n_spots)])
    emb, sent = root / f"S{i:03d}_emb.npz", root / f"S{i:03d}_sentences.npz"
    np.savez(emb, barcodes=barcodes, features=feats)
    genes = np.array([f"GENE{g:03d}" for g in range(b.shape[1])])
    np.savez(sent, barcodes=barcodes, panel_genes=genes, panel_values=values.astype(np.float32))
    return emb, sent


def run_fit(code: str, out: Path, files: list[tuple[Path, Path]], pca_dim: int) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one fit in a fresh process."""
    args = [str(out), str(pca_dim), *(str(e) for e, _ in files), *(str(s) for _, s in files)]
    cmd = [sys.executable, "-c", MEASURE, sys.executable, "-c", code, *args]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    seconds, rss_kb, rc = result.stdout.split()
    if int(rc) != 0:
        raise RuntimeError(f"fit failed:\n{result.stderr}")
    return float(seconds), int(rss_kb) / 1024


def agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(max |a − b| / max |b|, worst per-gene Pearson r)."""
    ac, bc = a - a.mean(axis=0), b - b.mean(axis=0)
    r = (ac * bc).sum(axis=0) / np.sqrt((ac * ac).sum(axis=0) * (bc * bc).sum(axis=0))
    return float(np.abs(a - b).max() / np.abs(b).max()), float(r.min())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spots", type=int, nargs="+", default=[50_000, 200_000, 800_000], help="training spots")
    parser.add_argument("--per-sample", type=int, default=4000)
    parser.add_argument("--features", type=int, default=768)
    parser.add_argument("--genes", type=int, default=250)
    parser.add_argument("--pca-dim", type=int, default=256)
    parser.add_argument("--old-max", type=int, default=200_000, help="largest cohort the in-memory fit runs on")
    parser.add_argument("--markdown", type=Path, help="write the table as a section of this file")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    model = (
        (rng.normal(size=(LATENT, args.features)) / np.sqrt(LATENT)).astype(np.float32),
        (rng.normal(size=(LATENT, args.genes)) / np.sqrt(LATENT)).astype(np.float32),
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files: list[tuple[Path, Path]] = []
        for n in sorted(args.spots):
            while len(files) * args.per_sample < n:
                files.append(write_sample(root, len(files), args.per_sample, model))
            fits = {"streamed (fit_ridge, once per encoder)": STREAMED}
            if n <= args.old_max:
                fits["in memory (fit_hest_ridge, was: every ridge job)"] = IN_MEMORY
            preds = {}
            for label, code in fits.items():
                out = root / f"fit_{n}_{len(preds)}"
                seconds, rss = run_fit(code, out, files, args.pca_dim)
                preds[label] = np.load(f"{out}.pred.npy")
                rows.append([len(files) * args.per_sample, len(files), label, seconds, rss, ""])
                print(f"{n} spots, {label}: {seconds:.1f} s, {rss:.0f} MB", flush=True)
            if len(preds) == 2:
                rel, r = agreement(*preds.values())
                rows[-1][5] = rows[-2][5] = f"{rel:.1e} / {1 - r:.0e}"
                print(f"  predictions: max relative difference {rel:.2e}, worst Pearson 1 − {1 - r:.1e}")

    commit = head_commit(REPO)
    command = " ".join(
        ["--spots", *map(str, args.spots), "--old-max", str(args.old_max)]
        + (["--markdown", str(args.markdown)] if args.markdown else [])
    )
    lines = [
        SECTION,
        "",
        f"The HEST ridge probe (K = {args.pca_dim} PCA components, with intercept) on N synthetic training spots in "
        f"samples of {args.per_sample:,} spots × {args.features} features (float32) × {args.genes} genes, one npz pair "
        "per sample (N rounded up to whole samples); fresh process per fit (wall time includes Python's start and "
        f"imports), peak RSS of that process. Commit {commit}, {platform.node()}, "
        f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}. Command:",
        "",
        f"    .venv/bin/python benchmarks/bench_ridge.py {command}",
        "",
        "| training spots | samples | fit | wall time (s) | peak RSS (MB) | predictions vs the other fit: max rel. diff / 1 − worst Pearson |",  # noqa: E501
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {r[0]:,} | {r[1]} | {r[2]} | {r[3]:.1f} | {r[4]:.0f} | {r[5] or '—'} |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        write_section(args.markdown, SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

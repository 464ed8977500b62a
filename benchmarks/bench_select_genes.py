"""Benchmark gene selection (rule ``select_genes``) on cohorts of Visium-sized training samples.

Each sample is 4,000 spots × 18,000 genes with ~1,500 detected genes per spot (real Visium
sparsity; gene popularity and counts heavy-tailed), written as ``spots.h5ad`` with sparse counts,
as ingest writes it. ``comtip.data.genes.select_genes`` (default panel settings) runs in a fresh
process per cohort size; wall time and peak RSS (``ru_maxrss`` of the child) are reported, and,
as the peer in the same run, the same call on another checkout (``--peer-ref``, e.g. the commit
before streaming) up to ``--peer-max`` samples (the dense peer needs ~1.1 GB per sample).
``--method svg`` measures the Moran's I panel instead (spots on a Visium hexagon in
``obsm["spatial"]``; its own section of the markdown file).

    .venv/bin/python benchmarks/bench_select_genes.py --samples 2 5 10 25 50 --peer-ref b44d7f0 \
        --peer-max 10 --markdown BENCHMARKS.md
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

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from _markdown import head_commit, write_section  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from _peer import MEASURE, checkouts  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Gene selection at cohort scale"


def write_sample(path: Path, seed: int, n_spots: int, n_genes: int, detected: int) -> None:
    """Sparse counts: per spot ``detected`` distinct genes drawn by a Zipf-like popularity,
    counts 1 + geometric with a per-gene mean."""
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, n_genes + 1) ** 0.8
    popularity = rng.permutation(popularity / popularity.sum())
    per_gene = rng.lognormal(0.0, 1.0, n_genes)
    rows, cols = [], []
    for spot in range(n_spots):
        k = int(np.clip(rng.normal(detected, detected * 0.3), 50, n_genes // 2))
        picked = rng.choice(n_genes, size=k, replace=False, p=popularity)
        rows.append(np.full(k, spot, np.int32))
        cols.append(np.sort(picked).astype(np.int32))
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    counts = 1 + rng.geometric(1.0 / (1.0 + per_gene[cols])) - 1
    matrix = sp.csr_matrix((counts.astype(np.float32), (rows, cols)), shape=(n_spots, n_genes))
    adata = ad.AnnData(matrix)
    adata.obs_names = [f"s{seed}_{i}" for i in range(n_spots)]
    adata.var_names = [f"GENE{j:05d}" for j in range(n_genes)]
    side = int(np.ceil(np.sqrt(n_spots)))
    row, col = np.divmod(np.arange(n_spots), side)
    adata.obsm["spatial"] = np.stack([177.0 * col + 88.5 * (row % 2), 153.3 * row], 1)  # Visium hexagon, px
    adata.write_h5ad(path)


def run_select(checkout: Path, paths: list[Path], out: Path, method: str = "hvg_heg") -> tuple[float, float]:
    """(seconds, peak RSS in MB) of ``select_genes`` on ``paths`` in a fresh process."""
    call = (
        "import sys; from comtip.data.genes import select_genes; "
        f"select_genes(sys.argv[1:], {str(out / 'panel.tsv')!r}, {str(out / 'bins.tsv')!r}, method={method!r})"
    )
    cmd = [sys.executable, "-c", MEASURE, sys.executable, "-c", call, *map(str, paths)]
    env = {**os.environ, "PYTHONPATH": str(checkout / "src")}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    seconds, rss_kb, rc = result.stdout.split()
    if int(rc) != 0:
        raise RuntimeError(f"select_genes failed in {checkout}:\n{result.stderr}")
    return float(seconds), int(rss_kb) / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[2, 5, 10])
    parser.add_argument("--spots", type=int, default=4000)
    parser.add_argument("--genes", type=int, default=18000)
    parser.add_argument("--detected", type=int, default=1500)
    parser.add_argument("--peer-ref", help="git ref of the checkout to compare with (a worktree is made)")
    parser.add_argument("--peer-max", type=int, default=10, help="largest cohort the peer runs on")
    parser.add_argument("--method", default="hvg_heg", choices=["hvg", "heg", "hvg_heg", "svg"])
    parser.add_argument("--markdown", type=Path, help="write the table as a section of this file")
    args = parser.parse_args(argv)
    section = SECTION if args.method == "hvg_heg" else f"{SECTION} (genes.method: {args.method})"

    rows = []
    with tempfile.TemporaryDirectory() as tmp, checkouts(REPO, args.peer_ref, Path(tmp)) as found:
        root = Path(tmp)
        paths: list[Path] = []
        for n in sorted(args.samples):
            while len(paths) < n:
                paths.append(root / f"S{len(paths):03d}.h5ad")
                write_sample(paths[-1], len(paths), args.spots, args.genes, args.detected)
            panels = {}
            for label, checkout in found.items():
                if label != "this checkout" and n > args.peer_max:
                    continue
                out = root / f"out_{n}_{label.split()[0]}"
                out.mkdir()
                seconds, rss = run_select(checkout, paths, out, args.method)
                panels[label] = (
                    pd.read_csv(out / "panel.tsv", sep="\t")["gene"].tolist(),
                    (out / "bins.tsv").read_text(),
                )
                rows.append((n, label, seconds, rss))
                print(f"{n} samples, {label}: {seconds:.1f} s, {rss:.0f} MB", flush=True)
            if len(panels) == 2:
                mine, theirs = panels.values()
                print(f"  same panel genes as the peer: {mine[0] == theirs[0]}; same bin edges: {mine[1] == theirs[1]}")
                rows[-1] = (*rows[-1], mine == theirs)

    commit = head_commit(REPO)
    command = " ".join(
        ["--samples", *map(str, args.samples), "--spots", str(args.spots), "--detected", str(args.detected)]
        + (["--method", args.method] if args.method != "hvg_heg" else [])
        + ([f"--peer-ref {args.peer_ref} --peer-max {args.peer_max}"] if args.peer_ref else [])
        + (["--markdown", str(args.markdown)] if args.markdown else [])
    )
    lines = [
        section,
        "",
        f"`select_genes` (default panel settings, `method={args.method}`) on N training samples of "
        f"{args.spots:,} spots × "
        f"{args.genes:,} genes, ~{args.detected:,} detected genes per spot, sparse counts in `spots.h5ad`; "
        f"fresh process per size, peak RSS of that process. Commit {commit}, {platform.node()}, "
        f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}. Command:",
        "",
        f"    .venv/bin/python benchmarks/bench_select_genes.py {command}",
        "",
        "| samples | checkout | wall time (s) | peak RSS (MB) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:.0f} |" for r in rows]
    lines.append("")
    for n in sorted(args.samples):
        both = [r for r in rows if r[0] == n]
        if len(both) == 2:
            mine, peer = both
            lines.append(
                f"- {n} samples: {peer[3] / mine[3]:.1f}x less memory than the peer, "
                f"{peer[2] / mine[2]:.2f}x its speed; identical panel and bin edges: {peer[4]}."
            )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        write_section(args.markdown, section, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

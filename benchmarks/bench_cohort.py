"""Benchmark the workflow at cohort scale: every stage up to evaluation through Snakemake on
cohorts of Visium-sized samples, each rule's peak RSS and wall time from Snakemake's own
benchmark files (``logs/benchmark/``).

The samples are simulated with ``comtip-simulate`` (the demo simulator) at Visium size — a
6.5 mm capture area (~2,700 spots under tissue of the 4,992), 18,000 genes, ~5,000 UMIs and
~3,000 detected genes per spot — but with the slide at 2 µm/px, so that slides and patches are
small on disk: the patch *count* and the counts, genes and sentences are full size, and each
patch covers the production 112 µm, but at the slide's 2 µm/px (56 px, 9 KB; production's
224 px at 0.5 µm/px are 147 KB, 16× more: 200 such slides would need ~80 GB of patches, more
than this machine's disk). To keep simulation affordable, ``--base`` distinct samples are
simulated and every sample of the cohort is one of them under its own name (its own sheet row
and its own results): per-sample rules do the full work for each, cohort-level rules see N
samples' spots (the duplicated expression makes gene statistics no easier to compute). The
cohort grows by its training samples; the test and validation samples stay at ``--test`` and
``--val`` (4 and 2), since a test slide's jobs cost what the training reference costs, not what
the number of test slides does.

Every stage that runs on CPU in production runs here with the shipped defaults, except the
model: a tiny ViT and text encoder (as ``.test/config``) and 5 optimiser steps of pretraining,
so that the data path over all training samples is exercised without the GPU-bound cost. The run
goes to ``evaluation/metrics.tsv`` and every sample's ``tiles.parquet`` (ingest, tiling,
patches, gene selection, sentences, pretraining, embedding, the training reference, the ridge
probes, every baseline method, evaluation); fine-tuning, slide prediction and the report's
figures are left out. Sizes run in increasing order in one run folder, so the per-sample work of
the smaller cohort is reused (its rows are marked) and only cohort-level rules and new samples
run again; the table is rewritten after each size (``--markdown``), so a long series can be
committed between sizes.

    .venv/bin/python benchmarks/bench_cohort.py --samples 25 50 100 200 --dir /tmp/cohort \
        --markdown BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

from _markdown import head_commit, write_section  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Cohort scale: every CPU stage through Snakemake"
PLOT = "benchmarks/results/cohort_scale.png"
# every size measured so far, one row per (samples, rule), and one row per run: each invocation
# replaces its own sizes' rows and keeps the others, so sizes run on different days share a table
RESULTS = "benchmarks/results/cohort_scale.tsv"
RUNS = "benchmarks/results/cohort_runs.tsv"
MODEL = {
    "image_size": 32,
    "vision_kwargs": {"depth": 2},
    "text_dim": 32,
    "text_heads": 2,
    "text_ff": 64,
    "embed_dim": 64,
    "paat": False,
}
METHODS = ["mean", "ridge_comtip", "ridge_random", "retrieval_mean_comtip", "retrieval_weighted_comtip", "zeroshot"]


def simulate(base: Path, n: int, args: argparse.Namespace) -> list[Path]:
    folders = []
    for i in range(n):
        out = base / f"B{i:02d}"
        if not (out / "slide.tif").exists():
            started = time.perf_counter()
            subprocess.run(
                [
                    str(Path(sys.executable).with_name("comtip-simulate")),
                    "--out",
                    str(out),
                    "--sample",
                    f"B{i:02d}",
                    "--seed",
                    str(100 + i),
                    "--tissue-mm",
                    str(args.tissue_mm),
                    "--mpp",
                    str(args.mpp),
                    "--n-genes",
                    str(args.genes),
                    "--mean-counts",
                    str(args.mean_counts),
                ],
                check=True,
                capture_output=True,
            )
            (out / "truth.h5ad").unlink(missing_ok=True)  # the simulator's ground truth: not an input
            print(f"simulated {out.name} in {time.perf_counter() - started:.0f} s", flush=True)
        folders.append(out)
    return folders


def write_run(root: Path, n: int, bases: list[Path], n_test: int, n_val: int, mpp: float) -> None:
    """Sample sheet (the first ``n_test`` samples test, the next ``n_val`` val, the rest train)
    and config of an N-sample cohort."""
    rows = []
    for i in range(n):
        split = "test" if i < n_test else "val" if i < n_test + n_val else "train"
        base = bases[i % len(bases)]
        rows.append(
            {
                "sample": f"S{i:03d}",
                "spaceranger_dir": str(base / "outs"),
                "slide": str(base / "slide.tif"),
                "split": split,
            }
        )
    (root / "config").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(root / "config" / "samples.tsv", sep="\t", index=False)
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["samples"] = "config/samples.tsv"
    config["model"] = {**config.get("model", {}), **MODEL}
    # the production 112 µm context at the simulated slide's own resolution (see the docstring)
    config["patches"] = {**config["patches"], "mpp": mpp, "size_px": round(112 / mpp)}
    config["pretrain"] = {**config["pretrain"], "max_steps": 5, "batch_size": 64, "warmup_steps": 1, "log_every": 1}
    config["evaluate"] = {**config["evaluate"], "methods": METHODS}
    (root / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def check_disk(root: Path, n: int) -> None:
    """Stop before a size whose new samples would not fit on the disk (from the footprint per
    sample of the samples already in the run folder; 1 GB per sample before any has run)."""
    done = len(list((root / "results").glob("S[0-9][0-9][0-9]/spots.h5ad"))) if root.exists() else 0
    per_sample = folder_bytes(root / "results") / done if done else 2**30
    need = per_sample * max(0, n - done) * 1.2
    free = shutil.disk_usage(root if root.exists() else root.parent).free
    if need > free:
        raise SystemExit(
            f"{n} samples need ~{need / 2**30:.0f} GB more under {root} and {free / 2**30:.0f} GB are free: "
            "free space or pass --dir on a larger disk"
        )


def benchmark_table(root: Path) -> pd.DataFrame:
    """One row per job from ``logs/benchmark/<rule>/...tsv``: rule, seconds, max_rss (MB)."""
    rows = []
    for path in sorted((root / "logs" / "benchmark").rglob("*.tsv")):
        rule = path.relative_to(root / "logs" / "benchmark").parts[0]
        table = pd.read_csv(path, sep="\t")
        rss = pd.to_numeric(table["max_rss"], errors="coerce").max()
        rows.append(
            {
                "rule": rule,
                "seconds": float(table["s"].iloc[-1]),
                "cpu_seconds": float(pd.to_numeric(table["cpu_time"], errors="coerce").iloc[-1]),
                "max_rss_mb": rss,
                "mtime": path.stat().st_mtime,
            }
        )
    return pd.DataFrame(rows)


def plot(results: pd.DataFrame, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for rule, table in results.groupby("rule"):
        table = table.sort_values("samples")
        axes[0].plot(table["samples"], table["peak_rss_mb"] / 1024, marker="o", label=rule)
        axes[1].plot(table["samples"], table["max_cpu_seconds"], marker="o", label=rule)
    axes[0].axhline(4, color="grey", linestyle=":", linewidth=1)
    axes[0].set_ylabel("peak RSS of one job (GB; target 4)")
    axes[1].set_ylabel("most CPU time of one job (s)")
    for ax in axes:
        ax.set_xlabel("samples in the cohort")
        ax.set_xscale("log")
        ax.set_xticks(sorted(results["samples"].unique()), [str(n) for n in sorted(results["samples"].unique())])
        ax.minorticks_off()
    axes[1].set_yscale("log")
    axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def merge_rows(path: Path, new: pd.DataFrame) -> pd.DataFrame:
    """``new``'s rows replace the rows of the same cohort sizes in the TSV at ``path``; the rest stay."""
    if path.exists():
        old = pd.read_csv(path, sep="\t")
        new = pd.concat([old[~old["samples"].isin(new["samples"])], new], ignore_index=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = new.sort_values([c for c in ("samples", "rule") if c in new.columns]).reset_index(drop=True)
    new.to_csv(path, sep="\t", index=False)
    return new


def markdown(results: pd.DataFrame, runs: pd.DataFrame, args: argparse.Namespace) -> str:
    """The section: every size in ``results`` (this run's and earlier runs' kept in ``RESULTS``)."""
    lines = [
        SECTION,
        "",
        f"Simulated Visium-sized samples ({args.tissue_mm} mm capture area, {args.genes:,} genes, "
        f"~{args.mean_counts:,} UMIs per spot; slides at {args.mpp} µm/px, so patches are small on disk "
        f"(112 µm at {args.mpp} µm/px: {round(112 / args.mpp)} px, 1/16 of production's 224 px); {args.test} test and "
        f"{args.val} validation samples, the rest training; "
        f"{args.base} distinct simulated samples, each cohort sample one of them under its own name), "
        "the shipped config except a tiny model and 5 pretraining steps, through Snakemake to "
        f"`evaluation/metrics.tsv` with `--cores {args.cores}`. Per rule: its jobs, the largest peak RSS and the "
        "slowest wall time of one job and the most CPU time of one job (Snakemake's `benchmark:` files; CPU time "
        "is the steadier figure when other work shares the machine). Each size grows the previous size's run "
        'folder, so its first samples\' per-sample jobs are reused ("+N reused"); every cohort-wide rule runs '
        f"again on all samples. The figures of every size are kept in `{RESULTS}` (one run per size, see the "
        "list below for each run's commit and date). Command (one run folder, the sizes one after the other):",
        "",
        "    .venv/bin/python benchmarks/bench_cohort.py --samples "
        f"{' '.join(map(str, sorted(results['samples'].unique())))} --dir /tmp/cohort --markdown BENCHMARKS.md",
        "",
        f"![peak RSS and time per rule against cohort size]({PLOT})",
        "",
        "| samples | rule | jobs run | peak RSS (MB) | slowest job (s) | most CPU in one job (s) | all its jobs (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results.sort_values(["samples", "rule"]).itertuples():
        lines.append(
            f"| {row.samples} | {row.rule} | {row.jobs}{' (+' + str(row.reused) + ' reused)' if row.reused else ''} | "
            f"{row.peak_rss_mb:.0f} | {row.max_seconds:.1f} | {row.max_cpu_seconds:.1f} | {row.total_seconds:.0f} |"
        )
    lines.append("")
    for run in runs.sort_values("samples").itertuples():
        over = results[(results["samples"] == run.samples) & (results["peak_rss_mb"] > 4096)]["rule"].tolist()
        lines.append(
            f"- {run.samples} samples (commit {run.commit}, {run.machine}, {run.date}): "
            f"whole run {run.wall_min:.1f} min"
            f"{' (' + run.note + ')' if isinstance(run.note, str) and run.note else ''}; results/ "
            f"{run.disk_gb:.1f} GB on disk; rules above 4 GB: {', '.join(over) if over else 'none'}."
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[25, 50, 100, 200])
    parser.add_argument("--base", type=int, default=4, help="distinct simulated samples")
    parser.add_argument("--tissue-mm", type=float, default=6.5)
    parser.add_argument("--mpp", type=float, default=2.0)
    parser.add_argument("--genes", type=int, default=18000)
    parser.add_argument("--mean-counts", type=int, default=5000)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--test", type=int, default=4, help="test samples (fixed as the cohort grows)")
    parser.add_argument("--val", type=int, default=2, help="validation samples (fixed as the cohort grows)")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/comtip-bench-cohort"))
    parser.add_argument("--markdown", type=Path, help="write the table as a section of this file")
    parser.add_argument(
        "--since",
        type=float,
        help="epoch seconds: resume a stopped run of the smallest size given; its jobs finished since then count "
        "as run at that size (and --rerun-incomplete redoes the jobs the stop cut short)",
    )
    args = parser.parse_args(argv)

    bases = simulate(args.dir / "base", args.base, args)
    root = args.dir / "run"
    results = []
    for n in sorted(args.samples):
        resumed = args.since is not None and n == min(args.samples)
        check_disk(root, n)
        write_run(root, n, bases, args.test, args.val, args.mpp)
        started = time.time()
        cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(root)]
        cmd += [
            "--cores",
            str(args.cores),
            "--rerun-triggers",
            "mtime",
            "input",
            *(["--rerun-incomplete"] if args.since else []),
            "--",
            "results/evaluation/metrics.tsv",
            *(f"results/S{i:03d}/tiles.parquet" for i in range(n)),
        ]
        env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
        run = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.time() - started
        if run.returncode:
            sys.stderr.write(run.stderr[-5000:])
            raise SystemExit(f"snakemake failed at {n} samples (log above; run folder {root})")
        jobs = benchmark_table(root)
        fresh = jobs["mtime"] >= (args.since if resumed else started)
        for rule, table in jobs.groupby("rule"):
            ran = table[fresh.loc[table.index]]
            measured = ran if len(ran) else table  # a rule none of whose jobs ran: its earlier figures
            results.append(
                {
                    "samples": n,
                    "rule": rule,
                    "jobs": len(ran),
                    "reused": len(table) - len(ran),
                    "peak_rss_mb": measured["max_rss_mb"].max(),
                    "max_seconds": measured["seconds"].max(),
                    "max_cpu_seconds": measured["cpu_seconds"].max(),
                    "total_seconds": ran["seconds"].sum(),
                }
            )
        shutil.copytree(root / "logs" / "benchmark", args.dir / f"benchmark_{n}", dirs_exist_ok=True)
        table = pd.DataFrame(results)
        print(table[table["samples"] == n].to_string(index=False), f"\nwall {wall / 60:.1f} min", flush=True)
        run_row = {
            "samples": n,
            "commit": head_commit(REPO),
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.node()}, {os.cpu_count()} cores",
            "wall_min": round(wall / 60, 1),
            "disk_gb": round(folder_bytes(root / "results") / 2**30, 1),
            "note": (
                f"resumed: the run started {time.strftime('%Y-%m-%d %H:%M', time.gmtime(args.since))} UTC was "
                "stopped; this is the resumed invocation's wall only"
            )
            if resumed
            else "",
        }
        if args.markdown:
            every = merge_rows(REPO / RESULTS, table[table["samples"] == n])
            runs = merge_rows(REPO / RUNS, pd.DataFrame([run_row]))
            plot(every, REPO / PLOT)
            write_section(args.markdown, SECTION, markdown(every, runs, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

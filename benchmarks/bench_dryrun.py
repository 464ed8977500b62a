"""Benchmark the workflow parse: ``snakemake -n`` on sample sheets of N Visium samples.

Every job start and every dry run parses the whole workflow (Snakefile, rules, input functions),
so its cost is paid once per job on a cluster. For each sheet size the dry run runs in a fresh
process, best of ``--repeats``; its wall time and peak RSS (``ru_maxrss`` of the child) are
reported, and also, as the peer in the same run, the same dry run of another checkout of the
pipeline (``--peer-ref``, e.g. the commit before a change, checked out with ``git worktree``).

The samples are real-looking: each has a Space Ranger ``outs/`` folder (empty h5, positions and
scale-factor files: a dry run only checks they exist) and a slide file; 60 % train, 20 % val,
20 % test, plus no H&E-only slides. The shipped ``config/config.yaml`` is used with only
``samples`` changed.

    .venv/bin/python benchmarks/bench_dryrun.py --samples 4 200 --peer-ref 9f31800 --markdown BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from _markdown import head_commit, write_section  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from _peer import MEASURE, checkouts  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HEADER = "sample\tspaceranger_dir\tslide\tsplit\tmpp\tspot_diameter_um\tbatch\tpatient\tspot_pitch_um\n"


def write_cohort(root: Path, n: int) -> Path:
    """A run folder with ``n`` samples' inputs and the shipped config pointing at their sheet."""
    rows = []
    for i in range(n):
        name = f"S{i:03d}"
        outs = root / "data" / name / "outs"
        (outs / "spatial").mkdir(parents=True)
        for rel in ("filtered_feature_bc_matrix.h5", "spatial/tissue_positions.csv", "spatial/scalefactors_json.json"):
            (outs / rel).write_bytes(b"")
        (outs.parent / "slide.tif").write_bytes(b"")
        split = ("train", "test", "train", "val", "train")[i % 5]
        rows.append(f"{name}\t{outs}\t{outs.parent / 'slide.tif'}\t{split}\t0.5\t\tb{i % 4}\tp{i // 2}\n")
    (root / "config").mkdir()
    (root / "config" / "samples.tsv").write_text(HEADER + "".join(rows))
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["samples"] = "config/samples.tsv"
    (root / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    return root


def dry_run(checkout: Path, run: Path) -> tuple[float, float, int]:
    """(seconds, peak RSS in MB, jobs planned) of one ``snakemake -n`` in a fresh process."""
    cmd = [
        sys.executable,
        "-c",
        MEASURE,
        sys.executable,
        "-m",
        "snakemake",
        "-n",
        "--quiet",
        "rules",
        "--snakefile",
        str(checkout / "Snakefile"),
        "--directory",
        str(run),
        "--cores",
        "1",
    ]
    env = {**os.environ, "PYTHONPATH": str(checkout / "src")}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    seconds, rss_kb, rc = out.stdout.split()
    if int(rc) != 0:
        raise RuntimeError(f"dry run failed in {checkout}:\n{out.stderr}")
    stats = out.stderr.split("Job stats:", 1)[1].split("\n\n", 1)[0].splitlines()[3:]
    jobs = sum(int(line.split()[-1]) for line in stats if line.strip() and line.split()[0] != "total")
    return float(seconds), int(rss_kb) / 1024, jobs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[4, 200])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peer-ref", help="git ref of the checkout to compare with (a worktree is made)")
    parser.add_argument("--markdown", type=Path, help="write the table as a section of this file")
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory() as tmp, checkouts(REPO, args.peer_ref, Path(tmp)) as found:
        for n in args.samples:
            run = write_cohort(Path(tmp) / f"n{n}", n)
            for label, checkout in found.items():
                results = [dry_run(checkout, run) for _ in range(args.repeats)]
                best = min(results)
                rows.append((n, label, best[0], max(r[1] for r in results), best[2]))
                print(f"{n} samples, {label}: {best[0]:.2f} s, {rows[-1][3]:.0f} MB, {best[2]} jobs", flush=True)

    commit = head_commit(REPO)
    lines = [
        "## Workflow parse (dry run)",
        "",
        f"`snakemake -n` of the shipped config on sheets of N real-looking samples (best of {args.repeats}, "
        f"fresh process each; peak RSS of the snakemake process). Commit {commit}, {platform.node()}, "
        f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}. Command:",
        "",
        "    .venv/bin/python benchmarks/bench_dryrun.py "
        + " ".join(
            f"--samples {' '.join(map(str, args.samples))}".split()
            + ([f"--peer-ref {args.peer_ref}"] if args.peer_ref else [])
            + (["--markdown", str(args.markdown)] if args.markdown else [])
        ),
        "",
        "| samples | checkout | wall time (s) | peak RSS (MB) | jobs planned |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {n} | {label} | {sec:.2f} | {rss:.0f} | {jobs} |" for n, label, sec, rss, jobs in rows]
    if args.peer_ref:
        lines.append("")
        for n in args.samples:
            mine = [r for r in rows if r[0] == n and r[1] == "this checkout"][0]
            peer = [r for r in rows if r[0] == n and r[1] != "this checkout"][0]
            lines.append(
                f"- {n} samples: {peer[2] / mine[2]:.2f}x faster than the peer, {peer[3] / mine[3]:.2f}x less memory."
            )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        write_section(args.markdown, "## Workflow parse (dry run)", text)
    return 0


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    sys.exit(main())

"""Benchmark the pretraining data path: batches per second from the patch and sentence files,
``blocks`` sampler against ``uniform`` (today's order before the blocks sampler), cold and warm
page cache, and the memory each loading process holds.

A synthetic cohort of ``--samples`` × ``--spots`` spots is written in the pipeline's formats:
``spot_patches.npy`` (uint8 patches of ``--patch`` px, random pixels so that nothing compresses
or dedups), ``spot_patches.parquet`` and ``gene_sentences.npz`` at full size (128 tokens, 300
vocabulary genes). Every measure runs in a fresh process that builds ``SpotData`` and iterates
a ``DataLoader`` over ``--batches`` micro-batches of ``--batch`` spots exactly as pretraining
does (no model: this is what the loader alone delivers). "cold" drops the files' pages from the
page cache first (``posix_fadvise(DONTNEED)`` after ``sync``; no root needed), "warm" reads
them all first. Reported: spots/s (and per worker), peak RSS, and the private (anonymous)
memory at the end — file pages mapped from the page cache count in RSS but are shared by the
processes of a node and reclaimable. With ``--peer-ref`` the same measure runs on another
checkout (e.g. the commit before memory-mapped sentences) with its uniform sampler.

    .venv/bin/python benchmarks/bench_loader.py --samples 20 --spots 2000 --workers 0 2 \
        --peer-ref 139bf66 --markdown BENCHMARKS.md
    .venv/bin/python benchmarks/bench_loader.py --samples 200 --spots 4000 --patch 16 --workers 0 \
        --peer-ref 139bf66 --title "Memory at 800,000 spots" --markdown BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from _markdown import head_commit, write_section  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from _peer import checkouts  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PARENT = "## Pretraining data path"
MAX_LEN, VOCABULARY = 128, 300

# Run in the child: build the data and the plan as pretraining does, time the loader.
CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
from comtip.training import SpotData, sample_files
try:
    from comtip.training.sampling import BatchPlan, MicroBatches
except ImportError:  # a checkout from before the blocks sampler
    from comtip.training.data import BatchPlan, MicroBatches
args = json.loads(sys.argv[1])
torch.set_num_threads(1)
data = SpotData(sample_files(args["samples"], args["patches"], args["indexes"], args["sentences"]))
if args["sampler"] == "uniform":
    plan = BatchPlan(len(data), args["batch"], 1, 1, 0)
else:
    plan = BatchPlan(len(data), args["batch"], 1, 1, 0, sampler="blocks", sample_sizes=data.sample_sizes,
                     block_size=args["block_size"], shuffle_window=args["shuffle_window"])
    data.readahead_block = args["block_size"]
steps = args["batches"]
loader = torch.utils.data.DataLoader(data, batch_size=None, sampler=MicroBatches(plan, 0, 0, steps),
                                     num_workers=args["workers"], prefetch_factor=4 if args["workers"] else None)
start, spots = time.perf_counter(), 0
for batch in loader:
    spots += len(batch["images"])
seconds = time.perf_counter() - start
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
print(json.dumps({"seconds": seconds, "spots": spots,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "anon_mb": int(status["RssAnon"].split()[0]) / 1024}))
"""


def write_sample(folder: Path, name: str, n: int, patch: int, seed: int) -> dict[str, Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    files = {
        "patches": folder / "spot_patches.npy",
        "index": folder / "spot_patches.parquet",
        "sentences": folder / "gene_sentences.npz",
    }
    out = np.lib.format.open_memmap(files["patches"], mode="w+", dtype=np.uint8, shape=(n, patch, patch, 3))
    for lo in range(0, n, 256):  # written in chunks: memory of the writer stays small
        out[lo : lo + 256] = rng.integers(0, 256, (min(256, n - lo), patch, patch, 3), dtype=np.uint8)
    out.flush()
    del out
    barcodes = np.array([f"{name}-{i:05d}" for i in range(n)])
    pd.DataFrame({"barcode": barcodes}).to_parquet(files["index"])
    lengths = rng.integers(40, MAX_LEN + 1, n)
    pad = np.arange(MAX_LEN)[None, :] >= lengths[:, None]
    gene_ids = np.argsort(rng.random((n, VOCABULARY)), axis=1)[:, :MAX_LEN].astype(np.int32)
    values = np.sort(rng.gamma(2.0, 0.6, (n, MAX_LEN)).astype(np.float32), axis=1)[:, ::-1]
    panel_values = np.zeros((n, VOCABULARY), np.float32)
    np.put_along_axis(panel_values, gene_ids, np.where(pad, 0, values), axis=1)
    genes = np.array([f"GENE{j:04d}" for j in range(VOCABULARY)])
    np.savez(
        files["sentences"],
        barcodes=barcodes,
        gene_ids=np.where(pad, 0, gene_ids),
        values=np.where(pad, 0, values),
        bins=np.where(pad, 0, np.minimum(values * 4, 15).astype(np.int16) + 1).astype(np.int16),
        pad=pad,
        vocabulary=genes,
        panel_genes=genes,
        panel_values=panel_values,
    )
    return files


def set_cache(paths: list[Path], state: str) -> None:
    """Drop the files' pages from the page cache (cold) or read them all (warm)."""
    if state == "cold":
        os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            if state == "cold":
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                while os.read(fd, 1 << 24):
                    pass
        finally:
            os.close(fd)


def measure(checkout: Path, cohort: dict, **options) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout / "src")}
    arg = json.dumps({**{k: [str(p) for p in v] for k, v in cohort.items()}, **options})
    result = subprocess.run([sys.executable, "-c", CHILD, arg], capture_output=True, text=True, env=env)
    if result.returncode:
        raise RuntimeError(f"loader run failed in {checkout}:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--spots", type=int, default=2000)
    parser.add_argument("--patch", type=int, default=224)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--shuffle-window", type=int, default=4096)
    parser.add_argument("--peer-ref", help="git ref of the checkout to compare with (a worktree is made)")
    parser.add_argument("--markdown", type=Path, help="write the table as a section of this file")
    parser.add_argument("--title", default="Loader throughput", help="subsection of BENCHMARKS.md to write")
    parser.add_argument("--dir", type=Path, help="where to write the cohort (default: a temporary folder)")
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp, checkouts(REPO, args.peer_ref, Path(tmp)) as found:
        root = Path(tmp) / "cohort"
        started = time.perf_counter()
        samples = [f"S{i:03d}" for i in range(args.samples)]
        files = [write_sample(root / s, s, args.spots, args.patch, i) for i, s in enumerate(samples)]
        cohort = {
            "samples": samples,
            "patches": [f["patches"] for f in files],
            "indexes": [f["index"] for f in files],
            "sentences": [f["sentences"] for f in files],
        }
        every = [p for f in files for p in f.values()]
        size_gb = sum(p.stat().st_size for p in every) / 1e9
        print(f"cohort: {len(samples)} samples, {size_gb:.1f} GB, written in {time.perf_counter() - started:.0f} s")
        runs = [("this checkout", s) for s in ("uniform", "blocks")]
        runs += [(label, "uniform") for label in found if label != "this checkout"]
        for workers in args.workers:
            for cache in ("cold", "warm"):
                for label, sampler in runs:
                    set_cache(every, cache)
                    result = measure(
                        found[label],
                        cohort,
                        sampler=sampler,
                        workers=workers,
                        batch=args.batch,
                        batches=args.batches,
                        block_size=args.block_size,
                        shuffle_window=args.shuffle_window,
                    )
                    rate = result["spots"] / result["seconds"]
                    rows.append((label, sampler, workers, cache, rate, rate / max(workers, 1), result))
                    print(
                        f"{label}, {sampler}, {workers} workers, {cache}: {rate:.0f} spots/s, "
                        f"peak RSS {result['peak_rss_mb']:.0f} MB, private {result['anon_mb']:.0f} MB",
                        flush=True,
                    )

    commit = head_commit(REPO)
    command = (
        f"--samples {args.samples} --spots {args.spots} --patch {args.patch} --batch {args.batch} "
        f"--batches {args.batches} --workers {' '.join(map(str, args.workers))} --title {args.title!r}"
        + (f" --peer-ref {args.peer_ref}" if args.peer_ref else "")
        + (f" --markdown {args.markdown}" if args.markdown else "")
    )
    section = f"### {args.title}"
    lines = [
        section,
        "",
        f"{args.samples} samples × {args.spots:,} spots ({size_gb:.1f} GB: {args.patch}-px patches, full-size "
        f"sentences), {args.batches} micro-batches of {args.batch} spots per measure, loader only (no model), "
        f"fresh process per measure. Commit {commit}, {platform.node()}, {os.cpu_count()} cores, "
        f"{time.strftime('%Y-%m-%d')}. Command:",
        "",
        f"    .venv/bin/python benchmarks/bench_loader.py {command}",
        "",
        "| checkout | sampler | workers | page cache | spots/s | spots/s per worker | peak RSS (MB) | private (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.0f} | {r[5]:.0f} | {r[6]['peak_rss_mb']:.0f} | "
        f"{r[6]['anon_mb']:.0f} |"
        for r in rows
    ]
    lines.append("")
    for workers in args.workers:
        for cache in ("cold", "warm"):
            by = {(r[0], r[1]): r[4] for r in rows if r[2] == workers and r[3] == cache}
            if ("this checkout", "uniform") in by:
                lines.append(
                    f"- {workers} workers, {cache}: blocks / uniform = "
                    f"{by[('this checkout', 'blocks')] / by[('this checkout', 'uniform')]:.2f}x"
                )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        write_section(args.markdown, section, text, parent=PARENT)
    return 0


if __name__ == "__main__":
    sys.exit(main())

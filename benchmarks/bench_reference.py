"""Benchmark the training reference at cohort scale: stacking it (rules ``training_values`` and
``training_embeddings``, ``comtip.predict.reference.stack_training``) and the ``predict_baseline``
methods that read it (``mean``, ``retrieval_mean_comtip``, ``retrieval_weighted_comtip`` — called
``bleep_comtip`` and ``mclstexp_comtip`` in checkouts before the rename, which a ``--peer-ref``
run is given —; for ``zeroshot`` its
training-side step, ``zero_shot_grid_and_prior``, since the rest needs a pretrained checkpoint
and does not depend on the number of training spots).

Synthetic training samples of 4,000 spots, written as the pipeline writes them: an embeddings
npz per sample (``barcodes``, ``features`` 768-d, ``image_embeddings`` and ``sentence_embeddings``
256-d unit rows, float32, as ``embed_spots``) and a gene-sentences-like npz (``barcodes``,
``panel_genes``, ``panel_values`` 250 genes float32, ~40 % zeros; the token arrays of a real
``gene_sentences.npz`` are left out: nothing here reads them). One test sample of 4,000 spots.
Each step runs in a fresh process (wall time includes Python's start and imports); peak RSS is
``ru_maxrss`` of that process. With ``--peer-ref`` the same steps run on another checkout (a
``git worktree``) up to ``--peer-max`` spots, and its outputs are compared with this checkout's.

    .venv/bin/python benchmarks/bench_reference.py --spots 52000 200000 800000 --peer-ref 39f7f51 \\
        --peer-max 200000 --markdown BENCHMARKS.md
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

from _markdown import head_commit, write_section  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from _peer import MEASURE, checkouts  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Training reference at cohort scale"

STACK = (
    "import sys; from comtip.predict import reference as r; out, keys, files = sys.argv[1], sys.argv[2], sys.argv[3:]; "
    "r.stack_training(files, [f'S{i:03d}' for i in range(len(files))], getattr(r, keys), out)"
)
# the methods' names in checkouts from before the rename (a --peer-ref may be one)
OLD_NAMES = {"retrieval_mean_comtip": "bleep_comtip", "retrieval_weighted_comtip": "mclstexp_comtip"}
PREDICT = (
    "import sys, numpy as np; from comtip.predict.methods import PredictionContext, predict_with_method; "
    "from comtip.predict.registry import METHODS; method, values, ref, test, out = sys.argv[1:6]; "
    f"method = method if method in METHODS else {OLD_NAMES!r}.get(method, method); "
    "ctx = PredictionContext(spots_h5ad=test + '/spots.h5ad', test_sentences=test + '/gene_sentences.npz', "
    "train_value_files=[values], train_embedding_files=[ref], test_embedding=test + '/embeddings.npz'); "
    "np.save(out, predict_with_method(method, ctx, out + '.h5ad'))"
)
GRID_AND_PRIOR = (
    "import sys, numpy as np; from comtip.predict.methods import PredictionContext; "
    "from comtip.predict.zeroshot import zero_shot_grid_and_prior; method, values, ref, test, out = sys.argv[1:6]; "
    "ctx = PredictionContext(spots_h5ad=test + '/spots.h5ad', test_sentences=test + '/gene_sentences.npz', "
    "train_value_files=[values]); grid, prior = zero_shot_grid_and_prior(ctx.train_values, 16); "
    "np.save(out, np.concatenate([grid, prior], axis=1))"
)
IMPORTS = "import comtip.predict.methods, comtip.predict.reference"


def write_sample(root: Path, name: str, n: int, genes: np.ndarray, seed: int) -> tuple[Path, Path]:
    """One sample's embeddings npz and gene-sentences-like npz, as the pipeline writes them."""
    rng = np.random.default_rng(seed)
    barcodes = np.array([f"{name}_{i:04d}-1" for i in range(n)])

    def unit(width: int) -> np.ndarray:
        x = rng.standard_normal((n, width), dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    emb, sent = root / f"{name}_embeddings.npz", root / f"{name}_gene_sentences.npz"
    np.savez(
        emb,
        barcodes=barcodes,
        features=rng.standard_normal((n, 768), dtype=np.float32),
        image_embeddings=unit(256),
        sentence_embeddings=unit(256),
    )
    values = np.log1p(rng.gamma(0.6, 2.0, (n, len(genes)))).astype(np.float32)
    values[values < 0.4] = 0.0
    np.savez(sent, barcodes=barcodes, panel_genes=genes, panel_values=values)
    return emb, sent


def write_test(root: Path, n: int, genes: np.ndarray) -> Path:
    test = root / "test"
    test.mkdir()
    emb, sent = write_sample(test, "T", n, genes, seed=99)
    emb.rename(test / "embeddings.npz")
    sent.rename(test / "gene_sentences.npz")
    barcodes = np.load(test / "embeddings.npz")["barcodes"]
    spots = ad.AnnData(X=np.zeros((n, 1), np.float32), obs=pd.DataFrame(index=barcodes))
    spots.obsm["spatial"] = np.stack([np.arange(n) % 64 * 100.0, np.arange(n) // 64 * 100.0], axis=1)
    spots.write_h5ad(test / "spots.h5ad")
    return test


def measure(checkout: Path, code: str, *args: str) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of ``code`` in a fresh process on ``checkout``."""
    cmd = [sys.executable, "-c", MEASURE, sys.executable, "-c", code, *args]
    env = {**os.environ, "PYTHONPATH": str(checkout / "src")}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    seconds, rss_kb, rc = result.stdout.split()
    if int(rc) != 0:
        raise RuntimeError(f"failed in {checkout}:\n{result.stderr}")
    return float(seconds), int(rss_kb) / 1024


def same_members(a: Path, b: Path) -> bool:
    """Every member of two stacked files equal (dtype included), compared in chunks of rows."""
    from comtip._core.npzmap import open_npz
    from comtip._core.rows import open_rows

    ma, mb = open_npz(a), open_npz(b)
    if sorted(ma) != sorted(mb):
        return False
    for key in ma:
        ra, rb = open_rows(a, key), open_rows(b, key)
        if ra.shape != rb.shape or ra.dtype != rb.dtype:
            return False
        if not all(np.array_equal(x, rb.read(lo, lo + len(x))) for lo, x in ra.chunks()):
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spots", type=int, nargs="+", default=[52_000, 200_000, 800_000], help="training spots")
    parser.add_argument("--per-sample", type=int, default=4000)
    parser.add_argument("--genes", type=int, default=250)
    parser.add_argument("--peer-ref", help="git ref of the checkout to compare with (a worktree is made)")
    parser.add_argument("--peer-max", type=int, default=200_000, help="largest cohort the peer runs on")
    parser.add_argument("--markdown", type=Path, help="write the table as a section of this file")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO / "src"))  # same_members reads with this checkout's readers

    genes = np.array([f"GENE{g:03d}" for g in range(args.genes)])
    steps = {
        "stack_training (values)": None,
        "stack_training (embeddings)": None,
        "mean": PREDICT,
        "retrieval_mean_comtip (k 50)": PREDICT,
        "retrieval_weighted_comtip (k 200)": PREDICT,
        "zeroshot: zero_shot_grid_and_prior": GRID_AND_PRIOR,
    }
    rows, floors = [], {}
    with tempfile.TemporaryDirectory() as tmp, checkouts(REPO, args.peer_ref, Path(tmp)) as found:
        root = Path(tmp)
        test = write_test(root, args.per_sample, genes)
        for label, checkout in found.items():
            floors[label] = measure(checkout, IMPORTS)
            print(f"imports only, {label}: {floors[label][0]:.1f} s, {floors[label][1]:.0f} MB", flush=True)
        files: list[tuple[Path, Path]] = []
        for n in sorted(args.spots):
            t0 = time.perf_counter()
            while len(files) * args.per_sample < n:
                files.append(write_sample(root, f"S{len(files):03d}", args.per_sample, genes, seed=len(files)))
            print(f"{len(files)} samples written in {time.perf_counter() - t0:.0f} s", flush=True)
            spots = len(files) * args.per_sample
            outputs: dict[str, dict[str, Path]] = {}
            for label, checkout in found.items():
                if label != "this checkout" and spots > args.peer_max:
                    continue
                tag = label.split()[0]
                values, ref = root / f"values_{n}_{tag}.npz", root / f"reference_{n}_{tag}.npz"
                outputs[label] = {"values": values, "reference": ref}
                for step, code in steps.items():
                    if code is None:
                        kind, out = ("VALUE_KEYS", values) if "values" in step else ("EMBEDDING_KEYS", ref)
                        inputs = [str(s if kind == "VALUE_KEYS" else e) for e, s in files]
                        seconds, rss = measure(checkout, STACK, str(out), kind, *inputs)
                    else:
                        method = step.split()[0].rstrip(":")
                        out = root / f"pred_{n}_{tag}_{method}.npy"
                        seconds, rss = measure(checkout, code, method, str(values), str(ref), str(test), str(out))
                    outputs[label][step] = out
                    rows.append([spots, len(files), label, step, seconds, rss, ""])
                    print(f"{spots} spots, {label}, {step}: {seconds:.1f} s, {rss:.0f} MB", flush=True)
            if len(outputs) == 2:
                mine, peer = outputs.values()
                for i, step in enumerate(steps):
                    if steps[step] is None:
                        agree = "identical members" if same_members(mine[step], peer[step]) else "DIFFERENT"
                    else:
                        a, b = np.load(mine[step]), np.load(peer[step])
                        agree = (
                            "identical"
                            if np.array_equal(a, b)
                            else f"max rel. diff {np.abs(a - b).max() / np.abs(b).max():.1e}"
                        )
                    rows[-len(steps) + i][6] = rows[-2 * len(steps) + i][6] = agree
                    print(f"  {step}: {agree}")
            for label, paths in outputs.items():  # keep only this checkout's stacks
                if label != "this checkout":
                    for path in paths.values():
                        path.unlink(missing_ok=True)

    commit = head_commit(REPO)
    command = " ".join(
        ["--spots", *map(str, args.spots)]
        + ([f"--peer-ref {args.peer_ref} --peer-max {args.peer_max}"] if args.peer_ref else [])
        + (["--markdown", str(args.markdown)] if args.markdown else [])
    )
    lines = [
        SECTION,
        "",
        f"The training reference of the comparison methods on N synthetic training spots in samples of "
        f"{args.per_sample:,} spots (N rounded up to whole samples): features 768-d, image and sentence embeddings "
        f"256-d, {args.genes} panel genes, float32; predictions for one test sample of {args.per_sample:,} spots "
        "(default k). For `zeroshot` only its training-side step is measured (`zero_shot_grid_and_prior`: the "
        "per-gene quantile grid and value prior over all N training values); the prompt scoring needs a pretrained "
        "checkpoint and does not depend on N. Fresh process per step (wall time includes Python's start and "
        "imports), peak RSS (`ru_maxrss`) of that process. Commit "
        f"{commit}, {platform.node()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}. Command:",
        "",
        f"    .venv/bin/python benchmarks/bench_reference.py {command}",
        "",
        "Imports alone: " + "; ".join(f"{label} {s:.1f} s, {rss:.0f} MB" for label, (s, rss) in floors.items()) + ".",
        "",
        "| training spots | samples | checkout | step | wall time (s) | peak RSS (MB) | output vs the other checkout |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r[0]:,} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.1f} | {r[5]:.0f} | {r[6] or '—'} |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        write_section(args.markdown, SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

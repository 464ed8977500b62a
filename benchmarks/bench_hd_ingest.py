"""Benchmark ingest of a full Visium HD capture at 8 µm (rule ``ingest``): peak RSS and wall time.

A simulated ``binned_outputs/square_008um/`` as Space Ranger writes it (the demo's 10x HDF5
writer, a typed ``tissue_positions.parquet``, HD scale factors): a square grid of ``--side``²
bins (880² = 774,400; ~718,000 in tissue inside a rounded square), ``--genes`` genes, each
in-tissue bin with a log-normal number of UMIs (median ``--umis``) drawn over a Zipf-like gene
popularity, so ~90 % of non-zeros are 1 as in real 8 µm bins. The slide is a plain PNG at
2 µm/px (8 µm bins = 4 px; Pillow loads it whole: ~40 MB). ``comtip.data.ingest.ingest_sample``
runs in a fresh process, once with the bins as units and once summed into 55 µm pseudo-spots;
peak RSS is that process's ``ru_maxrss``.

    .venv/bin/python benchmarks/bench_hd_ingest.py --markdown BENCHMARKS.md
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
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
from PIL import Image

from _markdown import head_commit, write_section  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from _peer import MEASURE  # noqa: E402
from comtip.demo.spaceranger import _write_10x_h5

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Visium HD ingest at full-capture scale"
MPP = 2.0
BIN_UM = 8
TARGET_MB = 8000


def simulate_capture(outs: Path, side: int, n_genes: int, median_umis: float, seed: int = 0) -> dict:
    """Write ``outs/binned_outputs/square_008um`` and return its sizes (see the module docstring)."""
    rng = np.random.default_rng(seed)
    folder = outs / "binned_outputs" / f"square_{BIN_UM:03d}um"
    (folder / "spatial").mkdir(parents=True)
    row, col = (a.ravel() for a in np.meshgrid(np.arange(side), np.arange(side), indexing="ij"))
    u, v = (col + 0.5) / side * 2 - 1, (row + 0.5) / side * 2 - 1
    in_tissue = u**4 + v**4 <= 0.9
    barcodes = np.array([f"s_008um_{r:05d}_{c:05d}-1" for r, c in zip(row, col)])
    margin_px = 20.0
    table = pa.table(
        {
            "barcode": pa.array(barcodes.tolist(), pa.string()),
            "in_tissue": pa.array(in_tissue.astype(np.int32)),
            "array_row": pa.array(row.astype(np.int32)),
            "array_col": pa.array(col.astype(np.int32)),
            "pxl_row_in_fullres": pa.array(margin_px + (row + 0.5) * BIN_UM / MPP),
            "pxl_col_in_fullres": pa.array(margin_px + (col + 0.5) * BIN_UM / MPP),
        }
    )
    pq.write_table(table, folder / "spatial" / "tissue_positions.parquet")
    factors = {
        "spot_diameter_fullres": BIN_UM / MPP,
        "bin_size_um": BIN_UM,
        "microns_per_pixel": MPP,
        "tissue_hires_scalef": 0.5,
        "tissue_lowres_scalef": 0.1,
        "fiducial_diameter_fullres": 44.5,
        "regist_target_img_scalef": 0.5,
    }
    (folder / "spatial" / "scalefactors_json.json").write_text(json.dumps(factors))

    n_bins = int(in_tissue.sum())
    popularity = 1.0 / np.arange(1, n_genes + 1) ** 1.1
    cdf = np.cumsum(rng.permutation(popularity / popularity.sum()))
    umis = np.maximum(1, rng.lognormal(np.log(median_umis), 0.5, n_bins)).astype(np.int64)
    blocks = []
    chunk = 50_000
    for start in range(0, n_bins, chunk):
        stop = min(n_bins, start + chunk)
        rows = np.repeat(np.arange(stop - start), umis[start:stop])
        genes = np.minimum(np.searchsorted(cdf, rng.random(len(rows))), n_genes - 1)
        block = sp.csr_matrix((np.ones(len(rows), np.int32), (rows, genes)), shape=(stop - start, n_genes))
        block.sum_duplicates()
        blocks.append(block)
    counts = sp.vstack(blocks, format="csr")
    programs = SimpleNamespace(
        ids=[f"ENSG{j:011d}" for j in range(n_genes)], symbols=[f"GENE{j}" for j in range(n_genes)]
    )
    _write_10x_h5(folder / "filtered_feature_bc_matrix.h5", counts, barcodes[in_tissue], programs, "bench")
    size = int(2 * margin_px + side * BIN_UM / MPP)
    return {"n_bins": len(barcodes), "n_in_tissue": n_bins, "nnz": counts.nnz, "umis": int(counts.sum()), "px": size}


def run_ingest(outs: Path, slide: Path, out: Path, pseudospot_um: float | None) -> tuple[float, float, int]:
    """(seconds, peak RSS in MB, units written) of ``ingest_sample`` in a fresh process."""
    call = (
        "import sys, anndata; from comtip.data.ingest import ingest_sample; "
        f"a = ingest_sample({str(outs)!r}, {str(slide)!r}, {str(out)!r}, sample='bench', bin_size_um={BIN_UM}, "
        f"hd_pseudospot_um={pseudospot_um!r}); print(a.n_obs)"
    )
    cmd = [sys.executable, "-c", MEASURE, sys.executable, "-c", call]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    seconds, rss_kb, rc = result.stdout.split()
    if int(rc) != 0:
        raise RuntimeError(f"ingest failed:\n{result.stderr}")
    return float(seconds), int(rss_kb) / 1024, int(result.stderr.split()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=880, help="bins per side of the capture")
    parser.add_argument("--genes", type=int, default=18000)
    parser.add_argument("--umis", type=float, default=150.0, help="median UMIs of an in-tissue bin")
    parser.add_argument("--markdown", type=Path, help="write the table as a section of this file")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        sizes = simulate_capture(root / "outs", args.side, args.genes, args.umis)
        print(f"simulated {sizes} in {time.perf_counter() - t:.0f} s", flush=True)
        slide = root / "slide.png"
        Image.new("RGB", (sizes["px"], sizes["px"]), (235, 200, 220)).save(slide)
        rows = []
        for pseudospot in (None, 55.0):
            seconds, rss, n = run_ingest(root / "outs", slide, root / f"spots_{pseudospot}.h5ad", pseudospot)
            label = "8 µm bins" if pseudospot is None else "55 µm pseudo-spots"
            rows.append((label, n, seconds, rss))
            print(f"{label}: {n} units, {seconds:.1f} s, {rss:.0f} MB", flush=True)

    command = " ".join(
        [f"--side {args.side} --genes {args.genes} --umis {args.umis:g}"]
        + (["--markdown", str(args.markdown)] if args.markdown else [])
    )
    lines = [
        SECTION,
        "",
        f"`ingest` of a simulated Visium HD `square_008um/` folder: {sizes['n_bins']:,} bins, "
        f"{sizes['n_in_tissue']:,} in tissue, {args.genes:,} genes, median {args.umis:g} UMIs per bin "
        f"({sizes['umis'] / sizes['n_in_tissue']:.0f} mean, {sizes['nnz'] / sizes['n_in_tissue']:.0f} "
        f"non-zeros per bin, {sizes['nnz']:,} in all); PNG slide {sizes['px']:,} px square at 2 µm/px. "
        f"Fresh process per run, peak RSS of that process; target ≤ {TARGET_MB / 1000:g} GB. "
        f"Commit {head_commit(REPO)}, {platform.node()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}. "
        "Command:",
        "",
        f"    .venv/bin/python benchmarks/bench_hd_ingest.py {command}",
        "",
        "| units | written | wall time (s) | peak RSS (MB) | within target |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r[0]} | {r[1]:,} | {r[2]:.1f} | {r[3]:.0f} | {'yes' if r[3] <= TARGET_MB else 'no'} |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        write_section(args.markdown, SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

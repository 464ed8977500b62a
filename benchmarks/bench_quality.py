"""Quality benchmark: every method's summary row on real data (her2st) or the synthetic demo.

Runs the whole workflow in a fresh run folder with a fixed split and prints the summary table
as markdown, with the command, seed and run time. her2st: patient C, sections C2 + C3 train,
C4 validation (early stopping), C5 test; legacy ST (100 µm spots), JPEG slides.

    python benchmarks/bench_quality.py her2st --out /tmp/bench_her2st
    python benchmarks/bench_quality.py demo --out /tmp/bench_demo
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
HER2ST = REPO.parent / "shared" / "data" / "her2st"
HEADER = "sample\tspaceranger_dir\tslide\tsplit\tmpp\tspot_diameter_um\tbatch\tpatient\n"


def her2st_rows() -> list[str]:
    split = {"C2": "train", "C3": "train", "C4": "val", "C5": "test"}
    rows = []
    for section, role in split.items():
        outs = HER2ST / section / "outs"
        slide = next((outs / "image").glob("*.jpg"))
        rows.append(f"{section}\t{outs}\t{slide}\t{role}\t\t100\t\tC")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cohort", choices=["her2st", "demo"])
    parser.add_argument("--out", type=Path, required=True, help="run folder (created)")
    parser.add_argument("--cores", type=int, default=2)
    args = parser.parse_args()
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    (args.out / "config").mkdir(parents=True, exist_ok=True)
    config["samples"] = "config/samples.tsv"
    if args.cohort == "her2st":
        rows = her2st_rows()
    else:
        rows = (REPO / "config" / "samples.tsv").read_text().splitlines()[1:]
    (args.out / "config" / "samples.tsv").write_text(HEADER + "".join(r + "\n" for r in rows))
    (args.out / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    start = time.time()
    subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory",
                    str(args.out), "--cores", str(args.cores)], check=True)
    minutes = (time.time() - start) / 60
    summary = pd.read_csv(args.out / "results" / "evaluation" / "summary.tsv", sep="\t")
    table = summary.pivot(index="method", columns="gene_set", values="pearson_mean").round(3)
    mse = summary[summary["gene_set"] == "all"].set_index("method")["mse_mean"].round(3).rename("MSE (all)")
    print(f"cohort {args.cohort}, seed {config['seed']}, {minutes:.1f} min on {args.cores} cores")
    print(pd.concat([table, mse], axis=1).to_markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

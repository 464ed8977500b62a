"""Sample sheet, wildcard constraints and input functions shared by the rules."""

import os
import re
import zlib

from comtip.config import load_sample_sheet
from comtip.ingest import spaceranger_files


SAMPLES = load_sample_sheet(
    config["samples"],
    Path(workflow.basedir) / "workflow" / "schemas" / "samples.schema.yaml",
    run_dir=os.getcwd(),
    generated_under=config["demo"]["dir"],
)
ST_SAMPLES = [s for s in SAMPLES.index if isinstance(SAMPLES.loc[s].get("spaceranger_dir"), str)]
DEMO_DIR = config["demo"]["dir"].rstrip("/")


wildcard_constraints:
    sample="|".join(re.escape(s) for s in SAMPLES.index),


def all_outputs(wildcards):
    """Per-sample outputs of every stage implemented so far."""
    files = ["results/genes/gene_panel.tsv"]
    for sample in ST_SAMPLES:
        files += [
            f"results/{sample}/spots.h5ad",
            f"results/{sample}/tissue_mask.png",
            f"results/{sample}/tiles.parquet",
            f"results/{sample}/thumbnail.png",
            f"results/{sample}/spot_patches.npy",
            f"results/{sample}/spot_patches.parquet",
            f"results/{sample}/gene_sentences.npz",
        ]
    return files


def samples_with_split(split):
    return [s for s in ST_SAMPLES if SAMPLES.loc[s, "split"] == split]


def training_spots(wildcards):
    """spots.h5ad of the training samples only: what gene selection may see."""
    return [f"results/{s}/spots.h5ad" for s in samples_with_split("train")]


def _sheet_value(sample, column):
    value = SAMPLES.loc[sample].get(column)
    return None if value is None or (isinstance(value, float) and value != value) else value


def spaceranger_inputs(wildcards):
    """The outs/ files ingest reads (h5 or mtx matrix, v1 or v2 positions, scale factors)."""
    files = spaceranger_files(SAMPLES.loc[wildcards.sample, "spaceranger_dir"])
    return {role: str(path) for role, path in files.items()}


def spaceranger_dir(wildcards):
    return SAMPLES.loc[wildcards.sample, "spaceranger_dir"]


def slide_path(wildcards):
    return SAMPLES.loc[wildcards.sample, "slide"]


def sample_mpp(wildcards):
    """µm/px from the sample sheet, or None (then slide metadata or spot geometry decide)."""
    value = _sheet_value(wildcards.sample, "mpp")
    return None if value is None else float(value)


def sample_spot_diameter_um(wildcards):
    value = _sheet_value(wildcards.sample, "spot_diameter_um")
    return config["ingest"]["spot_diameter_um"] if value is None else float(value)


def demo_seed(wildcards):
    """A seed per demo sample, derived from the config seed and the sample's name."""
    return zlib.crc32(f"{config['seed']}:{wildcards.demo}".encode())


def demo_sample_dir(wildcards, output):
    """The folder simulate_demo_sample fills: the one holding the slide."""
    return str(Path(output.slide).parent)

"""Run folders for the Snakemake workflow, built from the checked-in test config .test/config/
(the tiny synthetic cohort), and Snakemake run on them (the e2e, rerun, profile and SLURM tests)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from _helpers import REPO

# The test config of the snakemake-workflows catalogue: config.yaml + samples.tsv of the tiny cohort.
TEST_CONFIG = REPO / ".test" / "config"
# The tiny cohort of .test/config/samples.tsv (tests/test_config.py checks the sheet holds these).
SAMPLES = {"tiny_a": "train", "tiny_v": "val", "tiny_b": "test"}
PREDICT_SAMPLE = "tiny_p"  # H&E only: no Space Ranger folder
# The rules that ask for a GPU (test_profiles checks the workflow declares exactly these).
GPU_RULES = {
    "pretrain",
    "train_bleep",
    "train_mclstexp",
    "finetune",
    "embed_spots",
    "embed_bleep",
    "embed_foundation",
    "embed_mclstexp",
    "predict_finetuned",
    "predict_slide",
}


def snakemake_command(workdir: Path, *args: str) -> list[str]:
    """``python -m snakemake`` on this checkout's Snakefile, run in ``workdir``, with ``args``."""
    return [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        *args,
    ]


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    # 30 min: the tiny run pretrains CoMTIP and the two ablations its config reads (on 2 shared
    # cores the three pretraining runs pushed it past the former 15 min)
    result = subprocess.run(
        snakemake_command(workdir, "--cores", "2", *args), capture_output=True, text=True, timeout=1800
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"snakemake failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
        )
    return result


def write_run_folder(root: Path, rows: list[str]) -> Path:
    """A run folder with the test config (.test/config/config.yaml) and a sample sheet of ``rows``
    (tab-separated, in the columns of .test/config/samples.tsv)."""
    (root / "config").mkdir(parents=True)
    shutil.copyfile(TEST_CONFIG / "config.yaml", root / "config" / "config.yaml")
    header = (TEST_CONFIG / "samples.tsv").read_text().splitlines(keepends=True)[0]
    (root / "config" / "samples.tsv").write_text(header + "".join(r + "\n" for r in rows))
    return root


def write_tiny_run_folder(root: Path) -> Path:
    """The tiny cohort's run folder: a copy of .test/config/ (config + sample sheet; the demo rule
    simulates the data)."""
    shutil.copytree(TEST_CONFIG, root / "config", copy_function=shutil.copyfile)
    return root

"""Slide formats through the workflow: a test sample whose slide is a JPEG-compressed pyramidal
OME-TIFF (what QuPath and bfconvert write) runs from its slide to its predictions like the zlib
TIFF it was made from.

The tiny run (conftest's session fixture) is copied, its test sample's slide is rewritten as a
JPEG OME-TIFF, and the sheet points at the new file: Snakemake reruns what depends on the slide
(tiling, patches, the test sample's embeddings and predictions), nothing is simulated again.
"""

from __future__ import annotations

import json
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import tifffile

from _helpers.slides import write_jpeg_ome_tiff
from _helpers.workflow import snakemake
from comtip.io.readers import open_slide

pytestmark = pytest.mark.e2e

SAMPLE = "tiny_b"  # the tiny cohort's test sample
TARGETS = (f"results/predictions/{SAMPLE}/ridge_comtip.h5ad", f"results/predictions/{SAMPLE}/finetune_linear.h5ad")


def _gene_pearson(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    t, p = truth - truth.mean(0), pred - pred.mean(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (t * p).sum(0) / np.sqrt((t * t).sum(0) * (p * p).sum(0))


def test_a_jpeg_ome_tiff_slide_runs_from_patches_to_predictions_like_its_source_tiff(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, symlinks=True)  # copy2: modification times kept, nothing reruns by itself
    source = run / "resources" / "demo" / SAMPLE / "slide.tif"
    with open_slide(source) as slide:
        mpp, dims = slide.metadata_mpp, slide.level_dimensions
    with tifffile.TiffFile(source) as tif:
        levels = [page.asarray() for page in tif.pages]  # the demo pyramid: one page per level
    (run / "slides").mkdir()
    ome = write_jpeg_ome_tiff(run / "slides" / f"{SAMPLE}.ome.tif", levels, mpp, tile=256)
    with open_slide(ome) as slide:  # the reader sees what a user's file gives: pyramid and µm/px
        assert slide.reader == "tifffile" and slide.level_dimensions == dims
        assert slide.metadata_mpp == pytest.approx(mpp)

    sheet = pd.read_csv(run / "config" / "samples.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert (sheet["sample"] == SAMPLE).sum() == 1
    sheet.loc[sheet["sample"] == SAMPLE, "slide"] = f"../slides/{SAMPLE}.ome.tif"
    sheet.to_csv(run / "config" / "samples_ome.tsv", sep="\t", index=False)
    zlib_patches = np.load(tiny_run / "results" / SAMPLE / "spot_patches.npy")
    zlib_index = pd.read_parquet(tiny_run / "results" / SAMPLE / "spot_patches.parquet")

    result = snakemake(run, *TARGETS, "--config", "samples=config/samples_ome.tsv")
    log = result.stdout + result.stderr
    for rule in ("extract_patches", "embed_spots", "predict_baseline", "predict_finetuned"):
        assert f"rule {rule}:" in log, f"{rule} did not rerun for the new slide:\n{log[-3000:]}"
    for rule in ("simulate_demo_sample", "pretrain", "select_genes", "finetune"):  # the slide of a test sample only
        assert f"rule {rule}:" not in log, f"{rule} reran:\n{log[-3000:]}"

    patch_log = (run / "logs" / "extract_patches" / f"{SAMPLE}.log").read_text()
    assert "tifffile reader" in patch_log, patch_log
    index_path = run / "results" / SAMPLE / "spot_patches.parquet"
    settings = json.loads(pq.read_schema(index_path).metadata[b"comtip"])
    assert settings["slide_reader"] == "tifffile" and settings["slide_path"].endswith(f"{SAMPLE}.ome.tif")
    # the same boxes: the OME µm/px and the spot geometry agree
    pd.testing.assert_frame_equal(pd.read_parquet(index_path), zlib_index)
    patches = np.load(run / "results" / SAMPLE / "spot_patches.npy")
    assert patches.shape == zlib_patches.shape
    difference = np.abs(patches.astype(np.int16) - zlib_patches).mean()
    assert 0 < difference < 4, difference  # JPEG (quality 90) is lossy, not displaced

    for target in TARGETS:
        new, old = ad.read_h5ad(run / target), ad.read_h5ad(tiny_run / target)
        assert list(new.obs_names) == list(old.obs_names) and list(new.var_names) == list(old.var_names)
        assert np.isfinite(new.X).all()
        # the predictions from the JPEG slide follow those from the zlib slide gene by gene
        r = _gene_pearson(np.asarray(old.X, np.float64), np.asarray(new.X, np.float64))
        assert np.nanmedian(r) > 0.9, (target, np.round(np.nanpercentile(r, [5, 50, 95]), 3))

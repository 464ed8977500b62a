"""Compare two runs' ``results/`` folders file by file, by content.

Used by the reproducibility tests (same config and seed → same outputs, whether run twice
locally, resumed after a kill, or run through SLURM). What may differ between identical runs is
excluded explicitly, nothing else: the per-run provenance records, the wall-clock columns of
training metrics (throughput, data-wait fraction) and of the training-cost table (wall time, CPU
time, peak memory of the jobs), and the run folder's own absolute path where a
checkpoint records where its inputs were.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
from PIL import Image

from comtip.evaluation.training_cost import JOB_COST_COLUMNS
from comtip.training.metrics import TIMING_COLUMNS

EXCLUDED_DIRS = ("provenance",)


def result_files(root: Path) -> list[str]:
    results = root / "results"
    return sorted(
        str(p.relative_to(results))
        for p in results.rglob("*")
        if p.is_file() and p.relative_to(results).parts[0] not in EXCLUDED_DIRS
    )


def assert_same_results(a: Path, b: Path, *, only_in_both: bool = False) -> None:
    """Every file under a/results equals its counterpart under b/results, and no file is extra
    — or, with ``only_in_both`` (b ran part of a's DAG), every file b has is in a and equal."""
    files_a, files_b = result_files(a), result_files(b)
    if only_in_both:
        assert set(files_b) <= set(files_a), f"only in {b}: {sorted(set(files_b) - set(files_a))}"
        files_a = files_b
    assert files_a == files_b, (
        f"different files: only in {a}: {sorted(set(files_a) - set(files_b))}; "
        f"only in {b}: {sorted(set(files_b) - set(files_a))}"
    )
    assert files_a, f"{a}/results holds no file"
    roots = (str(a.resolve()), str(b.resolve()))
    for rel in files_a:
        _assert_same_file(a / "results" / rel, b / "results" / rel, rel, roots)


def _assert_same_file(x: Path, y: Path, rel: str, roots: tuple[str, str]) -> None:
    suffix = x.suffix
    if suffix == ".h5ad":
        _assert_same_anndata(ad.read_h5ad(x), ad.read_h5ad(y), rel, roots)
    elif suffix == ".npz":
        with np.load(x, allow_pickle=False) as nx, np.load(y, allow_pickle=False) as ny:
            assert sorted(nx.files) == sorted(ny.files), rel
            for key in nx.files:
                np.testing.assert_array_equal(nx[key], ny[key], err_msg=f"{rel}[{key}]")
    elif suffix == ".npy":
        np.testing.assert_array_equal(np.load(x, mmap_mode="r"), np.load(y, mmap_mode="r"), err_msg=rel)
    elif suffix == ".pt":
        _assert_same_tree(
            torch.load(x, map_location="cpu", weights_only=False),
            torch.load(y, map_location="cpu", weights_only=False),
            rel,
            roots,
        )
    elif suffix == ".tsv":
        fx, fy = (
            pd.read_csv(p, sep="\t").drop(columns=[*TIMING_COLUMNS, *JOB_COST_COLUMNS], errors="ignore") for p in (x, y)
        )
        pd.testing.assert_frame_equal(fx, fy, check_exact=True, obj=rel)
    elif suffix == ".parquet":
        pd.testing.assert_frame_equal(pd.read_parquet(x), pd.read_parquet(y), check_exact=True, obj=rel)
    elif suffix == ".png":
        with Image.open(x) as ix, Image.open(y) as iy:
            np.testing.assert_array_equal(np.asarray(ix), np.asarray(iy), err_msg=rel)
    else:
        assert x.read_bytes() == y.read_bytes(), f"{rel} differs"


def _assert_same_anndata(x: ad.AnnData, y: ad.AnnData, rel: str, roots: tuple[str, str]) -> None:
    np.testing.assert_array_equal(_dense(x.X), _dense(y.X), err_msg=f"{rel}: X")
    pd.testing.assert_frame_equal(x.obs, y.obs, check_exact=True, obj=f"{rel}: obs")
    pd.testing.assert_frame_equal(x.var, y.var, check_exact=True, obj=f"{rel}: var")
    assert sorted(x.obsm) == sorted(y.obsm) and sorted(x.layers) == sorted(y.layers), rel
    for key in x.obsm:
        np.testing.assert_array_equal(np.asarray(x.obsm[key]), np.asarray(y.obsm[key]), err_msg=f"{rel}: obsm[{key}]")
    for key in x.layers:
        np.testing.assert_array_equal(_dense(x.layers[key]), _dense(y.layers[key]), err_msg=f"{rel}: layers[{key}]")
    _assert_same_tree(dict(x.uns), dict(y.uns), f"{rel}: uns", roots)


def _dense(m) -> np.ndarray:
    return m.toarray() if hasattr(m, "toarray") else np.asarray(m)


def _assert_same_tree(x, y, where: str, roots: tuple[str, str] = ("", "")) -> None:
    """Nested dicts/lists of tensors, arrays and plain values: equal, exactly (strings equal once
    each run's folder is replaced by a placeholder)."""
    if isinstance(x, dict):
        assert isinstance(y, dict) and sorted(map(str, x)) == sorted(map(str, y)), f"{where}: keys differ"
        for key in x:
            _assert_same_tree(x[key], y[key], f"{where}.{key}", roots)
    elif isinstance(x, list | tuple):
        assert isinstance(y, list | tuple) and len(x) == len(y), f"{where}: lengths differ"
        for i, (u, v) in enumerate(zip(x, y, strict=True)):
            _assert_same_tree(u, v, f"{where}[{i}]", roots)
    elif isinstance(x, torch.Tensor):
        assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape, where
        assert torch.equal(x, y), f"{where}: tensors differ"
    elif isinstance(x, np.ndarray | pd.DataFrame | pd.Series):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=where)
    elif isinstance(x, float) and isinstance(y, float) and np.isnan(x) and np.isnan(y):
        pass
    elif isinstance(x, str) and isinstance(y, str) and all(roots):
        assert x.replace(roots[0], "<run>") == y.replace(roots[1], "<run>"), f"{where}: {x!r} != {y!r}"
    else:
        assert x == y, f"{where}: {x!r} != {y!r}"

"""Benchmark helpers: BENCHMARKS.md sections (benchmarks/_markdown.py) and the her2st folds of
benchmarks/bench_quality.py."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from _markdown import write_section  # noqa: E402
from bench_quality import FIXED_SPLIT, HER2ST_SECTIONS, loso_markdown, loso_split  # noqa: E402

DOC = """# Benchmarks

## A

a text
```bash
# a comment, not a heading
```

## Quality

intro

### demo

demo table

### fixed

fixed table

## Z

z text
"""


def test_sections_and_subsections_are_replaced_in_place(tmp_path):
    path = tmp_path / "B.md"
    path.write_text(DOC)
    write_section(path, "### demo", "### demo\n\nnew demo\n")
    text = path.read_text()
    assert "new demo" in text and "demo table" not in text and "fixed table" in text and "z text" in text
    assert text.index("new demo") < text.index("### fixed")
    write_section(path, "## Quality", "## Quality\n\nall new")
    text = path.read_text()
    assert "### fixed" not in text and "intro" not in text and text.index("all new") < text.index("## Z")
    write_section(path, "## A", "## A\n\nnew a\n")
    text = path.read_text()
    assert "a comment" not in text and "new a" in text  # a '# ' line inside the section did not end it


def test_new_subsection_goes_at_the_end_of_its_parent(tmp_path):
    path = tmp_path / "B.md"
    path.write_text(DOC)
    write_section(path, "### loso", "### loso\n\nloso table\n", parent="## Quality")
    text = path.read_text()
    assert text.index("fixed table") < text.index("### loso") < text.index("## Z")
    assert "# a comment, not a heading" in text
    write_section(path, "### loso", "### loso\n\nloso v2\n", parent="## Quality")
    assert "loso table" not in path.read_text() and path.read_text().count("### loso") == 1
    write_section(path, "### other", "### other\n\nx\n", parent="## Missing")
    assert path.read_text().rstrip().endswith("## Missing\n\n### other\n\nx")
    with pytest.raises(ValueError, match="higher-level"):
        write_section(path, "## B", "## B\n", parent="### loso")


def test_leave_one_section_out_folds():
    folds = [loso_split(s) for s in HER2ST_SECTIONS]
    for section, split in zip(HER2ST_SECTIONS, folds):
        assert split[section] == "test" and list(split.values()).count("val") == 1
        assert list(split.values()).count("train") == len(HER2ST_SECTIONS) - 2
    # every section is tested once and validates once; the C5 fold is the fixed split
    assert sorted(s for f in folds for s, r in f.items() if r == "val") == sorted(HER2ST_SECTIONS)
    assert loso_split("C5") == FIXED_SPLIT


@pytest.mark.e2e
def test_retrieval_ceiling_reads_the_simulators_latent_values(tiny_run):
    """benchmarks/bench_retrieval.py's oracle on the tiny cohort: spots pair with their own
    expression far above chance (the simulator's latent values do drive expression), and
    shuffling the latent values across spots brings it back to chance."""
    from bench_retrieval import _samples, oracle
    from comtip.training import load_pretrained

    results = tiny_run / "results"
    train, evaluate = _samples(tiny_run)
    assert train and evaluate and not set(train) & set(evaluate)
    vocabulary = load_pretrained(results / "models" / "pretrain" / "comtip.pt")[1]["vocabulary"]
    ceiling = oracle(tiny_run, results, train, vocabulary)
    # measured: median rank 14 of 164 (chance 81.5), top-5 7.2x chance; shuffled 92, 0x
    assert ceiling["median_rank"] < 0.3 * ceiling["chance_median_rank"], ceiling
    assert ceiling["top5"] > 4 * ceiling["chance_top5"], ceiling
    shuffled = oracle(tiny_run, results, train, vocabulary, shuffle_seed=0)
    assert shuffled["median_rank"] > 0.8 * shuffled["chance_median_rank"], shuffled
    assert shuffled["top5"] < 2 * shuffled["chance_top5"], shuffled


def test_quality_benchmark_config_overrides():
    from bench_quality import apply_overrides

    config = {"seed": 0, "pretrain": {"epochs": 8, "lr": 0.001}}
    out = apply_overrides(config, ["pretrain.epochs=30", "model.paat=false", "seed=3"])
    assert out == {"seed": 3, "pretrain": {"epochs": 30, "lr": 0.001}, "model": {"paat": False}}
    assert config["pretrain"]["epochs"] == 8  # the input is not changed
    for bad in ("pretrain.epochs", "=3", "seed.x=1"):
        with pytest.raises(ValueError, match="--set"):
            apply_overrides(config, [bad])


def test_retrieval_variants_pass_any_pretrain_override():
    from bench_retrieval import VARIANTS, variant_configs

    cfg = {"model": {"image_size": 64}, "pretrain": {"epochs": 24, "lr": 0.001}}
    model, train = variant_configs(cfg, *VARIANTS["config, cut sentences from expressed genes"], seed=1)
    assert model == {"image_size": 64}
    assert train == {"epochs": 24, "lr": 0.001, "subsample_genes": "expressed", "seed": 1}
    model, train = variant_configs(cfg, {"mfm": False}, {"epochs_factor": 3, "lr": 0.01}, seed=0)
    assert model == {"image_size": 64, "mfm": False}
    assert train == {"epochs": 72, "lr": 0.01, "seed": 0}  # epochs_factor is not a pretrain key
    assert cfg["pretrain"] == {"epochs": 24, "lr": 0.001}  # the run's config is not modified


def _fold(test: str, git: str) -> dict:
    table = pd.DataFrame(
        {"all": [0.1, 0.2], "top50_heg": [0.1, 0.3], "MSE (all)": [1.0, 0.9]}, index=["ridge_random", "finetune_linear"]
    )
    return {
        "test": test,
        "val": "C5",
        "train": ["C3", "C4"],
        "minutes": 4.0,
        "cores": 2,
        "git": git,
        "command": "python benchmarks/bench_quality.py her2st --folds loso",
        "n_genes": 250,
        "n_heldout": 50,
        "config": {"seed": 0, "evaluate": {"bleep_k": 50}},
        "train_spots": 364,
        "test_spots": 187,
        "table": table,
    }


def test_loso_markdown_marks_a_dirty_checkout_only_when_a_fold_ran_on_one():
    clean = loso_markdown([_fold("C2", "abc1234"), _fold("C3", "abc1234")], ["C4", "C5"], "cmd")
    assert "Code: HEAD at each fold's start C2 abc1234, C3 abc1234. Wall time" in clean
    assert "+dirty" not in clean and "**not run: C4, C5**" in clean
    dirty = loso_markdown([_fold("C2", "abc1234"), _fold("C3", "abc1234+dirty")], [], "cmd")
    assert "C3 abc1234+dirty (+dirty: the checkout had uncommitted changes to tracked files). Wall time" in dirty


def test_cohort_benchmark_reads_snakemakes_benchmark_files_and_writes_its_table(tmp_path, monkeypatch):
    """bench_cohort's table from Snakemake's benchmark files (a long run must not die at its end)."""
    import argparse

    from bench_cohort import benchmark_table, check_disk, markdown, merge_rows

    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    for rule, name, s, rss, cpu in [("ingest", "S000", 4.0, 500.0, 3.0), ("ingest", "S001", 6.0, 520.0, 3.5),
                                    ("select_genes", "select_genes", 80.0, 560.0, 40.0)]:  # fmt: skip
        path = tmp_path / "logs" / "benchmark" / rule / f"{name}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(header + f"{s}\t0:00:0{int(s) % 10}\t{rss}\t1\t1\t1\t0\t0\t50\t{cpu}\n")
    jobs = benchmark_table(tmp_path)
    assert sorted(jobs["rule"]) == ["ingest", "ingest", "select_genes"]
    assert jobs.loc[jobs["rule"] == "ingest", "cpu_seconds"].max() == 3.5
    results = pd.DataFrame(
        [{"samples": 25, "rule": r, "jobs": len(t), "reused": 0, "peak_rss_mb": t["max_rss_mb"].max(),
          "max_seconds": t["seconds"].max(), "max_cpu_seconds": t["cpu_seconds"].max(),
          "total_seconds": t["seconds"].sum()}
         for r, t in jobs.groupby("rule")]
    )  # fmt: skip
    args = argparse.Namespace(
        samples=[25], base=4, tissue_mm=6.5, genes=18000, mean_counts=5000, mpp=2.0, test=4, val=2, cores=2
    )
    # an earlier invocation measured 25 and 50 samples; this one re-measures 25: its rows replace
    # the old 25 rows, the 50 rows stay
    tsv = tmp_path / "cohort_scale.tsv"
    old = results.assign(peak_rss_mb=9999.0)
    merge_rows(tsv, pd.concat([old, old.assign(samples=50, peak_rss_mb=5000.0)]))
    every = merge_rows(tsv, results)
    assert sorted(every["samples"]) == [25, 25, 50, 50]
    assert every.loc[every["samples"] == 25, "peak_rss_mb"].max() == 560.0
    runs = pd.DataFrame(
        [{"samples": 25, "commit": "abc1234", "machine": "vm, 2 cores", "date": "2026-12-04", "wall_min": 10.0,
          "disk_gb": 3.0, "note": ""},
         {"samples": 50, "commit": "abc1234", "machine": "vm, 2 cores", "date": "2026-12-03", "wall_min": 20.0,
          "disk_gb": 6.0, "note": "resumed"}]
    )  # fmt: skip
    text = markdown(every, runs, args)
    assert "| 25 | ingest | 2 | 520 | 6.0 | 3.5 | 10 |" in text
    assert "--samples 25 50 --dir" in text
    assert "25 samples (commit abc1234, vm, 2 cores, 2026-12-04): whole run 10.0 min; results/ 3.0 GB" in text
    assert "whole run 20.0 min (resumed); results/ 6.0 GB on disk; rules above 4 GB: ingest, select_genes." in text

    import shutil as _shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(_shutil, "disk_usage", lambda path: usage(0, 0, 10 * 2**30))
    check_disk(tmp_path / "run", 8)  # 8 samples x 1 GB (nothing run yet) x 1.2 fits in 10 GB
    with pytest.raises(SystemExit, match="25 samples need ~30 GB more"):
        check_disk(tmp_path / "run", 25)


def test_loso_markdown_with_seeds_means_each_folds_seeds_and_pools_the_paired_table():
    rng = np.random.default_rng(0)
    genes = [f"g{i}" for i in range(60)]
    runs = []
    for test in ("C2", "C3"):
        for seed in (0, 1):
            fold = _fold(test, "abc1234")
            shift = 0.01 * seed
            fold["table"] = fold["table"] + shift
            fold["seed"], fold["config"] = seed, {**fold["config"], "seed": seed}
            r_random = pd.Series(rng.uniform(0.0, 0.2, 60), index=genes)
            fold["pearson"] = {"finetune_linear": r_random + 0.1, "ridge_random": r_random}
            fold["gene_sets"] = {"all": genes, "top50_heg": genes[:50]}
            runs.append(fold)
    text = loso_markdown(runs, ["C4", "C5"], "cmd", n_boot=200)
    assert "Folds run (test section): C2, C3; seeds 0, 1 (4 runs)" in text
    assert "| C2 (187) | 1 | C5 | C3+C4 (364) | finetune_linear | 0.210 |" in text
    assert "Mean over the 2 folds run (each fold the mean of its 2 seeds)" in text
    assert "| finetune_linear | 0.205 ± 0.000 |" in text  # (0.2 + 0.21) / 2 in both folds
    assert "Seed spread" in text and "`finetune_linear` 0.005" in text
    # the reference (the first CoMTIP method: finetune_linear here) is 0.1 above ridge_random on
    # every gene of every run
    assert "| ridge_random | all |" in text and "+0.100 [+0.100, +0.100] | 0.000 | 2/2 |" in text


def test_loso_fold_records_round_trip_and_are_reused_only_with_the_same_settings(tmp_path):
    """A fold written as a record and read back gives the same tables; ``--reuse`` takes it when
    its run folder is gone, and refuses it when the command asks for other methods or settings."""
    import json

    from bench_quality import fold_from_record, fold_record, record_name, run_fold

    genes = [f"g{i}" for i in range(60)]
    rng = np.random.default_rng(1)
    runs = []
    for test in ("C2", "C3"):
        fold = _fold(test, "abc1234")
        fold["seed"] = 0
        fold["config"] = {"seed": 0, "evaluate": {"bleep_k": 50, "methods": ["ridge_random", "finetune_linear"]}}
        fold["methods"] = ["ridge_random", "finetune_linear"]
        r = pd.Series(rng.uniform(0.0, 0.2, 60), index=genes)
        r.iloc[3] = np.nan  # a constant gene has no Pearson
        fold["pearson"] = {"finetune_linear": r + 0.05, "ridge_random": r}
        fold["gene_sets"] = {"all": genes, "top50_heg": genes[:50]}
        fold["training_cost"] = [
            {
                "model": "comtip",
                "steps": 120,
                "epochs": 24.0,
                "batch_size": 64,
                "image_size": 64,
                "parameters": 3_000_000,
                "wall_s": 90.0,
                "cpu_s": 170.0,
                "max_rss_mb": 900.0,
                "same_budget_as_comtip": "yes",
            },
        ]
        runs.append(fold)
    records = tmp_path / "records"
    records.mkdir()
    for fold in runs:
        (records / record_name(fold["test"], 0)).write_text(json.dumps(fold_record(fold)))
    back = [fold_from_record(json.loads((records / record_name(t, 0)).read_text())) for t in ("C2", "C3")]
    assert loso_markdown(back, ["C4", "C5"], "cmd", n_boot=100) == loso_markdown(runs, ["C4", "C5"], "cmd", n_boot=100)
    text = loso_markdown(back, ["C4", "C5"], "cmd", n_boot=100)
    assert "| comtip | 2 | 120 | 24.0 | 64 | 64 | 3,000,000 | 90 | 170 | 900 | yes |" in text
    assert "+0.050 [+0.050, +0.050]" in text  # the paired table survives the round trip (NaN gene included)

    config = {"seed": 0, "evaluate": {"bleep_k": 50, "methods": ["ridge_random", "finetune_linear"]}}
    fold = run_fold(tmp_path / "out", "C2", config, 2, True, "cmd", seed=0, records=records)
    assert fold["table"].equals(runs[0]["table"]) and not (tmp_path / "out").exists()
    other = {"seed": 0, "evaluate": {"bleep_k": 50, "methods": ["ridge_random"]}}
    with pytest.raises(SystemExit, match="seed_0_test_C2.json ran with other settings"):
        run_fold(tmp_path / "out", "C2", other, 2, True, "cmd", seed=0, records=records)
    other_k = {"seed": 0, "evaluate": {"bleep_k": 10, "methods": ["ridge_random", "finetune_linear"]}}
    with pytest.raises(SystemExit, match="other settings"):
        run_fold(tmp_path / "out", "C2", other_k, 2, True, "cmd", seed=0, records=records)

"""Quality benchmark: every method's summary row on real data (her2st) or the synthetic demo.

Runs the whole workflow (shipped ``config/config.yaml``) in a fresh run folder and prints the
summary table as markdown, with the command, seed and run time.

her2st (patient C, legacy ST, 100 µm spots, JPEG slides, sections C2-C5 in ../shared/data):

* ``--folds fixed`` (default): C2 + C3 train, C4 validation (early stopping), C5 test.
* ``--folds loso``: leave one section out. Each section in turn is the test slide, the section
  before it (cyclically: C2's is C5) the validation slide, the other two train; one run folder per
  fold (``OUT/test_C2``...), so the gene panel, pretraining, fine-tuning and every baseline see
  only that fold's training (and validation) slides. ``--test-sections`` runs a subset of the folds;
  ``--reuse`` takes a fold whose run folder already holds its summary and recorded wall time
  instead of running it again. Besides the pipeline's methods, each fold also scores
  ``retrieval_weighted_comtip`` (called ``mclstexp_comtip`` before) with
  ``evaluate.retrieval_weighted_smooth_query`` on, computed here from the fold's
  embeddings by the same package function the rule calls. ``--seeds 0 1 2`` runs every fold with
  each seed (``OUT/seed_0/test_C2``...): the tables then show every run, each fold's mean over its
  seeds, the seed spread, and the paired differences CoMTIP − X pooled over folds and seeds
  (:func:`comtip.evaluation.paired.fold_paired_differences`: folds resampled, and genes within each
  run). ``--markdown FILE`` writes the tables as the "### her2st (real data),
  leave-one-section-out" part of "## Prediction quality". ``--records DIR`` also writes each fold's
  tables as one small JSON file (``DIR/seed_S_test_C.json``; the repository keeps them in
  ``benchmarks/results/her2st_loso``), so a run of many folds and seeds that does not fit one
  session is committed fold by fold and resumed elsewhere: with ``--reuse`` a fold whose run folder
  is gone is taken from its record, and a record made with other methods or settings is refused.
  The section then also has a table of each model's training cost (``training_cost.tsv``).

    python benchmarks/bench_quality.py her2st --out /tmp/bench_her2st
    python benchmarks/bench_quality.py her2st --folds loso --out /tmp/bench_loso --markdown BENCHMARKS.md
    python benchmarks/bench_quality.py her2st --folds loso --seeds 0 1 2 --out /tmp/bench_loso_seeds \
        --set 'evaluate.methods=[mean, ridge_comtip, ridge_random, zeroshot, finetune_linear, bleep, mclstexp]' \
        --records benchmarks/results/her2st_loso --markdown BENCHMARKS.md
    python benchmarks/bench_quality.py demo --out /tmp/bench_demo
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from _markdown import head_commit, write_section  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from comtip.evaluation.metrics import gene_sets_from_panel
from comtip.evaluation.paired import fold_paired_differences, paired_reference

REPO = Path(__file__).resolve().parents[1]
HER2ST = REPO.parent / "shared" / "data" / "her2st"
HER2ST_SECTIONS = ("C2", "C3", "C4", "C5")
FIXED_SPLIT = {"C2": "train", "C3": "train", "C4": "val", "C5": "test"}
HEADER = "sample\tspaceranger_dir\tslide\tsplit\tmpp\tspot_diameter_um\tbatch\tpatient\tspot_pitch_um\n"
PARENT = "## Prediction quality"
SECTION = "### her2st (real data), leave-one-section-out"
GENE_SETS = ("all", "heldout", "top50_heg", "top50_hvg")
SMOOTH = "retrieval_weighted_comtip+smooth"  # the extra row computed here (not a pipeline method name)
NOT_COMTIP = ("mean", "ridge_random")  # methods that use nothing CoMTIP learned


def loso_split(test: str, sections: tuple[str, ...] = HER2ST_SECTIONS) -> dict[str, str]:
    """Fold with ``test`` as the test section: the section before it validates, the rest train."""
    i = sections.index(test)
    val = sections[(i - 1) % len(sections)]
    return {s: "test" if s == test else "val" if s == val else "train" for s in sections}


def her2st_rows(split: dict[str, str]) -> list[str]:
    rows = []
    for section, role in split.items():
        outs = HER2ST / section / "outs"
        slide = next((outs / "image").glob("*.jpg"))
        rows.append(f"{section}\t{outs}\t{slide}\t{role}\t\t100\t\tC\t200")
    return rows


def run_workflow(run_dir: Path, rows: list[str], config: dict, cores: int) -> float:
    """Write the run folder's config and sample sheet, run the whole workflow; minutes taken."""
    (run_dir / "config").mkdir(parents=True, exist_ok=True)
    (run_dir / "config" / "samples.tsv").write_text(HEADER + "".join(r + "\n" for r in rows))
    (run_dir / "config" / "config.yaml").write_text(yaml.safe_dump({**config, "samples": "config/samples.tsv"}))
    start = time.time()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "--snakefile",
            str(REPO / "Snakefile"),
            "--directory",
            str(run_dir),
            "--cores",
            str(cores),
            "--rerun-incomplete",  # a fold stopped midway resumes where it stopped
        ],
        check=True,
    )
    return (time.time() - start) / 60


def summary_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Method rows: mean Pearson per gene set, and mean MSE over all panel genes."""
    table = summary.pivot(index="method", columns="gene_set", values="pearson_mean")
    table = table[[g for g in GENE_SETS if g in table.columns]]
    mse = summary[summary["gene_set"] == "all"].set_index("method")["mse_mean"].rename("MSE (all)")
    return pd.concat([table, mse], axis=1)


def smoothed_mclstexp_summary(run_dir: Path, split: dict[str, str], config: dict) -> pd.DataFrame:
    """The fold's summary with one more row: retrieval_weighted_comtip with the spatially smoothed
    query, predicted from the fold's embeddings by ``predict_with_method`` (what the rule runs with
    ``evaluate.retrieval_weighted_smooth_query: true``) and scored with the rule's ``run_evaluation``."""
    from comtip.evaluation.run import run_evaluation
    from comtip.predict.methods import PredictionContext, predict_with_method

    res = run_dir / "results"
    test = next(s for s, role in split.items() if role == "test")
    train = [s for s, role in split.items() if role == "train"]
    extra = run_dir / "bench_extra"
    out = extra / f"{test}_{SMOOTH}.h5ad"
    context = PredictionContext(
        spots_h5ad=res / test / "spots.h5ad",
        test_sentences=res / test / "gene_sentences.npz",
        train_value_files=[res / s / "gene_sentences.npz" for s in train],
        train_embedding_files=[res / "embeddings" / "comtip" / f"{s}.npz" for s in train],
        test_embedding=res / "embeddings" / "comtip" / f"{test}.npz",
        settings={"retrieval_weighted_k": _weighted_k(config["evaluate"]), "retrieval_weighted_smooth_query": True},
    )
    predict_with_method("retrieval_weighted_comtip", context, out)
    methods = list(config["evaluate"]["methods"])
    predictions = {(test, m): res / "predictions" / test / f"{m}.h5ad" for m in methods}
    predictions[(test, SMOOTH)] = out
    return run_evaluation(
        {test: res / test / "gene_sentences.npz"},
        predictions,
        res / "genes" / "gene_panel.tsv",
        extra / "metrics.tsv",
        extra / "summary.tsv",
    )


def n_spots(run_dir: Path, samples: list[str]) -> int:
    return sum(len(np.load(run_dir / "results" / s / "gene_sentences.npz")["barcodes"]) for s in samples)


def run_fold(
    out: Path,
    test: str,
    config: dict,
    cores: int,
    reuse: bool,
    command: str,
    seed: int | None = None,
    records: Path | None = None,
) -> dict:
    """Run (or, with ``reuse``, take) one fold; its summary, the smoothed-query row and its record.

    With ``seed`` the fold runs with that seed in ``OUT/seed_{seed}/test_{test}``; without, with the
    config's seed in ``OUT/test_{test}``. With ``records`` every fold taken from a run folder is
    also written there as one small JSON file (:func:`fold_record`), and ``reuse`` takes a fold from
    that file when its run folder is gone (a long run resumed in another checkout)."""
    split = loso_split(test)
    run_dir = out / f"test_{test}" if seed is None else out / f"seed_{seed}" / f"test_{test}"
    if seed is not None:
        config = {**config, "seed": seed}
    record = run_dir / "bench_time.json"
    saved = None if records is None else records / record_name(test, seed)
    if reuse and record.exists() and (run_dir / "results" / "evaluation" / "summary.tsv").exists():
        info = json.loads(record.read_text())
        print(f"fold test={test}: reusing {run_dir} ({info['minutes']:.1f} min when run)", flush=True)
    elif reuse and saved is not None and saved.exists():
        fold = fold_from_record(json.loads(saved.read_text()))
        check_record_settings(fold, config, saved)
        print(f"fold test={test}: reusing the record {saved} ({fold['minutes']:.1f} min when run)", flush=True)
        return fold
    else:
        info = {
            "split": split,
            "cores": cores,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
            "git_at_start": head_commit(REPO, mark_dirty=True),
            "command": command,
        }
        info["minutes"] = run_workflow(run_dir, her2st_rows(split), config, cores)
        record.write_text(json.dumps(info, indent=1))
        print(f"fold test={test}: {info['minutes']:.1f} min", flush=True)
    fold_config = yaml.safe_load((run_dir / "config" / "config.yaml").read_text())
    if reuse:
        check_record_settings({"config": fold_config, "methods": fold_config["evaluate"]["methods"]}, config, run_dir)
    summary = smoothed_mclstexp_summary(run_dir, split, fold_config)
    train = [s for s, role in split.items() if role == "train"]
    val = next(s for s, role in split.items() if role == "val")
    panel = pd.read_csv(run_dir / "results" / "genes" / "gene_panel.tsv", sep="\t")
    metrics = pd.read_csv(run_dir / "bench_extra" / "metrics.tsv", sep="\t")
    metrics = metrics[metrics["sample"] == test]
    fold = {
        "test": test,
        "seed": fold_config["seed"],
        "pearson": {m: t.set_index("gene")["pearson"] for m, t in metrics.groupby("method")},
        "gene_sets": gene_sets_from_panel(panel),
        "val": val,
        "train": train,
        "minutes": info["minutes"],
        "cores": info["cores"],
        "git": info.get("git_at_start", "not recorded"),
        "command": info.get("command", "not recorded"),
        "config": fold_config,
        "n_genes": len(panel),
        "n_heldout": int(panel["heldout"].sum()) if "heldout" in panel else 0,
        "train_spots": n_spots(run_dir, train),
        "test_spots": n_spots(run_dir, [test]),
        "table": summary_table(summary),
        "methods": list(fold_config["evaluate"]["methods"]),
        "training_cost": training_cost_rows(run_dir),
    }
    if saved is not None:
        saved.parent.mkdir(parents=True, exist_ok=True)
        tmp = saved.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(fold_record(fold), indent=1))
        tmp.replace(saved)
    return fold


def record_name(test: str, seed: int | None) -> str:
    """The record file of a fold: ``seed_{seed}_test_{test}.json`` (``test_{test}.json`` without seeds)."""
    return f"test_{test}.json" if seed is None else f"seed_{seed}_test_{test}.json"


def training_cost_rows(run_dir: Path) -> list[dict]:
    """The fold's ``training_cost.tsv`` as rows (empty when the run has none)."""
    path = run_dir / "results" / "evaluation" / "training_cost.tsv"
    if not path.exists():
        return []
    return pd.read_csv(path, sep="\t").to_dict(orient="records")


def fold_record(fold: dict) -> dict:
    """A fold as JSON-able data: everything the tables need, nothing of its run folder."""
    return {
        **{k: v for k, v in fold.items() if k not in ("pearson", "table")},
        "pearson": {m: {str(g): float(r) for g, r in series.items()} for m, series in fold["pearson"].items()},
        "table": json.loads(fold["table"].to_json(orient="split")),
    }


def fold_from_record(record: dict) -> dict:
    """The inverse of :func:`fold_record`."""
    table = record["table"]
    return {
        **record,
        "pearson": {m: pd.Series(values, dtype=float) for m, values in record["pearson"].items()},
        "table": pd.DataFrame(table["data"], index=table["index"], columns=table["columns"], dtype=float),
    }


def check_record_settings(fold: dict, config: dict, where: Path) -> None:
    """Stop when a reused fold ran with other methods or other settings than asked for now."""
    asked_methods = list(config["evaluate"]["methods"])
    ran = fold.get("methods", fold["config"]["evaluate"]["methods"])
    asked = _config_line({**config, "seed": fold["config"]["seed"]})
    had = _config_line(fold["config"])
    if list(ran) != asked_methods or asked != had:
        raise SystemExit(
            f"--reuse: {where} ran with other settings than this command asks for "
            f"(methods {list(ran)} vs {asked_methods}; settings: {had} vs {asked}). "
            "Delete it to run the fold again, or give the same --set."
        )


def _config_line(config: dict) -> str:
    """The settings that decide the numbers, from a fold's copy of config/config.yaml."""
    model, pretrain, evaluate = config.get("model", {}), config.get("pretrain", {}), config["evaluate"]
    return (
        f"seed {config['seed']}; model (keys set; the others take the schema defaults) "
        f"{json.dumps(model, sort_keys=True)}; pretrain epochs "
        f"{pretrain.get('epochs')}, batch {pretrain.get('batch_size')}, lr {pretrain.get('lr')}"
        + (f", PAAT warm-up {pretrain['paat_warmup_steps']} steps" if "paat_warmup_steps" in pretrain else "")
        + f"; `bleep_k` {evaluate.get('bleep_k')}, `retrieval_mean_k` {evaluate.get('retrieval_mean_k', 50)}, "
        f"`retrieval_weighted_k` {_weighted_k(evaluate)}"
    )


def _weighted_k(evaluate: dict) -> int:
    """``evaluate.retrieval_weighted_k`` (``mclstexp_k`` in configs from before the rename)."""
    return evaluate.get("retrieval_weighted_k", evaluate.get("mclstexp_k", 200))


def _fmt(x: float) -> str:
    return "nan" if not np.isfinite(x) else f"{x:.3f}"


def loso_markdown(folds: list[dict], not_run: list[str], command: str, *, n_boot: int = 2000) -> str:
    """The section: one row block per run (a fold with one seed), the mean over folds (each fold
    the mean of its seeds), and the paired differences pooled over folds and seeds."""
    methods = list(folds[0]["table"].index)
    cols = list(folds[0]["table"].columns)
    total = sum(f["minutes"] for f in folds)
    tests = list(dict.fromkeys(f["test"] for f in folds))
    runs_of = {t: [f for f in folds if f["test"] == t] for t in tests}
    fold_tables = {
        t: pd.concat([f["table"] for f in runs]).groupby(level=0, sort=False).mean() for t, runs in runs_of.items()
    }
    seeds = sorted({f.get("seed", f["config"].get("seed")) for f in folds})
    configs = {
        _config_line({**f["config"], "seed": "per run"}) if len(seeds) > 1 else _config_line(f["config"]) for f in folds
    }
    config_text = (
        f"Every fold ran with the same settings: {configs.pop()}"
        if len(configs) == 1
        else "**The folds ran with different settings**: "
        + "; ".join(f"{f['test']}: {_config_line(f['config'])}" for f in folds)
    )
    commands = {}
    for f in folds:
        commands.setdefault(f["command"], []).append(f["test"])
    lines = [
        SECTION,
        "",
        "Patient C, legacy ST, 4 sections. Fold = one test section; the section before it "
        "(cyclically, C2's is C5) is the validation slide (early stopping of the fine-tune); the other "
        "two train. Each fold is a fresh run folder: gene panel "
        f"({folds[0]['n_genes']} genes, {folds[0]['n_heldout']} held out of pretraining), "
        "pretraining, fine-tuning and every baseline see only that fold's training slides (validation: "
        "early stopping only). The config is the checkout's `config/config.yaml` when the fold ran "
        f"(copied into the fold's run folder). {config_text}. `{SMOOTH}` = `retrieval_weighted_comtip` with "
        "`evaluate.retrieval_weighted_smooth_query: true` (query image embedding averaged with its spatial "
        "neighbours'), scored by this script from the fold's embeddings with the rule's own functions.",
        "",
        "Commands (`--reuse` takes a fold already in `--out` instead of running it again; to run every "
        "fold at once: `python benchmarks/bench_quality.py her2st --folds loso --out DIR --markdown "
        "BENCHMARKS.md`):",
        "",
        "```bash",
    ]
    for cmd, ran in commands.items():
        lines.append(f"{cmd}  # ran fold(s) {', '.join(ran)}")
    lines += [
        f"{command}  # assembled these tables",
        "```",
        "",
        f"Folds run (test section): {', '.join(tests)}; seeds {', '.join(map(str, seeds))} "
        f"({len(folds)} runs)"
        + (f"; **not run: {', '.join(not_run)}**" if not_run else " (all)")
        + ". Code: HEAD at each fold's start "
        + ", ".join(f"{_run_name(f, seeds)} {f['git']}" for f in folds)
        + (
            " (+dirty: the checkout had uncommitted changes to tracked files)"
            if any(f["git"].endswith("+dirty") for f in folds)
            else ""
        )
        + f". Wall time on {folds[0]['cores']} cores (other work may have run beside it): "
        + ", ".join(f"{_run_name(f, seeds)} {f['minutes']:.1f} min" for f in folds)
        + f" (total {total:.1f} min).",
        "",
        "Per fold: mean Pearson r per gene set (over the test slide's genes), MSE over all panel genes (log1p CP10k).",
        "",
        "| test | seed | val | train (spots) | method | " + " | ".join(cols) + " |",
        "|---|---|---|---|---|" + "---:|" * len(cols),
    ]
    for f in folds:
        for m in methods:
            row = f["table"].loc[m]
            lines.append(
                f"| {f['test']} ({f['test_spots']}) | {f.get('seed', f['config'].get('seed'))} | {f['val']} | "
                f"{'+'.join(f['train'])} ({f['train_spots']}) | {m} | " + " | ".join(_fmt(row[c]) for c in cols) + " |"
            )
    stack = pd.concat(fold_tables, names=["test", "method"])
    mean = stack.groupby(level="method", sort=False).mean()
    std = stack.groupby(level="method", sort=False).std(ddof=0)
    seed_text = f" (each fold the mean of its {len(seeds)} seeds)" if len(seeds) > 1 else ""
    lines += [
        "",
        f"Mean over the {len(tests)} folds run{seed_text} (± std over folds, ddof 0):",
        "",
        "| method | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for m in methods:
        lines.append(
            f"| {m} | "
            + " | ".join(
                f"{_fmt(mean.loc[m, c])} ± {_fmt(std.loc[m, c])}" if np.isfinite(mean.loc[m, c]) else "nan"
                for c in cols
            )
            + " |"
        )
    if len(seeds) > 1:
        spread = {
            m: np.mean([np.std([f["table"].loc[m, "all"] for f in runs]) for runs in runs_of.values()]) for m in methods
        }
        lines += [
            "",
            "Seed spread — the std over seeds of a fold's mean Pearson (`all`), averaged over folds: "
            + ", ".join(f"`{m}` {_fmt(v)}" for m, v in spread.items())
            + ".",
        ]
    lines += cost_lines(folds)
    lines += paired_lines(folds, methods, n_boot)
    lines += ["", "Computed from the tables above (not hand-picked; a fold's value is the mean of its seeds):", ""]
    folds = [{"test": t, "table": fold_tables[t]} for t in tests]
    for gene_set in ("all", "top50_heg"):
        best = [f"{f['test']}: {f['table'][gene_set].idxmax()} ({f['table'][gene_set].max():.3f})" for f in folds]
        lines.append(f"- Best method by mean Pearson on `{gene_set}`, per fold — " + "; ".join(best) + ".")
    for a, b, gene_set in (
        ("ridge_comtip", "ridge_random", "all"),
        ("finetune_linear", "ridge_random", "all"),
        ("retrieval_weighted_comtip", "retrieval_mean_comtip", "all"),
        ("bleep", "retrieval_mean_comtip", "all"),
        (SMOOTH, "retrieval_weighted_comtip", "all"),
    ):
        if a in methods and b in methods:
            diff = [f["table"].loc[a, gene_set] - f["table"].loc[b, gene_set] for f in folds]
            wins = sum(d > 0 for d in diff)
            lines.append(
                f"- `{a}` − `{b}` (Pearson, `{gene_set}`): "
                + ", ".join(f"{d:+.3f}" for d in diff)
                + f"; higher in {wins} of {len(folds)} folds."
            )
    if "mean" in methods:
        below = {
            m: sum(f["table"].loc[m, "MSE (all)"] < f["table"].loc["mean", "MSE (all)"] for f in folds)
            for m in methods
            if m != "mean"
        }
        lines.append(
            "- Folds in which a method's MSE is below the training mean's: "
            + ", ".join(f"`{m}` {n}/{len(folds)}" for m, n in below.items())
            + "."
        )
    comtip = [m for m in methods if m not in NOT_COMTIP]
    others = [m for m in NOT_COMTIP if m in methods]
    beaten = [f["test"] for f in folds if f["table"].loc[comtip, "all"].max() <= f["table"].loc[others, "all"].max()]
    lines.append(
        "- Folds in which no CoMTIP-based method beats the best non-CoMTIP baseline (`ridge_random`) "
        f"on `all`: {', '.join(beaten) if beaten else 'none'}."
    )
    return "\n".join(lines) + "\n"


def _run_name(fold: dict, seeds: list) -> str:
    return fold["test"] if len(seeds) < 2 else f"{fold['test']}/seed {fold.get('seed', fold['config'].get('seed'))}"


def cost_lines(runs: list[dict]) -> list[str]:
    """Training cost per model (each run's ``training_cost.tsv``), as the mean over the runs."""
    rows = [row for r in runs for row in r.get("training_cost", [])]
    if not rows:
        return []
    table = pd.DataFrame(rows)
    lines = [
        "",
        f"Training cost per model (`results/evaluation/training_cost.tsv` of each run; mean over the {len(runs)} "
        "runs; wall and CPU seconds of the training job on these 2 cores, with other work beside it):",
        "",
        "| model | runs | steps | epochs | batch | image px | parameters | wall (s) | CPU (s) | peak RSS (MB) "
        "| same budget as CoMTIP |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for model, group in table.groupby("model", sort=False):
        budget = "; ".join(sorted(set(group["same_budget_as_comtip"].astype(str))))
        lines.append(
            f"| {model} | {len(group)} | {group['steps'].mean():.0f} | {group['epochs'].mean():.1f} | "
            f"{group['batch_size'].mean():.0f} | {group['image_size'].mean():.0f} | "
            f"{group['parameters'].mean():,.0f} | {group['wall_s'].mean():.0f} | {group['cpu_s'].mean():.0f} | "
            f"{group['max_rss_mb'].mean():.0f} | {budget} |"
        )
    return lines


def paired_lines(runs: list[dict], methods: list[str], n_boot: int) -> list[str]:
    """The paired table CoMTIP − X over every run (``fold_paired_differences``), as markdown."""
    if not all("pearson" in r for r in runs):
        return []
    reference = paired_reference("auto", [m for m in methods if m != SMOOTH])
    if reference is None:
        return []
    table = fold_paired_differences(
        [(r["test"], r["pearson"], r["gene_sets"]) for r in runs], reference, n_boot=n_boot, seed=0
    )
    lines = [
        "",
        f"Paired differences `{reference}` − X (Pearson per gene on the fold's test slide; `evaluate.paired_reference` "
        f"auto), pooled over folds and seeds: a fold counts once (the mean of its seeds), the 95 % interval "
        f"resamples folds and, within each run, the set's genes ({n_boot} resamples); `p` = fraction of "
        "resamples with a difference ≤ 0; `folds` = folds whose own mean difference is > 0. One test slide per "
        "fold, so the per-slide and pooled-over-spots Pearson are the same number within a fold; across folds "
        "the panels and models differ, so nothing is pooled over spots of different folds.",
        "",
        f"| X | gene set | `{reference}` | X | difference [95 % CI] | p | folds |",
        "|---|---|---:|---:|---|---:|---:|",
    ]
    for row in table.itertuples():
        lines.append(
            f"| {row.method} | {row.gene_set} | {_fmt(row.reference_value)} | {_fmt(row.method_value)} | "
            f"{row.difference:+.3f} [{row.ci_low:+.3f}, {row.ci_high:+.3f}] | {row.p_not_better:.3f} | "
            f"{row.folds_better}/{row.n_folds} |"
        )
    return lines


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """``["pretrain.epochs=30", ...]`` applied to a copy of ``config`` (values parsed as YAML)."""
    config = yaml.safe_load(yaml.safe_dump(config))
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.split(".")
        if not sep or not all(parts):
            raise ValueError(f"--set {item!r}: expected SECTION.KEY=VALUE")
        node = config
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(value)
    return config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cohort", choices=["her2st", "demo"])
    parser.add_argument("--out", type=Path, required=True, help="run folder (created)")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--folds", choices=["fixed", "loso"], default="fixed", help="her2st only")
    parser.add_argument(
        "--test-sections",
        nargs="+",
        choices=HER2ST_SECTIONS,
        default=list(HER2ST_SECTIONS),
        help="loso: the folds to run, by test section (default: all)",
    )
    parser.add_argument("--reuse", action="store_true", help="loso: keep folds already run in --out")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help="loso: run every fold with each of these seeds (OUT/seed_S/test_C*); default: the config's seed, "
        "OUT/test_C*",
    )
    parser.add_argument("--markdown", type=Path, help="loso: write the tables into this file (BENCHMARKS.md)")
    parser.add_argument(
        "--records",
        type=Path,
        help="loso: write each fold's tables as a small JSON file into this folder (e.g. "
        "benchmarks/results/her2st_loso); with --reuse, a fold whose run folder is gone is taken from it",
    )
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="SECTION.KEY=VALUE",
        dest="overrides",
        help="override config/config.yaml, e.g. pretrain.epochs=30 (VALUE is read as YAML)",
    )
    args = parser.parse_args()
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    try:
        config = apply_overrides(config, args.overrides)
    except ValueError as err:
        parser.error(str(err))
    if args.folds == "loso":
        if args.cohort != "her2st":
            parser.error("--folds loso is for her2st")
        command = "python benchmarks/bench_quality.py " + shlex.join(sys.argv[1:])
        folds = [
            run_fold(args.out, t, config, args.cores, args.reuse, command, seed, args.records)
            for seed in (args.seeds or [None])
            for t in args.test_sections
        ]
        not_run = [s for s in HER2ST_SECTIONS if s not in args.test_sections]
        text = loso_markdown(folds, not_run, command)
        print(text)
        if args.markdown:
            write_section(args.markdown, SECTION, text, parent=PARENT)
        return 0
    if args.cohort == "her2st":
        rows = her2st_rows(FIXED_SPLIT)
    else:
        rows = (REPO / "config" / "samples.tsv").read_text().splitlines()[1:]
    minutes = run_workflow(args.out, rows, config, args.cores)
    summary = pd.read_csv(args.out / "results" / "evaluation" / "summary.tsv", sep="\t")
    print(f"cohort {args.cohort}, seed {config['seed']}, {minutes:.1f} min on {args.cores} cores")
    print(summary_table(summary).round(3).to_markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

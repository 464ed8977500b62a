"""What each trained model cost (rule ``training_cost``): optimiser steps, epochs, batch size,
training spots, parameters, and the wall time, CPU time and peak memory of its training job.

The question it answers is the one issue 13 asks of every comparison: did each method get the
same data and budget as CoMTIP? Steps, epochs, batch size, image size and training spots come
from the checkpoint (what the run really did, not what the config asked), time and memory from
the job's Snakemake ``benchmark:`` file (the last attempt of the job: a resumed run counts only
the attempt that finished), and ``same_budget_as_comtip`` compares each model with CoMTIP's own
checkpoint. Parameters are the floating-point tensors of the saved weights, BatchNorm running
statistics excluded; frozen parts that a checkpoint saves count (a fine-tuned ``linear`` head
saves the head only; its encoder is CoMTIP's, counted in CoMTIP's row).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from comtip._core.atomic import atomic_path
from comtip._core.errors import PipelineInputError

log = logging.getLogger(__name__)

COLUMNS = [
    "model",
    "rule",
    "methods",
    "training_samples",
    "training_spots",
    "image_size",
    "batch_size",
    "epochs",
    "steps",
    "parameters",
    "wall_s",
    "cpu_s",
    "max_rss_mb",
    "same_budget_as_comtip",
]
# Measured by the job's benchmark file: they differ between identical runs (the other columns do not).
JOB_COST_COLUMNS = ("wall_s", "cpu_s", "max_rss_mb")
# Buffers that a state dict holds beside the learned weights (torch.nn.BatchNorm*).
_NOT_PARAMETERS = ("running_mean", "running_var", "num_batches_tracked")
BUDGET_KEYS = ("training_samples", "training_spots", "image_size", "batch_size", "steps")


def count_parameters(state: Mapping[str, Any] | None) -> int:
    """Elements of the floating-point tensors of a state dict, BatchNorm statistics excluded."""
    if not state:
        return 0
    return sum(
        int(t.numel())
        for name, t in state.items()
        if t.is_floating_point() and name.rsplit(".", 1)[-1] not in _NOT_PARAMETERS
    )


def read_benchmark(path: str | Path) -> dict[str, float]:
    """Wall seconds, CPU seconds and peak RSS (MB) of a job from its Snakemake benchmark file."""
    path = Path(path)
    try:
        table = pd.read_csv(path, sep="\t")
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise PipelineInputError(f"cannot read the job's benchmark file: {err}", path=path) from err
    missing = {"s", "cpu_time", "max_rss"} - set(table.columns)
    if missing or table.empty:
        raise PipelineInputError(f"benchmark file lacks rows or columns {sorted(missing)}", path=path)
    last = table.iloc[-1]
    number = lambda v: float(pd.to_numeric(v, errors="coerce"))  # noqa: E731  ("-" where unmeasured)
    return {"wall_s": number(last["s"]), "cpu_s": number(last["cpu_time"]), "max_rss_mb": number(last["max_rss"])}


def describe_checkpoint(state: Mapping[str, Any], metrics: pd.DataFrame) -> dict[str, Any]:
    """Data and budget of one trained model from its checkpoint (pretrain, train_bleep,
    train_mclstexp or finetune) and its metrics table."""
    if "head_state" in state:  # a fine-tuned head (comtip.finetune.train)
        cfg = state["finetune_config"]
        return {
            "training_samples": len(state["train_samples"]),
            "training_spots": math.nan,  # not recorded by the head's checkpoint
            "image_size": int(state["model_config"]["image_size"]),
            "batch_size": int(cfg["batch_size"]),
            "epochs": float(state["epochs_run"]),
            "steps": math.nan,
            "parameters": count_parameters(state["head_state"]) + count_parameters(state.get("encoder_state")),
        }
    data, train = state["data"], state["train_config"]
    image_size = state.get("image_size", state.get("model_config", {}).get("image_size"))
    epochs = float(metrics["epoch"].iloc[-1]) if "epoch" in metrics and len(metrics) else math.nan
    return {
        "training_samples": len(data["samples"]),
        "training_spots": int(sum(data["spots"])),
        "image_size": int(image_size),
        "batch_size": int(train["batch_size"]),
        "epochs": epochs,
        "steps": int(state["step"]),
        "parameters": count_parameters(state["model_state"]),
    }


def _budget_note(row: Mapping[str, Any], comtip: Mapping[str, Any] | None) -> str:
    if comtip is None:
        return ""
    if row["rule"] == "finetune":
        return "head on CoMTIP (its own epochs and early stopping)"
    differs = [f"{k} {row[k]:g} vs {comtip[k]:g}" for k in BUDGET_KEYS if row[k] != comtip[k]]
    return "yes" if not differs else "no: " + "; ".join(differs)


def training_cost(models: Sequence[Mapping[str, Any]], out_tsv: str | Path) -> pd.DataFrame:
    """One row per trained model (``comtip.predict.registry.trained_models`` as dicts: name, rule,
    checkpoint, metrics, benchmark, methods), written to ``out_tsv``."""
    import torch

    rows = []
    for model in models:
        try:
            state = torch.load(model["checkpoint"], map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError) as err:
            raise PipelineInputError(f"cannot read checkpoint: {err}", path=model["checkpoint"]) from err
        metrics = pd.read_csv(model["metrics"], sep="\t")
        rows.append(
            {
                "model": model["name"],
                "rule": model["rule"],
                "methods": ",".join(model["methods"]),
                **describe_checkpoint(state, metrics),
                **read_benchmark(model["benchmark"]),
            }
        )
        del state
    table = pd.DataFrame(rows)
    comtip = next((r for r in rows if r["model"] == "comtip"), None)
    table["same_budget_as_comtip"] = [_budget_note(r, comtip) for r in rows]
    table = table[COLUMNS]
    for row in table.itertuples():
        log.info("%s: %s steps, %s parameters, %.0f s; same budget: %s", row.model, row.steps, row.parameters,
                 row.wall_s, row.same_budget_as_comtip)  # fmt: skip
    with atomic_path(out_tsv) as tmp:
        table.to_csv(tmp, sep="\t", index=False, float_format="%.6g", na_rep="NA")
    return table

"""Rule train_bleep: thin adapter around comtip.baselines.bleep_train.train_bleep (one process per GPU)."""

from comtip._core.runtime import rule_logging
from comtip.training.launch import run_processes

with rule_logging(snakemake.log[0]):
    run_processes(
        "comtip.baselines.bleep_train:train_bleep",
        {
            "samples": list(snakemake.params.samples),
            "patches": list(snakemake.input.patches),
            "indexes": list(snakemake.input.index),
            "sentences": list(snakemake.input.sentences),
            "out_checkpoint": snakemake.output.checkpoint,
            "out_metrics": snakemake.output.metrics,
            "bleep_config": snakemake.params.bleep,
            "model_config": snakemake.params.model,
            "train_config": snakemake.params.train,
            "threads": snakemake.threads,
        },
        processes=int(snakemake.resources.get("gpu", 1)),
        log_path=snakemake.log[0],
    )

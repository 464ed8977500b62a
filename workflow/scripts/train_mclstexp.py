"""Rule train_mclstexp: thin adapter around comtip.baselines.mclstexp_train.train_mclstexp (one process per GPU)."""

from comtip._core.runtime import rule_logging
from comtip.training.launch import run_processes

with rule_logging(snakemake.log[0]):
    run_processes(
        "comtip.baselines.mclstexp_train:train_mclstexp",
        {
            "samples": list(snakemake.params.samples),
            "patches": list(snakemake.input.patches),
            "indexes": list(snakemake.input.index),
            "sentences": list(snakemake.input.sentences),
            "spots": list(snakemake.input.spots),
            "out_checkpoint": snakemake.output.checkpoint,
            "out_metrics": snakemake.output.metrics,
            "mclstexp_config": snakemake.params.mclstexp,
            "model_config": snakemake.params.model,
            "train_config": snakemake.params.train,
            "threads": snakemake.threads,
        },
        processes=int(snakemake.resources.get("gpu", 1)),
        log_path=snakemake.log[0],
    )

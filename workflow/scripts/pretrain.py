"""Rule pretrain: thin adapter around comtip.training.launch.run_pretrain (one process per GPU)."""

from comtip._core.runtime import rule_logging
from comtip.training.launch import run_pretrain

with rule_logging(snakemake.log[0]):
    run_pretrain(
        {
            "samples": list(snakemake.params.samples),
            "patches": list(snakemake.input.patches),
            "indexes": list(snakemake.input.index),
            "sentences": list(snakemake.input.sentences),
            "val_samples": list(snakemake.params.val_samples),
            "val_patches": list(snakemake.input.val_patches),
            "val_indexes": list(snakemake.input.val_index),
            "val_sentences": list(snakemake.input.val_sentences),
            "bins_tsv": snakemake.input.bins,
            "out_checkpoint": snakemake.output.checkpoint,
            "out_metrics": snakemake.output.metrics,
            "out_retrieval": snakemake.output.retrieval,
            "model_config": snakemake.params.model,
            "train_config": {**snakemake.params.pretrain, "seed": snakemake.params.seed},
            "threads": snakemake.threads,
        },
        processes=int(snakemake.resources.get("gpu", 1)),
        log_path=snakemake.log[0],
    )

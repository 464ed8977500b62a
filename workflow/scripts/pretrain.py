"""Rule pretrain: thin adapter around comtip.training.pretrain."""

from comtip.runtime import rule_logging
from comtip.training import pretrain

with rule_logging(snakemake.log[0]):
    pretrain(
        snakemake.params.samples,
        snakemake.input.patches,
        snakemake.input.index,
        snakemake.input.sentences,
        snakemake.input.bins,
        snakemake.output.checkpoint,
        snakemake.output.metrics,
        snakemake.output.retrieval,
        model_config=snakemake.params.model,
        train_config={**snakemake.params.pretrain, "seed": snakemake.params.seed},
        threads=snakemake.threads,
    )

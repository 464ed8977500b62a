"""Rules training_values and training_embeddings: thin adapter around
comtip.predict.reference.stack_training."""

from comtip._core.runtime import rule_logging
from comtip.predict.reference import stack_training

with rule_logging(snakemake.log[0]):
    stack_training(
        list(snakemake.input.files), snakemake.params.samples, snakemake.params.arrays, snakemake.output.reference
    )

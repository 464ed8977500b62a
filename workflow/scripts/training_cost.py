"""Rule training_cost: thin adapter around comtip.evaluation.training_cost.training_cost."""

from comtip._core.runtime import rule_logging
from comtip.evaluation.training_cost import training_cost

with rule_logging(snakemake.log[0]):
    training_cost(snakemake.params.models, snakemake.output.table)

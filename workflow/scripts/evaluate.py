"""Rule evaluate: thin adapter around comtip.figures.run_evaluation."""

from comtip.figures import run_evaluation
from comtip.runtime import rule_logging

with rule_logging(snakemake.log[0]):
    run_evaluation(
        dict(zip(snakemake.params.test_samples, snakemake.input.truth, strict=True)),
        dict(zip(snakemake.params.prediction_keys, snakemake.input.predictions, strict=True)),
        snakemake.input.panel,
        snakemake.output.metrics,
        snakemake.output.summary,
    )

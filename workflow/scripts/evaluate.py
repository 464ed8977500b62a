"""Rule evaluate: thin adapter around comtip.evaluation.run.run_evaluation."""

from comtip._core.runtime import rule_logging
from comtip.evaluation.run import run_evaluation

with rule_logging(snakemake.log[0]):
    run_evaluation(
        dict(zip(snakemake.params.test_samples, snakemake.input.truth, strict=True)),
        dict(zip(snakemake.params.prediction_keys, snakemake.input.predictions, strict=True)),
        snakemake.input.panel,
        snakemake.output.metrics,
        snakemake.output.summary,
        snakemake.output.paired,
        reference=snakemake.params.paired_reference,
        n_boot=snakemake.params.bootstrap,
        seed=snakemake.params.seed,
        spots_h5ads=dict(zip(snakemake.params.test_samples, snakemake.input.spots, strict=True)),
    )

"""Rule batch_mixing: thin adapter around comtip.evaluation.batch_mixing_run.mixing_run."""

from comtip._core.runtime import rule_logging
from comtip.evaluation.batch_mixing_run import mixing_run

with rule_logging(snakemake.log[0]):
    samples, params = snakemake.params.samples, snakemake.params
    files = iter(snakemake.input.embeddings)
    mixing_run(
        dict(zip(samples, snakemake.input.sentences, strict=True)),
        {encoder: {s: next(files) for s in samples} for encoder in params.encoders},
        params.labels,
        snakemake.output.table,
        snakemake.output.figure,
        spots_per_slide=params.spots_per_slide,
        perplexity=params.perplexity,
        kernel=params.kernel,
        pca_dim=params.pca_dim,
        silhouette_spots=params.silhouette_spots,
        seed=params.seed,
    )

"""Rule fit_ridge: thin adapter around comtip.predict.ridge.fit_ridge_probe."""

from comtip._core.runtime import rule_logging
from comtip.predict.ridge import fit_ridge_probe

with rule_logging(snakemake.log[0]):
    fit_ridge_probe(
        snakemake.params.samples,
        list(snakemake.input.embeddings),
        list(snakemake.input.sentences),
        snakemake.output.probe,
        pca_dim=snakemake.params.pca_dim,
    )

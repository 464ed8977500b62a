"""Rule ingest: thin adapter around comtip.ingest.ingest_sample."""

from comtip.ingest import ingest_sample
from comtip.runtime import rule_logging

with rule_logging(snakemake.log[0]):
    ingest_sample(
        snakemake.params.outs,
        snakemake.input.slide,
        snakemake.output.spots,
        sample=snakemake.wildcards.sample,
        mpp=snakemake.params.mpp,
        spot_diameter_um=snakemake.params.spot_diameter_um,
        min_counts=snakemake.params.min_counts,
    )

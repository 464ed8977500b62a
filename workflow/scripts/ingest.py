"""Rule ingest: thin adapter around comtip.data.ingest.ingest_sample."""

from comtip._core.runtime import rule_logging
from comtip.data.ingest import ingest_sample

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

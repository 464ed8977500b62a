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
        spot_pitch_um=snakemake.params.spot_pitch_um,
        mpp_source=snakemake.params.mpp_source,
        mpp_tolerance=snakemake.params.mpp_tolerance,
        min_counts=snakemake.params.min_counts,
        bin_size_um=snakemake.params.bin_size_um,
        hd_pseudospot_um=snakemake.params.hd_pseudospot_um,
        hd_pseudospot_pitch_um=snakemake.params.hd_pseudospot_pitch_um,
    )

"""Rule extract_patches: thin adapter around comtip.patches.extract_patches."""

from comtip.patches import extract_patches
from comtip.runtime import rule_logging

with rule_logging(snakemake.log[0]):
    extract_patches(
        snakemake.input.spots,
        snakemake.input.slide,
        snakemake.output.patches,
        snakemake.output.index,
        size_px=snakemake.params.patch["size_px"],
        mpp=snakemake.params.patch["mpp"],
        chunk_size=snakemake.params.patch["chunk_size"],
        threads=snakemake.threads,
        sample=snakemake.wildcards.sample,
    )

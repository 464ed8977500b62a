"""Rule extract_patches: thin adapter around comtip.data.patches.extract_patches."""

from comtip._core.runtime import rule_logging
from comtip.data.patches import extract_patches

with rule_logging(snakemake.log[0]):
    extract_patches(
        snakemake.input.spots,
        snakemake.input.slide,
        snakemake.output.patches,
        snakemake.output.index,
        size_px=snakemake.params.patch["size_px"],
        mpp=snakemake.params.patch["mpp"],
        chunk_size=snakemake.params.patch["chunk_size"],
        max_upsample=snakemake.params.patch["max_upsample"],
        threads=snakemake.threads,
        sample=snakemake.wildcards.sample,
    )

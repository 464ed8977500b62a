"""Rule embed_foundation: thin adapter around comtip.predict.foundation.embed_foundation_sample."""

from comtip._core.devices import resolve_device
from comtip._core.runtime import rule_logging
from comtip.predict.foundation import embed_foundation_sample

with rule_logging(snakemake.log[0]):
    embed_foundation_sample(
        snakemake.wildcards.encoder,
        snakemake.input.weights,
        snakemake.input.patches,
        snakemake.input.sentences,
        snakemake.output.embeddings,
        device=str(resolve_device("auto")),
        sample=snakemake.wildcards.sample,
    )

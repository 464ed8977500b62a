"""Rule embed_mclstexp: thin adapter around comtip.baselines.mclstexp_embed.embed_mclstexp_sample."""

from comtip._core.devices import resolve_device
from comtip._core.runtime import rule_logging
from comtip.baselines.mclstexp_embed import embed_mclstexp_sample

with rule_logging(snakemake.log[0]):
    embed_mclstexp_sample(
        snakemake.input.checkpoint,
        snakemake.input.patches,
        snakemake.input.sentences,
        snakemake.input.spots,
        snakemake.output.embeddings,
        device=str(resolve_device("auto")),
        sample=snakemake.wildcards.sample,
    )

"""Rule embed_bleep: thin adapter around comtip.baselines.bleep_embed.embed_bleep_sample."""

from comtip._core.devices import resolve_device
from comtip._core.runtime import rule_logging
from comtip.baselines.bleep_embed import embed_bleep_sample

with rule_logging(snakemake.log[0]):
    embed_bleep_sample(
        snakemake.input.checkpoint,
        snakemake.input.patches,
        snakemake.input.sentences,
        snakemake.output.embeddings,
        device=str(resolve_device("auto")),
        sample=snakemake.wildcards.sample,
    )

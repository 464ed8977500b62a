"""Rule embed_spots: thin adapter around comtip.methods.embed_sample."""

from comtip.finetune import resolve_device
from comtip.methods import embed_sample
from comtip.runtime import rule_logging

with rule_logging(snakemake.log[0]):
    embed_sample(
        snakemake.input.checkpoint,
        snakemake.input.patches,
        snakemake.input.sentences,
        snakemake.output.embeddings,
        encoder=snakemake.wildcards.encoder,
        seed=snakemake.params.seed,
        device=str(resolve_device("auto")),
    )

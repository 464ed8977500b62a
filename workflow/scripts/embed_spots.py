"""Rule embed_spots: thin adapter around comtip.predict.embeddings.embed_sample."""

from comtip._core.devices import resolve_device
from comtip._core.runtime import rule_logging
from comtip.predict.embeddings import embed_sample

with rule_logging(snakemake.log[0]):
    embed_sample(
        snakemake.input.checkpoint,
        snakemake.input.patches,
        snakemake.input.sentences,
        snakemake.output.embeddings,
        encoder=snakemake.wildcards.encoder,
        seed=snakemake.params.seed,
        device=str(resolve_device("auto")),
        sample=snakemake.wildcards.sample,
    )

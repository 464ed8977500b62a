"""Rule build_gene_sentences: thin adapter around comtip.data.genes.build_gene_sentences."""

from comtip._core.runtime import rule_logging
from comtip.data.genes import build_gene_sentences

with rule_logging(snakemake.log[0]):
    build_gene_sentences(
        snakemake.input.spots,
        snakemake.input.panel,
        snakemake.input.bins,
        snakemake.output.sentences,
        max_len=snakemake.params.max_len,
        sample=snakemake.wildcards.sample,
    )

"""Rule build_gene_sentences: thin adapter around comtip.genes.build_gene_sentences."""

from comtip.genes import build_gene_sentences
from comtip.runtime import rule_logging

with rule_logging(snakemake.log[0]):
    build_gene_sentences(
        snakemake.input.spots,
        snakemake.input.panel,
        snakemake.input.bins,
        snakemake.output.sentences,
        max_len=snakemake.params.max_len,
        sample=snakemake.wildcards.sample,
    )

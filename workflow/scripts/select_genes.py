"""Rule select_genes: thin adapter around comtip.data.genes.select_genes."""

from comtip._core.runtime import rule_logging
from comtip.data.genes import select_genes

with rule_logging(snakemake.log[0]):
    genes = snakemake.params.genes
    select_genes(
        list(snakemake.input.spots),
        snakemake.output.panel,
        snakemake.output.bins,
        n_genes=genes["n_genes"],
        method=genes["method"],
        explicit=genes["explicit"],
        heldout_fraction=genes["heldout_fraction"],
        n_bins=genes["n_bins"],
        min_spots_fraction=genes["min_spots_fraction"],
        svg_neighbours=genes["svg_neighbours"],
        svg_combine=genes["svg_combine"],
        seed=snakemake.params.seed,
    )

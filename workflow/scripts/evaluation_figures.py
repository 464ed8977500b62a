"""Rule evaluation_figures: thin adapter around the plotting functions of comtip.evaluation.figures."""

from pathlib import Path

from comtip._core.runtime import rule_logging
from comtip.evaluation.figures import (
    genes_to_map,
    headline_table,
    landing_maps_html,
    spatial_maps,
    summary_bar_chart,
    training_curves,
)

with rule_logging(snakemake.log[0]):
    inp, params = snakemake.input, snakemake.params
    headline_table(inp.summary, snakemake.output.headline)
    summary_bar_chart(inp.summary, snakemake.output.bars, params.test_samples)
    training_curves(
        inp.pretrain_metrics,
        dict(zip(params.finetune_modes, inp.finetune_metrics, strict=True)),
        snakemake.output.curves,
    )
    genes = genes_to_map(inp.panel, params.n_map_genes)
    n_methods = len(params.methods)
    samples = zip(params.test_samples, inp.truth, inp.spots, inp.slides, strict=True)
    for i, (sample, truth, spots, slide) in enumerate(samples):
        predictions = dict(zip(params.methods, inp.predictions[i * n_methods : (i + 1) * n_methods], strict=True))
        spatial_maps(sample, truth, spots, predictions, genes, Path(snakemake.output.maps) / f"{sample}.png", slide)
    maps = [Path(snakemake.output.maps) / f"{sample}.png" for sample in params.test_samples]
    landing_maps_html(maps, snakemake.output.landing_maps)

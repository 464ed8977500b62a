"""Rule predict_slide: thin adapter around comtip.predict.slides.predict_slide."""

from comtip._core.runtime import rule_logging
from comtip.finetune import load_finetuned
from comtip.predict.slides import predict_slide

with rule_logging(snakemake.log[0]):
    inp = snakemake.input
    predictor = load_finetuned(inp.checkpoint, pretrained_ckpt=inp.pretrained)
    predict_slide(
        inp.slide,
        inp.tiles,
        snakemake.output.prediction,
        snakemake.output.map,
        sample=snakemake.wildcards.sample,
        predictor=predictor,
        genes=predictor.genes,
        mpp=snakemake.params.mpp,
        patch_size_px=snakemake.params.patch["size_px"],
        patch_mpp=snakemake.params.patch["mpp"],
        method=snakemake.params.method,
        map_genes=predictor.genes[: snakemake.params.map_genes],
    )

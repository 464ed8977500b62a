"""Rule predict_finetuned: thin adapter around comtip.finetune.predict_finetuned."""

import numpy as np

from comtip._core.runtime import rule_logging
from comtip.finetune import load_finetuned, predict_finetuned
from comtip.predict.writers import write_prediction_h5ad

with rule_logging(snakemake.log[0]):
    inp = snakemake.input
    pred = predict_finetuned(inp.checkpoint, inp.patches, pretrained_ckpt=inp.pretrained)
    genes = load_finetuned(inp.checkpoint, pretrained_ckpt=inp.pretrained).genes
    write_prediction_h5ad(
        snakemake.output.prediction,
        pred,
        genes,
        inp.spots,
        f"finetune_{snakemake.wildcards.mode}",
        barcodes=np.load(inp.sentences)["barcodes"],
    )

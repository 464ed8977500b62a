"""Rule finetune: thin adapter around comtip.finetune.finetune."""

from comtip._core.runtime import rule_logging
from comtip.finetune import FinetuneConfig, finetune

with rule_logging(snakemake.log[0]):
    inp = snakemake.input
    finetune(
        inp.pretrained,
        list(zip(inp.train_patches, inp.train_sentences, strict=True)),
        list(zip(inp.val_patches, inp.val_sentences, strict=True)),
        snakemake.output.checkpoint,
        snakemake.output.metrics,
        FinetuneConfig.from_dict(snakemake.params.finetune),
    )

rule finetune:
    """Expression head on the pretrained image encoder (linear probe or full fine-tune); early
    stopping on the validation slides."""
    input:
        unpack(finetune_inputs),
        pretrained=f"results/models/pretrain/{PRETRAIN_MODEL}.pt",
    output:
        checkpoint="results/models/finetune/{mode}.pt",
        metrics="results/models/finetune/{mode}.metrics.tsv",
    log:
        "logs/finetune/{mode}.log",
    benchmark:
        "logs/benchmark/finetune/{mode}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 4
    resources:
        mem_mb=16000,
        runtime=240,
        gpu=1,
    params:
        finetune=finetune_params,
    script:
        "../scripts/finetune.py"

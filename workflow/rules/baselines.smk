rule train_bleep:
    """BLEEP trained as itself (method bleep): its ResNet-50 image encoder and projection heads,
    its soft-target contrastive loss and optimiser, on the training samples' patches and panel
    expression, with pretraining's spots, image size, batch size and number of steps unless the
    config's bleep section overrides them (docs/evaluation.md, "BLEEP").

    Resumable as pretrain (results/models/bleep/bleep.resume/); resources gpu=N > 1 start N
    processes under torchrun, each with its own batch, as BLEEP's DDP runs.
    """
    input:
        unpack(training_inputs),
    output:
        checkpoint="results/models/bleep/bleep.pt",
        metrics="results/models/bleep/bleep.metrics.tsv",
    log:
        "logs/train_bleep/bleep.log",
    benchmark:
        "logs/benchmark/train_bleep/bleep.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 8
    resources:
        mem_mb=16000,
        runtime=720,
        gpu=1,
    params:
        samples=samples_with_split("train"),
        bleep=BLEEP_CONFIG,
        model=MODEL_CONFIG,
        train=BLEEP_TRAIN_CONFIG,
    script:
        "../scripts/train_bleep.py"


rule embed_bleep:
    """BLEEP's image embeddings (and pooled backbone features) of one sample's patches and its
    expression embeddings of the sample's panel values, in the keys the retrieval methods read."""
    input:
        checkpoint="results/models/bleep/bleep.pt",
        patches="results/{sample}/spot_patches.npy",
        sentences="results/{sample}/gene_sentences.npz",
    output:
        embeddings="results/embeddings/bleep/{sample}.npz",
    log:
        "logs/embed_bleep/{sample}.log",
    benchmark:
        "logs/benchmark/embed_bleep/{sample}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=1,
    script:
        "../scripts/embed_bleep.py"

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


rule train_mclstexp:
    """mclSTExp trained as itself (method mclstexp): BLEEP's ResNet-50 image side and loss, its
    spot-level Transformer over the spots of a batch (expression + array row/column embeddings),
    Adam lr 1e-4, colour jitter 0.5, on the training samples' patches, panel expression and array
    positions (spots.h5ad), with pretraining's spots, image size, batch size and number of steps
    unless the config's mclstexp section overrides them (docs/evaluation.md, "mclSTExp").

    Resumable and multi-GPU as train_bleep (results/models/mclstexp/mclstexp.resume/).
    """
    input:
        unpack(spot_training_inputs),
    output:
        checkpoint="results/models/mclstexp/mclstexp.pt",
        metrics="results/models/mclstexp/mclstexp.metrics.tsv",
    log:
        "logs/train_mclstexp/mclstexp.log",
    benchmark:
        "logs/benchmark/train_mclstexp/mclstexp.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 8
    resources:
        mem_mb=16000,
        runtime=720,
        gpu=1,
    params:
        samples=samples_with_split("train"),
        mclstexp=MCLSTEXP_CONFIG,
        model=MODEL_CONFIG,
        train=MCLSTEXP_TRAIN_CONFIG,
    script:
        "../scripts/train_mclstexp.py"


rule embed_mclstexp:
    """mclSTExp's image embeddings (and pooled features) of one sample's patches and its spot
    embeddings of the sample's panel values and array positions (consecutive batches of the
    training batch size as the spot Transformer's context), in the keys the retrieval methods read."""
    input:
        checkpoint="results/models/mclstexp/mclstexp.pt",
        patches="results/{sample}/spot_patches.npy",
        sentences="results/{sample}/gene_sentences.npz",
        spots="results/{sample}/spots.h5ad",
    output:
        embeddings="results/embeddings/mclstexp/{sample}.npz",
    log:
        "logs/embed_mclstexp/{sample}.log",
    benchmark:
        "logs/benchmark/embed_mclstexp/{sample}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=1,
    script:
        "../scripts/embed_mclstexp.py"

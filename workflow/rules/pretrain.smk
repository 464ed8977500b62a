rule pretrain:
    """CoMTIP pretraining on the training samples (model comtip, or one of its ablations,
    registry.ABLATIONS, with the same data, budget and seed): image and gene-sentence encoders aligned;
    the validation samples' alignment is measured every epoch (metrics.tsv), never trained on.

    Resumable: a killed run continues from results/models/pretrain/{model}.resume/ when rerun
    with the same configuration. One process per GPU: with resources gpu=N > 1 the script runs
    N processes under torchrun on the node (docs/pretraining.md).
    """
    input:
        unpack(training_inputs),
        unpack(validation_inputs),
        bins="results/genes/value_bins.tsv",
    output:
        checkpoint="results/models/pretrain/{model}.pt",
        metrics="results/models/pretrain/{model}.metrics.tsv",
        retrieval="results/models/pretrain/{model}.retrieval.tsv",
    log:
        "logs/pretrain/{model}.log",
    benchmark:
        "logs/benchmark/pretrain/{model}.tsv"
    wildcard_constraints:
        model="|".join(registry.PRETRAIN_MODELS),
    conda:
        "../../envs/torch.yaml"
    threads: 8
    resources:
        mem_mb=16000,
        runtime=720,
        gpu=1,
    params:
        samples=samples_with_split("train"),
        val_samples=samples_with_split("val"),
        model=pretrain_model_config,
        pretrain=config["pretrain"],
        seed=config["seed"],
    script:
        "../scripts/pretrain.py"

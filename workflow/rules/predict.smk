rule embed_spots:
    """Frozen image features, image and sentence embeddings of one sample, from the pretrained
    encoder (comtip, or an ablation from its own checkpoint) or a seeded random initialisation of
    CoMTIP's architecture (random)."""
    input:
        checkpoint=embedding_checkpoint,
        patches="results/{sample}/spot_patches.npy",
        sentences="results/{sample}/gene_sentences.npz",
    output:
        embeddings="results/embeddings/{encoder}/{sample}.npz",
    log:
        "logs/embed_spots/{encoder}/{sample}.log",
    benchmark:
        "logs/benchmark/embed_spots/{encoder}/{sample}.tsv"
    wildcard_constraints:
        encoder="|".join(registry.COMTIP_ENCODERS),
    conda:
        "../../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=1,
    params:
        seed=config["seed"],
    script:
        "../scripts/embed_spots.py"


rule training_values:
    """The training samples' panel values stacked in sheet order: what every comparison method
    reads about the training slides' expression, in one file."""
    input:
        unpack(training_value_inputs),
    output:
        reference=registry.TRAINING_VALUES,
    log:
        "logs/training_values/training_values.log",
    benchmark:
        "logs/benchmark/training_values/training_values.tsv"
    conda:
        "../../envs/imaging.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        samples=samples_with_split("train"),
        arrays=list(reference.VALUE_KEYS),
    script:
        "../scripts/stack_training.py"


rule training_embeddings:
    """The training samples' embeddings by one encoder (CoMTIP's or BLEEP's) stacked in sheet
    order: the reference side of the retrieval methods, in one file."""
    input:
        unpack(training_embedding_inputs),
    output:
        reference=registry.TRAINING_EMBEDDINGS,
    log:
        "logs/training_embeddings/{encoder}.log",
    benchmark:
        "logs/benchmark/training_embeddings/{encoder}.tsv"
    conda:
        "../../envs/imaging.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        samples=samples_with_split("train"),
        arrays=list(reference.EMBEDDING_KEYS),
    script:
        "../scripts/stack_training.py"


rule fit_ridge:
    """The HEST ridge probe of one encoder, fitted once on the training samples' features and
    panel values, streamed one sample at a time (memory O(features²)); every ridge_{encoder}
    prediction job reads it."""
    input:
        unpack(ridge_fit_inputs),
    output:
        probe=registry.RIDGE_PROBES,
    log:
        "logs/fit_ridge/{encoder}.log",
    benchmark:
        "logs/benchmark/fit_ridge/{encoder}.tsv"
    conda:
        "../../envs/imaging.yaml"
    threads: 2
    resources:
        mem_mb=2000,
        runtime=60,
    params:
        samples=samples_with_split("train"),
        pca_dim=config["evaluate"]["ridge_pca_dim"],
    script:
        "../scripts/fit_ridge.py"


rule predict_baseline:
    """Predicted panel expression of a test slide by one comparison method (mean, HEST ridge,
    retrieval on CoMTIP's embeddings, BLEEP, CoMTIP zero-shot); same split and genes for every
    method."""
    input:
        unpack(baseline_inputs),
        spots="results/{sample}/spots.h5ad",
        test_sentences="results/{sample}/gene_sentences.npz",
    output:
        prediction="results/predictions/{sample}/{method}.h5ad",
    log:
        "logs/predict_baseline/{sample}/{method}.log",
    benchmark:
        "logs/benchmark/predict_baseline/{sample}/{method}.tsv"
    wildcard_constraints:
        method="|".join(registry.BASELINE_METHODS),
    conda:
        "../../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        evaluation=config["evaluate"],
    script:
        "../scripts/predict_baseline.py"


rule predict_finetuned:
    """Predicted panel expression of a test slide by a fine-tuned model."""
    input:
        checkpoint="results/models/finetune/{mode}.pt",
        pretrained=f"results/models/pretrain/{PRETRAIN_MODEL}.pt",
        patches="results/{sample}/spot_patches.npy",
        spots="results/{sample}/spots.h5ad",
        sentences="results/{sample}/gene_sentences.npz",
    output:
        prediction="results/predictions/{sample}/finetune_{mode}.h5ad",
    log:
        "logs/predict_finetuned/{sample}/{mode}.log",
    benchmark:
        "logs/benchmark/predict_finetuned/{sample}/{mode}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=1,
    script:
        "../scripts/predict_finetuned.py"


rule predict_slide:
    """Virtual Visium for an H&E-only slide (split = predict): every tissue tile predicted by the
    fine-tuned model, written as an h5ad plus a spatial map."""
    input:
        slide=slide_path,
        tiles="results/{sample}/tiles.parquet",
        checkpoint=f"results/models/finetune/{config['evaluate']['slide_model']}.pt",
        pretrained=f"results/models/pretrain/{PRETRAIN_MODEL}.pt",
    output:
        prediction="results/predictions/{sample}/virtual_visium.h5ad",
        map=report(
            "results/predictions/{sample}/virtual_visium.png",
            caption="../report/virtual_visium.rst",
            category="Virtual Visium",
        ),
    log:
        "logs/predict_slide/{sample}.log",
    benchmark:
        "logs/benchmark/predict_slide/{sample}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 4
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=1,
    params:
        mpp=sample_mpp,
        patch=config["patches"],
        map_genes=config["evaluate"]["map_genes"],
        method=f"finetune_{config['evaluate']['slide_model']}",
    script:
        "../scripts/predict_slide.py"


rule embed_foundation:
    """Frozen features of one sample by a pathology foundation model (comtip.model.presets), from
    the local weights file that config key foundation_models.{encoder} names; the ridge_{encoder}
    method's probe is fitted on them."""
    input:
        weights=foundation_weights_file,
        patches="results/{sample}/spot_patches.npy",
        sentences="results/{sample}/gene_sentences.npz",
    output:
        embeddings="results/embeddings/{encoder}/{sample}.npz",
    log:
        "logs/embed_foundation/{encoder}/{sample}.log",
    benchmark:
        "logs/benchmark/embed_foundation/{encoder}/{sample}.tsv"
    wildcard_constraints:
        encoder="|".join(registry.FOUNDATION_ENCODERS),
    conda:
        "../../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=16000,
        runtime=120,
        gpu=1,
    script:
        "../scripts/embed_foundation.py"

rule evaluate:
    """Per test slide × gene × method: Pearson, Spearman, MSE, MAE; summary per method over all
    panel genes, top-50 HEG / HVG (training statistics) and the held-out zero-shot genes, with
    the Pearson per slide and over the pooled test spots; paired differences CoMTIP − each other
    method with bootstrap 95 % intervals (slides and genes resampled); Moran's I of each true and
    predicted map on the spots' 6-nearest-neighbour graph (squidpy)."""
    input:
        unpack(evaluation_inputs),
        panel="results/genes/gene_panel.tsv",
    output:
        metrics="results/evaluation/metrics.tsv",
        summary=report("results/evaluation/summary.tsv", caption="../report/summary.rst", category="Evaluation"),
        paired=report("results/evaluation/paired.tsv", caption="../report/paired.rst", category="Evaluation"),
    log:
        "logs/evaluate/evaluate.log",
    benchmark:
        "logs/benchmark/evaluate/evaluate.tsv"
    conda:
        "../../envs/imaging.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=30,
    params:
        test_samples=TEST_SAMPLES,
        prediction_keys=list(prediction_files()),
        paired_reference=PAIRED_REFERENCE,
        bootstrap=config["evaluate"]["bootstrap"],
        seed=config["seed"],
    script:
        "../scripts/evaluate.py"


rule evaluation_figures:
    """The landing page's headline table (mean Pearson per method and gene set), bar chart of the
    summary, spatial maps of truth vs methods over the H&E, training curves."""
    input:
        unpack(figure_inputs),
        summary="results/evaluation/summary.tsv",
        panel="results/genes/gene_panel.tsv",
        pretrain_metrics=f"results/models/pretrain/{PRETRAIN_MODEL}.metrics.tsv",
    output:
        headline=report("results/evaluation/headline.tsv", caption="../report/headline.rst", category="Evaluation"),
        landing_maps="results/evaluation/landing_maps.html",
        bars=report("results/evaluation/summary_pearson.png", caption="../report/bars.rst", category="Evaluation"),
        curves=report("results/evaluation/training_curves.png", caption="../report/curves.rst", category="Training"),
        maps=report(
            directory("results/evaluation/maps"),
            patterns=["{name}.png"],
            caption="../report/maps.rst",
            category="Spatial maps",
        ),
    log:
        "logs/evaluation_figures/evaluation_figures.log",
    benchmark:
        "logs/benchmark/evaluation_figures/evaluation_figures.tsv"
    conda:
        "../../envs/imaging.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=30,
    params:
        test_samples=TEST_SAMPLES,
        methods=METHODS,
        finetune_modes=FINETUNE_MODES,
        n_map_genes=config["evaluate"]["map_genes"],
    script:
        "../scripts/evaluation_figures.py"


rule batch_mixing:
    """How well the spots of different slides mix in the expression and in each encoder's image
    embeddings: iLISI (normalised by its permuted value), kBET acceptance, batch silhouette, per
    label (slide, and the sheet's batch / patient when they vary)."""
    input:
        unpack(batch_mixing_inputs),
    output:
        table="results/evaluation/batch_mixing.tsv",
        figure=report(
            "results/evaluation/batch_mixing.png", caption="../report/batch_mixing.rst", category="Evaluation"
        ),
    log:
        "logs/batch_mixing/batch_mixing.log",
    benchmark:
        "logs/benchmark/batch_mixing/batch_mixing.tsv"
    conda:
        "../../envs/imaging.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=30,
    params:
        samples=BATCH_MIXING_SAMPLES,
        encoders=BATCH_MIXING_ENCODERS,
        labels=batch_mixing_labels(),
        spots_per_slide=config["evaluate"]["batch_mixing_spots_per_slide"],
        perplexity=config["evaluate"]["batch_mixing_perplexity"],
        kernel=config["evaluate"]["batch_mixing_kernel"],
        pca_dim=config["evaluate"]["batch_mixing_pca_dim"],
        silhouette_spots=config["evaluate"]["batch_mixing_silhouette_spots"],
        seed=config["seed"],
    script:
        "../scripts/batch_mixing.py"


rule training_cost:
    """Steps, epochs, batch size, training spots, parameters, wall time and peak memory of every
    trained model the methods read, and whether each had CoMTIP's data and budget."""
    input:
        unpack(training_cost_inputs),
    output:
        table=report(
            "results/evaluation/training_cost.tsv", caption="../report/training_cost.rst", category="Evaluation"
        ),
    log:
        "logs/training_cost/training_cost.log",
    benchmark:
        "logs/benchmark/training_cost/training_cost.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=30,
    params:
        models=TRAINED_MODELS,
    script:
        "../scripts/training_cost.py"

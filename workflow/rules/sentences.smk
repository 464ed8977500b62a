rule select_genes:
    """Gene panel and value-bin edges, chosen on training samples only (no test leakage)."""
    input:
        spots=training_spots,
    output:
        panel="results/genes/gene_panel.tsv",
        bins="results/genes/value_bins.tsv",
    log:
        "logs/select_genes/select_genes.log",
    benchmark:
        "logs/benchmark/select_genes/select_genes.tsv"
    conda:
        "../../envs/imaging.yaml"
    threads: 1
    resources:
        mem_mb=16000,
        runtime=30,
    params:
        genes=config["genes"],
        seed=config["seed"],
    script:
        "../scripts/select_genes.py"


rule build_gene_sentences:
    """Per spot, the (gene, value, bin) tokens of the pretraining genes, sorted by value."""
    input:
        spots="results/{sample}/spots.h5ad",
        panel="results/genes/gene_panel.tsv",
        bins="results/genes/value_bins.tsv",
    output:
        sentences="results/{sample}/gene_sentences.npz",
    log:
        "logs/build_gene_sentences/{sample}.log",
    benchmark:
        "logs/benchmark/build_gene_sentences/{sample}.tsv"
    conda:
        "../../envs/imaging.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=20,
    params:
        max_len=config["genes"]["max_len"],
    script:
        "../scripts/build_gene_sentences.py"

rule extract_patches:
    """One RGB patch per in-tissue spot, centred on the spot, at the configured µm/px."""
    input:
        spots="results/{sample}/spots.h5ad",
        slide=slide_path,
    output:
        patches="results/{sample}/spot_patches.npy",
        index="results/{sample}/spot_patches.parquet",
    log:
        "logs/extract_patches/{sample}.log",
    benchmark:
        "logs/benchmark/extract_patches/{sample}.tsv"
    conda:
        "../../envs/imaging.yaml"
    threads: 4
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        patch=config["patches"],
    script:
        "../scripts/extract_patches.py"

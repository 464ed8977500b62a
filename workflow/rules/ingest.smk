rule ingest:
    """In-tissue spots of a Space Ranger run: raw counts, full-res (x, y), µm/px, QC metrics."""
    input:
        unpack(spaceranger_inputs),
        slide=slide_path,
    output:
        spots="results/{sample}/spots.h5ad",
    params:
        outs=spaceranger_dir,
        mpp=sample_mpp,
        spot_diameter_um=sample_spot_diameter_um,
        min_counts=config["ingest"]["min_counts"],
    log:
        "logs/ingest/{sample}.log",
    benchmark:
        "logs/benchmark/ingest/{sample}.tsv"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=30,
    conda:
        "../../envs/imaging.yaml"
    script:
        "../scripts/ingest.py"

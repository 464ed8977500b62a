rule tile_slide:
    """Tissue mask at low resolution, tile grid at the target µm/px, thumbnail with spots drawn."""
    input:
        spots="results/{sample}/spots.h5ad",
        slide=slide_path,
    output:
        mask="results/{sample}/tissue_mask.png",
        tiles="results/{sample}/tiles.parquet",
        thumbnail="results/{sample}/thumbnail.png",
    params:
        tiling=config["tiling"],
    log:
        "logs/tile_slide/{sample}.log",
    benchmark:
        "logs/benchmark/tile_slide/{sample}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../../envs/imaging.yaml"
    script:
        "../scripts/tile_slide.py"

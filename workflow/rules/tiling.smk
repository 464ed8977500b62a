rule tile_slide:
    """Tissue mask at low resolution, tile grid at the target µm/px, thumbnail with spots drawn."""
    input:
        unpack(tiling_inputs),
    output:
        mask="results/{sample}/tissue_mask.png",
        tiles="results/{sample}/tiles.parquet",
        thumbnail=report("results/{sample}/thumbnail.png", caption="../report/thumbnail.rst", category="Thumbnails"),
    log:
        "logs/tile_slide/{sample}.log",
    benchmark:
        "logs/benchmark/tile_slide/{sample}.tsv"
    conda:
        "../../envs/imaging.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        tiling=config["tiling"],
        mpp=sample_mpp,
    script:
        "../scripts/tile_slide.py"

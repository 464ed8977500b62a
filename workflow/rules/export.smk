rule spatialdata:
    """One SpatialData zarr per sample in full-resolution slide pixels: the H&E as a multiscale
    image, the spots (or an H&E-only slide's tiles) as shapes, the tissue mask as labels, and a
    table of the counts and every evaluated method's predictions on the gene panel."""
    input:
        unpack(spatialdata_inputs),
    output:
        zarr=directory("results/{sample}/spatialdata.zarr"),
    log:
        "logs/spatialdata/{sample}.log",
    benchmark:
        "logs/benchmark/spatialdata/{sample}.tsv"
    conda:
        "../../envs/imaging.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=30,
    params:
        methods=spatialdata_methods,
        image_max_px=config["export"]["image_max_px"],
    script:
        "../scripts/export_spatialdata.py"

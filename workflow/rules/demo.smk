rule simulate_demo_sample:
    """A synthetic Visium sample (Space Ranger outs/ + pyramidal TIFF) with known ground truth.

    Only runs for sample-sheet paths under config demo.dir; real samples never touch it.
    """
    output:
        matrix=f"{DEMO_DIR}/{{demo}}/outs/filtered_feature_bc_matrix.h5",
        positions=f"{DEMO_DIR}/{{demo}}/outs/spatial/tissue_positions.csv",
        scalefactors=f"{DEMO_DIR}/{{demo}}/outs/spatial/scalefactors_json.json",
        hires=f"{DEMO_DIR}/{{demo}}/outs/spatial/tissue_hires_image.png",
        lowres=f"{DEMO_DIR}/{{demo}}/outs/spatial/tissue_lowres_image.png",
        slide=f"{DEMO_DIR}/{{demo}}/slide.tif",
        truth=f"{DEMO_DIR}/{{demo}}/truth.h5ad",
    log:
        "logs/simulate_demo_sample/{demo}.log",
    benchmark:
        "logs/benchmark/simulate_demo_sample/{demo}.tsv"
    conda:
        "../../envs/imaging.yaml"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=20,
    params:
        out_dir=demo_sample_dir,
        seed=demo_seed,
        simulation=config["demo"]["params"],
    script:
        "../scripts/simulate_demo_sample.py"

rule ingest:
    """In-tissue spots (Visium HD: bins or pseudo-spots): raw counts, full-res (x, y), µm/px, QC metrics."""
    input:
        unpack(spaceranger_inputs),
        slide=slide_path,
    output:
        spots="results/{sample}/spots.h5ad",
    log:
        "logs/ingest/{sample}.log",
    benchmark:
        "logs/benchmark/ingest/{sample}.tsv"
    conda:
        "../../envs/imaging.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=30,
    params:
        outs=spaceranger_dir,
        mpp=sample_mpp,
        spot_diameter_um=sample_spot_diameter_um,
        spot_pitch_um=sample_spot_pitch_um,
        mpp_source=sample_mpp_source,
        mpp_tolerance=config["ingest"]["mpp_tolerance"],
        min_counts=config["ingest"]["min_counts"],
        bin_size_um=sample_bin_size_um,
        hd_pseudospot_um=sample_hd_pseudospot_um,
        hd_pseudospot_pitch_um=sample_hd_pseudospot_pitch_um,
    script:
        "../scripts/ingest.py"

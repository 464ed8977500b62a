"""Rule spatialdata: thin adapter around comtip.export.spatialdata.write_spatialdata."""

from comtip._core.runtime import rule_logging
from comtip.export.spatialdata import write_spatialdata

with rule_logging(snakemake.log[0]):
    inp = snakemake.input
    write_spatialdata(
        snakemake.output.zarr,
        sample=snakemake.wildcards.sample,
        slide_path=inp.slide,
        tissue_mask=inp.mask,
        spots_h5ad=inp.get("spots"),
        sentences_npz=inp.get("sentences"),
        predictions=dict(zip(snakemake.params.methods, inp.get("predictions", []), strict=True)),
        virtual_visium=inp.get("virtual_visium"),
        image_max_px=snakemake.params.image_max_px,
        threads=snakemake.threads,
    )

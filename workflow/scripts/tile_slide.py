"""Rule tile_slide: thin adapter around comtip.data.tiling.tile_slide."""

from comtip._core.runtime import rule_logging
from comtip.data.tiling import TissueParams, tile_slide

with rule_logging(snakemake.log[0]):
    cfg = dict(snakemake.params.tiling)
    tile_slide(
        snakemake.input.slide,
        snakemake.input.get("spots"),  # absent for H&E-only (predict) samples
        snakemake.output.mask,
        snakemake.output.tiles,
        snakemake.output.thumbnail,
        sample=snakemake.wildcards.sample,
        mpp=snakemake.params.mpp,
        tile_px=cfg.pop("tile_px"),
        tile_mpp=cfg.pop("tile_mpp"),
        min_tissue_fraction=cfg.pop("min_tissue_fraction"),
        thumbnail_max_px=cfg.pop("thumbnail_max_px"),
        tissue=TissueParams(**cfg),
    )

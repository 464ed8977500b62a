"""Entry points of the demo simulator: :func:`simulate_sample` runs the steps of the other
``comtip.demo`` modules in a fixed order (so the random draws, and hence the bytes written, are
reproducible) and writes one sample; :func:`main` is the ``comtip-simulate`` CLI.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from comtip._core.errors import PipelineInputError
from comtip.demo.expression import _expression, _gene_programs, _measure_spots
from comtip.demo.params import SimulationParams, _rng, _validate
from comtip.demo.render import _Renderer, _write_slide
from comtip.demo.spaceranger import (
    _write_10x_h5,
    _write_positions,
    _write_spatial_images,
    _write_truth,
)
from comtip.demo.tissue import _tissue_scene

# ---------------------------------------------------------------------------------------------
# Entry points


def simulate_sample(
    out_dir: str | Path,
    sample: str,
    seed: int,
    params: SimulationParams = SimulationParams(),  # noqa: B008 (frozen)
) -> dict:
    """Write one synthetic Visium sample (Space Ranger ``outs/``, ``slide.tif``, ``truth.h5ad``).

    Returns the written paths plus ``n_spots_total``, ``n_in_tissue``, ``n_genes``, ``mpp``
    and ``slide_dimensions`` (level-0 width, height).
    """
    _validate(params, sample, seed)
    out = Path(out_dir)
    geom, looks, fields, nuclei = _tissue_scene(params, seed, sample)
    programs = _gene_programs(params, looks)
    spots = _measure_spots(geom, fields, nuclei, params, seed, sample)
    if not spots.in_tissue.any():
        raise PipelineInputError(f"no spot centre falls on the tissue (tissue_mm={params.tissue_mm})", sample=sample)
    rates, counts, covariates = _expression(spots, programs, params, seed, sample)

    paths = {
        "slide": out / "slide.tif",
        "matrix_h5": out / "outs" / "filtered_feature_bc_matrix.h5",
        "tissue_positions": out / "outs" / "spatial" / "tissue_positions.csv",
        "scalefactors": out / "outs" / "spatial" / "scalefactors_json.json",
        "hires_image": out / "outs" / "spatial" / "tissue_hires_image.png",
        "lowres_image": out / "outs" / "spatial" / "tissue_lowres_image.png",
        "truth": out / "truth.h5ad",
    }
    stain_jitter = _rng(seed, sample, "stain").lognormal(0.0, 0.04, 3).astype(np.float32)
    renderer = _Renderer(geom, fields, nuclei, looks, stain_jitter, seed, sample)
    description = f"comtip synthetic slide; sample={sample}; seed={seed}"
    levels = _write_slide(paths["slide"], renderer, description)
    _write_spatial_images(paths["scalefactors"].parent, geom, levels, params)
    _write_positions(paths["tissue_positions"], spots, params.mpp)
    _write_10x_h5(paths["matrix_h5"], counts, spots.barcodes[spots.in_tissue], programs, sample)
    meta = {
        "sample": sample,
        "seed": seed,
        **dataclasses.asdict(params),
        "n_nuclei": int(nuclei.x_um.size),
    }
    _write_truth(paths["truth"], spots, rates, covariates, programs, looks, meta)
    return {
        **{k: str(v) for k, v in paths.items()},
        "n_spots_total": int(spots.barcodes.size),
        "n_in_tissue": int(spots.in_tissue.sum()),
        "n_genes": params.n_genes,
        "mpp": params.mpp,
        "slide_dimensions": (geom.width_px, geom.height_px),
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="comtip-simulate", description="Write one synthetic Visium sample.")
    parser.add_argument("--out", required=True, help="output folder of the sample")
    parser.add_argument("--sample", required=True, help="sample name (changes the tissue)")
    parser.add_argument("--seed", required=True, type=int)
    flags = {
        "tissue_mm": float,
        "margin_mm": float,
        "mpp": float,
        "n_genes": int,
        "n_cell_types": int,
        "mean_counts": float,
        "program_seed": int,
    }
    for name, kind in flags.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: print the summary as JSON; bad parameters give exit status 2 and one message."""
    args = _parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k not in ("out", "sample", "seed") and v is not None}
    params = dataclasses.replace(SimulationParams(), **overrides)
    try:
        summary = simulate_sample(args.out, args.sample, args.seed, params)
    except PipelineInputError as err:
        print(f"comtip-simulate: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Parameters of a simulated sample: :class:`SimulationParams`, the cell-type looks
(:class:`CellTypeLook`, ``ARCHETYPES``), the constants shared by the other ``comtip.demo``
modules, the per-purpose random streams (``_rng``) and the check that parameters can make a
sample (``_validate``).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from comtip._core.errors import PipelineInputError

FIELD_UM = 4.0  # spacing of the grid that holds the smooth random fields
TILE_PX = 256
ZLIB_LEVEL = 1  # noisy RGB barely compresses better at higher levels, and is 3x slower
MIN_LEVEL_SIDE = 1024  # the pyramid stops at the first level whose longer side is <= this
HIRES_MAX_SIDE = 2000
LOWRES_MAX_SIDE = 600
BACKGROUND_RGB = (240.0, 238.0, 242.0)
CAMERA_NOISE = 2.5  # half-width of the uniform grey-level noise on every pixel (sd ~1.4)
TISSUE_ASPECT = 1.1  # semi-axes of the tissue ellipse: r * 1.1 across, r / 1.1 down
DISK_SAMPLE_UM = 2.5  # lattice step of the points that measure a spot's composition


@dataclass(frozen=True)
class SimulationParams:
    """Knobs of one simulated sample.

    The defaults give an 8600 x 7455 px slide (0.5 µm/px), ~1800 grid spots of which ~500-600
    lie on the tissue, in about 5-10 s on two cores.
    """

    tissue_mm: float = 3.0
    margin_mm: float = 0.5
    mpp: float = 0.5
    spot_diameter_um: float = 55.0
    spot_pitch_um: float = 100.0
    fiducial_diameter_um: float = 89.0
    n_cell_types: int = 4
    n_genes: int = 300
    mean_counts: float = 2000.0
    # Cohort-level seed: genes, programs and cell-type looks (shared by every sample).
    program_seed: int = 0
    region_scale_um: float = 150.0  # smoothing length of the cell-type fields
    cellularity_sd: float = 0.35  # log-sd of the smooth within-type nuclei-density modulation
    n_markers_per_type: int = 5
    marker_fold: float = 25.0
    density_gene_fraction: float = 0.2  # share of genes whose level follows nuclei density
    reference_nuclei_per_mm2: float = 4000.0  # density at which the density term is neutral
    library_size_sd: float = 0.25  # log-sd of the per-spot library size
    nb_theta: float = 10.0  # negative binomial shape (smaller: more overdispersed)


@dataclass(frozen=True)
class CellTypeLook:
    """How one cell type is drawn: stroma colour and texture, nuclei density, shape, colour."""

    name: str
    stroma_rgb: tuple[float, float, float]
    fibre_texture: float
    nuclei_per_mm2: float
    nucleus_radius_um: float  # semi-minor axis
    nucleus_aspect: float
    nucleus_rgb: tuple[float, float, float]


ARCHETYPES: tuple[CellTypeLook, ...] = (
    CellTypeLook("epithelial", (220, 176, 214), 0.05, 4500, 3.8, 1.3, (95, 60, 145)),
    CellTypeLook("stromal", (240, 150, 182), 0.20, 1800, 2.0, 3.0, (95, 55, 140)),
    CellTypeLook("immune", (192, 166, 220), 0.05, 18000, 2.8, 1.05, (45, 30, 95)),
    CellTypeLook("loose_stroma", (236, 178, 206), 0.03, 700, 3.0, 1.8, (125, 85, 160)),
    CellTypeLook("muscle", (225, 115, 150), 0.20, 2500, 1.8, 3.5, (100, 55, 135)),
    CellTypeLook("mucinous", (186, 168, 226), 0.10, 3500, 4.2, 1.2, (90, 65, 150)),
)


# ---------------------------------------------------------------------------------------------
# Random streams


def _rng(seed: int, sample: str, purpose: str) -> np.random.Generator:
    """An independent, reproducible stream per (seed, sample, purpose).

    ``zlib.crc32`` rather than ``hash`` because Python salts string hashes per process.
    """
    key = [seed, zlib.crc32(sample.encode()), zlib.crc32(purpose.encode())]
    return np.random.default_rng(np.random.SeedSequence(key))


# ---------------------------------------------------------------------------------------------
# Validation


def _validate(params: SimulationParams, sample: str, seed: int) -> None:
    """Fail before any work on parameters that cannot make a sample."""
    problems = []
    if not sample:
        problems.append("the sample name must not be empty")
    if seed < 0 or params.program_seed < 0:
        problems.append(f"seed and program_seed must be >= 0 (got {seed}, {params.program_seed})")
    positive = (
        "tissue_mm",
        "mpp",
        "spot_diameter_um",
        "spot_pitch_um",
        "mean_counts",
        "nb_theta",
        "region_scale_um",
        "marker_fold",
    )
    problems += [
        f"{name} must be > 0 (got {getattr(params, name)})" for name in positive if not getattr(params, name) > 0
    ]
    if not 0 <= params.density_gene_fraction <= 1:
        problems.append("density_gene_fraction must be within [0, 1]")
    if params.margin_mm < 0:
        problems.append(f"margin_mm must be >= 0 (got {params.margin_mm})")
    if params.spot_diameter_um >= params.spot_pitch_um:
        problems.append("spot_diameter_um must be smaller than spot_pitch_um")
    if params.n_cell_types < 1 or params.n_markers_per_type < 1:
        problems.append("n_cell_types and n_markers_per_type must be >= 1")
    n_markers = params.n_cell_types * params.n_markers_per_type
    needed = n_markers + round(params.density_gene_fraction * params.n_genes) + 2
    if params.n_genes < needed:
        problems.append(f"n_genes must be >= {needed} (markers, density genes and a duplicate pair)")
    if problems:
        message = "invalid simulation parameters: " + "; ".join(problems)
        raise PipelineInputError(message, sample=sample)

"""Synthetic Visium cohort: an H&E-like slide plus a Space Ranger ``outs/`` folder per sample.

Why it exists: the pipeline needs an embedded demo and tests need inputs whose ground truth is
known. The tissue is split into cell-type regions that look different on the slide, and spot
expression is a mixture of cell-type gene programs plus a term driven by the nuclei density that
is drawn on the slide, so expression really is predictable from histology.

What is shared and what is per sample:

* gene names, ids, cell-type programs and cell-type looks depend only on the parameters
  (``program_seed`` among them), so every sample of a cohort has the same genes and programs
  and a model trained on one sample transfers to another;
* tissue shape, cell-type layout, nuclei, spot-grid phase, stain jitter and counts depend on
  ``(seed, sample)``.

Geometry: everything is computed in µm; level-0 pixel ``(col, row)`` covers
``[col, col + 1) x [row, row + 1)`` in pixel units, so a point at ``x`` µm has pixel coordinate
``x / mpp``. Positions in ``tissue_positions.csv`` use those continuous pixel coordinates.

Outputs are byte-identical for the same seed, sample and parameters on the same platform and
library versions (floating-point kernels may differ across CPUs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import tifffile
from PIL import Image
from scipy import ndimage
from scipy.spatial import cKDTree

from comtip.atomic import atomic_path
from comtip.errors import PipelineInputError

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


@dataclass(frozen=True)
class _Geometry:
    """Slide size and resolution."""

    width_px: int
    height_px: int
    mpp: float

    @property
    def width_um(self) -> float:
        return self.width_px * self.mpp

    @property
    def height_um(self) -> float:
        return self.height_px * self.mpp


@dataclass(frozen=True)
class _Fields:
    """Smooth random fields on a FIELD_UM grid (node ``j`` at ``j * FIELD_UM`` µm).

    ``stack`` holds, in order: tissue (0..1, tissue where > 0.5), one score per cell type (the
    type is the argmax), stain texture (z-score), cellularity (z-score). Cellularity comes last
    so the renderer, which does not need it, interpolates the view ``stack[:-1]``.
    """

    stack: np.ndarray  # (1 + n_types + 2, gh, gw) float32

    @property
    def n_types(self) -> int:
        return self.stack.shape[0] - 3


@dataclass(frozen=True)
class _Nuclei:
    """Nuclei drawn on the slide, sorted by y; sizes in µm, colours as optical densities."""

    x_um: np.ndarray
    y_um: np.ndarray
    semi_major_um: np.ndarray
    semi_minor_um: np.ndarray
    angle: np.ndarray
    od: np.ndarray  # (n, 3)
    cell_type: np.ndarray


@dataclass(frozen=True)
class _Spots:
    """The whole capture-area grid over the slide and what each spot disk covers."""

    barcodes: np.ndarray
    array_row: np.ndarray
    array_col: np.ndarray
    x_um: np.ndarray
    y_um: np.ndarray
    in_tissue: np.ndarray
    tissue_fraction: np.ndarray
    type_fractions: np.ndarray  # (n, n_types), rows sum to 1 where the disk touches tissue
    nuclei_count: np.ndarray


@dataclass(frozen=True)
class _Programs:
    """Cohort-wide gene table and per-type expression proportions."""

    ids: list[str]
    symbols: list[str]
    proportions: np.ndarray  # (n_types, n_genes), rows sum to 1
    density_beta: np.ndarray  # (n_genes,)
    marker_of: list[str]


# ---------------------------------------------------------------------------------------------
# Random streams


def _rng(seed: int, sample: str, purpose: str) -> np.random.Generator:
    """An independent, reproducible stream per (seed, sample, purpose).

    ``zlib.crc32`` rather than ``hash`` because Python salts string hashes per process.
    """
    key = [seed, zlib.crc32(sample.encode()), zlib.crc32(purpose.encode())]
    return np.random.default_rng(np.random.SeedSequence(key))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise, z-scored, float32.

    Filtered in Fourier space: the type fields use sigmas of ~40 grid cells, where a direct
    convolution would cost seconds.
    """
    spectrum = np.fft.rfft2(rng.standard_normal(shape, dtype=np.float32))
    smooth = np.fft.irfft2(ndimage.fourier_gaussian(spectrum, sigma, n=shape[1]), s=shape)
    return ((smooth - smooth.mean()) / smooth.std()).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Cohort-wide parts: cell-type looks, gene names, programs


def _cell_type_looks(params: SimulationParams) -> list[CellTypeLook]:
    """The first six types are fixed archetypes; more types are jittered copies of them."""
    rng = _rng(params.program_seed, "", "cell-type-looks")
    looks = []
    for t in range(params.n_cell_types):
        base = ARCHETYPES[t % len(ARCHETYPES)]
        if t < len(ARCHETYPES):
            looks.append(base)
            continue
        jitter = rng.uniform(0.8, 1.25, size=3)
        stroma = np.clip(np.multiply(base.stroma_rgb, rng.uniform(0.95, 1.03, 3)), 0, 250)
        looks.append(
            dataclasses.replace(
                base,
                name=f"{base.name}_{t // len(ARCHETYPES) + 1}",
                stroma_rgb=tuple(float(c) for c in stroma),
                nuclei_per_mm2=base.nuclei_per_mm2 * jitter[0],
                nucleus_radius_um=base.nucleus_radius_um * jitter[1],
                nucleus_aspect=max(1.0, base.nucleus_aspect * jitter[2]),
            )
        )
    return looks


def _gene_symbols(rng: np.random.Generator, n: int) -> list[str]:
    """Distinct symbols shaped like HGNC ones (``KRT19``, ``SLC4A``), but made up."""
    consonants = np.array(list("BCDFGHKLMNPRSTVWZ"))
    vowels = np.array(list("AEIOU"))
    patterns = ("CVC", "CCV", "CVCC", "CCVC", "CCC", "VCCV")
    suffixes = ("", "", "", "", "A", "B", "L", "P")
    symbols: list[str] = []
    seen: set[str] = set()
    while len(symbols) < n:
        pattern = patterns[rng.integers(len(patterns))]
        stem = "".join(rng.choice(consonants if c == "C" else vowels) for c in pattern)
        symbol = f"{stem}{rng.integers(1, 25)}{suffixes[rng.integers(len(suffixes))]}"
        if symbol not in seen:
            seen.add(symbol)
            symbols.append(symbol)
    return symbols


def _gene_programs(params: SimulationParams, looks: Sequence[CellTypeLook]) -> _Programs:
    """Log-normal base levels, per-type deviations, marker genes, density-responsive genes.

    Exactly one symbol is duplicated (a second id with the same name, as happens in real
    annotations), so that downstream make-unique handling is exercised.
    """
    rng = _rng(params.program_seed, "", "gene-programs")
    n_genes, n_types = params.n_genes, params.n_cell_types
    log_base = rng.normal(0.0, 1.3, n_genes)
    log_programs = log_base + rng.normal(0.0, 0.5, (n_types, n_genes))

    order = rng.permutation(n_genes)
    n_markers = params.n_markers_per_type * n_types
    markers = order[:n_markers].reshape(n_types, params.n_markers_per_type)
    marker_of = [""] * n_genes
    marker_level = np.quantile(log_base, 0.6)
    for t, genes in enumerate(markers):
        log_programs[:, genes] = marker_level + np.log(0.15)
        log_programs[t, genes] = marker_level + np.log(params.marker_fold)
        log_programs[t, genes] += rng.normal(0.0, 0.3, genes.size)
        for g in genes:
            marker_of[g] = looks[t].name

    density_beta = np.zeros(n_genes)
    others = order[n_markers:]
    n_density = int(round(params.density_gene_fraction * n_genes))
    responsive = others[:n_density]
    density_beta[responsive] = rng.uniform(0.5, 1.2, n_density) * rng.choice([-1.0, 1.0], n_density)

    symbols = _gene_symbols(rng, n_genes)
    original, duplicate = others[-2:]
    symbols[duplicate] = symbols[original]
    ids = [f"SYNG{i + 1:011d}" for i in range(n_genes)]

    programs = np.exp(log_programs)
    return _Programs(
        ids=ids,
        symbols=symbols,
        proportions=programs / programs.sum(axis=1, keepdims=True),
        density_beta=density_beta,
        marker_of=marker_of,
    )


# ---------------------------------------------------------------------------------------------
# Per-sample layout: slide size, fields, nuclei, spots


def _geometry(params: SimulationParams) -> _Geometry:
    """Slide = tissue ellipse bounding box plus margins; deliberately not square."""
    radius_um = params.tissue_mm * 500.0
    margin_um = params.margin_mm * 1000.0
    width_um = 2 * radius_um * TISSUE_ASPECT + 2 * margin_um
    height_um = 2 * radius_um / TISSUE_ASPECT + 2 * margin_um
    return _Geometry(round(width_um / params.mpp), round(height_um / params.mpp), params.mpp)


def _grid_shape(geom: _Geometry) -> tuple[int, int]:
    return math.ceil(geom.height_um / FIELD_UM) + 2, math.ceil(geom.width_um / FIELD_UM) + 2


def _tissue_field(
    geom: _Geometry, params: SimulationParams, rng: np.random.Generator
) -> np.ndarray:
    """A lobed ellipse with a ragged edge and a few holes, one connected piece, softened edge."""
    shape = _grid_shape(geom)
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32) * FIELD_UM
    radius_um = params.tissue_mm * 500.0
    rho = np.hypot(
        (x - geom.width_um / 2) / (radius_um * TISSUE_ASPECT),
        (y - geom.height_um / 2) / (radius_um / TISSUE_ASPECT),
    )
    lobes = _smooth_noise(rng, shape, 0.12 * radius_um / FIELD_UM)
    ragged = _smooth_noise(rng, shape, 20.0 / FIELD_UM)
    edge = np.tanh(0.8 * lobes + 0.35 * ragged)  # in (-1, 1): the boundary stays inside rho < 1
    mask = rho < 1.0 - 0.3 * (1.0 + edge) / 2.0
    mask &= _smooth_noise(rng, shape, 25.0 / FIELD_UM) < 2.8
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
        mask = labels == 1 + int(np.argmax(sizes))
    return ndimage.gaussian_filter(mask.astype(np.float32), 1.0)


def _make_fields(geom: _Geometry, params: SimulationParams, seed: int, sample: str) -> _Fields:
    """Tissue, cell-type scores, cellularity and stain texture, each from its own stream."""
    shape = _grid_shape(geom)
    rng = _rng(seed, sample, "fields")
    tissue = _tissue_field(geom, params, rng)
    region_sigma = params.region_scale_um / FIELD_UM
    types = [_smooth_noise(rng, shape, region_sigma) for _ in range(params.n_cell_types)]
    cellularity = _smooth_noise(rng, shape, 60.0 / FIELD_UM)
    stain = _smooth_noise(rng, shape, 6.0 / FIELD_UM)
    return _Fields(np.stack([tissue, *types, stain, cellularity]))


def _axis_weights(coord_um: np.ndarray, n_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Left grid node and linear weight of each coordinate (clamped to the grid)."""
    g = np.clip(np.asarray(coord_um, dtype=np.float64) / FIELD_UM, 0.0, n_nodes - 1.000001)
    i0 = np.floor(g).astype(np.intp)
    return i0, (g - i0).astype(np.float32)


def _interp_points(stack: np.ndarray, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
    """Bilinear values of every field at points: (n_fields, *x_um.shape).

    Same formula and operation order as :func:`_interp_band` (y first, then x), so what a spot
    is measured to cover matches what is drawn (up to the renderer's ~1 µm cells).
    """
    iy, wy = _axis_weights(y_um, stack.shape[1])
    ix, wx = _axis_weights(x_um, stack.shape[2])
    left = stack[:, iy, ix] * (1 - wy) + stack[:, iy + 1, ix] * wy
    right = stack[:, iy, ix + 1] * (1 - wy) + stack[:, iy + 1, ix + 1] * wy
    return left * (1 - wx) + right * wx


def _interp_band(stack: np.ndarray, ys_um: np.ndarray, xs_um: np.ndarray) -> np.ndarray:
    """Bilinear values of every field on a pixel grid: (n_fields, len(ys), len(xs))."""
    iy, wy = _axis_weights(ys_um, stack.shape[1])
    ix, wx = _axis_weights(xs_um, stack.shape[2])
    rows = stack[:, iy, :] * (1 - wy)[:, None] + stack[:, iy + 1, :] * wy[:, None]
    return rows[:, :, ix] * (1 - wx) + rows[:, :, ix + 1] * wx


def _cell_type(values: np.ndarray, n_types: int) -> np.ndarray:
    """Index of the highest type score (first on ties, like argmax): a running maximum over
    the few types is several times faster than ``argmax`` along a leading axis."""
    best = values[1].copy()
    cell_type = np.zeros(best.shape, np.intp)
    for t in range(1, n_types):
        higher = values[1 + t] > best
        cell_type[higher] = t
        np.maximum(best, values[1 + t], out=best)
    return cell_type


def _density_multiplier(cellularity: np.ndarray, params: SimulationParams) -> np.ndarray:
    return np.exp(params.cellularity_sd * np.clip(cellularity, -2.5, 2.5))


def _rgb_to_od(rgb: Sequence[float] | np.ndarray) -> np.ndarray:
    """Optical density (Beer-Lambert): stains add up in OD, not in RGB."""
    return -np.log(np.clip(np.asarray(rgb, dtype=np.float32), 1.0, 255.0) / 255.0)


def _place_nuclei(
    geom: _Geometry,
    fields: _Fields,
    looks: Sequence[CellTypeLook],
    params: SimulationParams,
    seed: int,
    sample: str,
) -> _Nuclei:
    """Inhomogeneous Poisson process by thinning: density = type density x cellularity."""
    rng = _rng(seed, sample, "nuclei")
    densities = np.array([look.nuclei_per_mm2 for look in looks])
    max_density = densities.max() * math.exp(2.5 * params.cellularity_sd)
    n_candidates = rng.poisson(max_density * geom.width_um * geom.height_um * 1e-6)
    x = rng.uniform(0, geom.width_um, n_candidates)
    y = rng.uniform(0, geom.height_um, n_candidates)
    values = _interp_points(fields.stack, x, y)
    cell_type = _cell_type(values, fields.n_types)
    density = densities[cell_type] * _density_multiplier(values[-1], params)
    keep = (values[0] > 0.5) & (rng.uniform(0, max_density, n_candidates) < density)
    x, y, cell_type = x[keep], y[keep], cell_type[keep]
    order = np.argsort(y, kind="stable")
    x, y, cell_type = x[order], y[order], cell_type[order]

    n = x.size
    radius = np.array([look.nucleus_radius_um for look in looks])[cell_type]
    aspect = np.array([look.nucleus_aspect for look in looks])[cell_type]
    semi_minor = radius * rng.lognormal(0.0, 0.15, n)
    semi_major = semi_minor * np.maximum(1.0, aspect * rng.lognormal(0.0, 0.1, n))
    # Elongated (spindle) nuclei follow the horizontal fibres of their stroma.
    angle = np.where(aspect > 2.0, rng.normal(0.0, 0.35, n), rng.uniform(0.0, np.pi, n))
    nucleus_od = np.stack([_rgb_to_od(look.nucleus_rgb) for look in looks])
    od = nucleus_od[cell_type] * rng.lognormal(0.0, 0.15, n)[:, None]
    return _Nuclei(x, y, semi_major, semi_minor, angle, od.astype(np.float32), cell_type)


def _barcodes(array_row: np.ndarray, array_col: np.ndarray) -> np.ndarray:
    """Visium-style 16-nt barcodes: an odd-multiplier hash of (row, col) is a bijection mod 2^32,
    so barcodes are unique, fixed per grid position (like a real whitelist) and look random."""
    key = (array_row.astype(np.uint64) << np.uint64(12)) | array_col.astype(np.uint64)
    code = (key * np.uint64(0x9E3779B1) + np.uint64(0x632BE5AB)) & np.uint64(0xFFFFFFFF)
    shifts = np.arange(30, -1, -2, dtype=np.uint64)
    digits = (code[:, None] >> shifts[None, :]) & np.uint64(3)
    letters = np.array(list("ACGT"))[digits.astype(np.intp)]
    return np.array(["".join(row) + "-1" for row in letters])


def _disk_offsets(radius_um: float) -> tuple[np.ndarray, np.ndarray]:
    """A regular lattice of points inside a disk, symmetric about its centre."""
    steps = np.arange(-radius_um, radius_um + 1e-9, DISK_SAMPLE_UM)
    dx, dy = np.meshgrid(steps - steps.mean(), steps - steps.mean())
    inside = dx**2 + dy**2 <= radius_um**2
    return dx[inside], dy[inside]


def _spot_grid(
    geom: _Geometry, params: SimulationParams, seed: int, sample: str
) -> tuple[np.ndarray, ...]:
    """Hexagonal Visium grid with a random phase: array_col steps are half a pitch, rows are
    pitch*sqrt(3)/2 apart, and a row holds only columns of its own parity. Every spot whose disk
    lies on the slide is kept."""
    rng = _rng(seed, sample, "spot-grid")
    radius = params.spot_diameter_um / 2
    dx, dy = params.spot_pitch_um / 2, params.spot_pitch_um * math.sqrt(3) / 2
    x0, y0 = radius + rng.uniform(0, 2 * dx), radius + rng.uniform(0, dy)
    n_rows = int((geom.height_um - radius - y0) // dy) + 1
    n_cols = int((geom.width_um - radius - x0) // dx) + 1
    row, col = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    keep = (row + col) % 2 == 0
    row, col = row[keep], col[keep]
    return row, col, x0 + col * dx, y0 + row * dy


def _measure_spots(
    geom: _Geometry,
    fields: _Fields,
    nuclei: _Nuclei,
    params: SimulationParams,
    seed: int,
    sample: str,
) -> _Spots:
    """What each spot disk covers, measured from the same fields and nuclei that are drawn."""
    row, col, x, y = _spot_grid(geom, params, seed, sample)
    radius = params.spot_diameter_um / 2
    ox, oy = _disk_offsets(radius)
    values = _interp_points(fields.stack, x[:, None] + ox[None, :], y[:, None] + oy[None, :])
    tissue = values[0] > 0.5
    cell_type = _cell_type(values, fields.n_types)
    type_counts = np.stack(
        [(tissue & (cell_type == t)).sum(axis=1) for t in range(fields.n_types)], axis=1
    )
    n_tissue = tissue.sum(axis=1)
    fractions = type_counts / np.maximum(n_tissue, 1)[:, None]
    in_tissue = _interp_points(fields.stack[:1], x, y)[0] > 0.5
    tree = cKDTree(np.column_stack([nuclei.x_um, nuclei.y_um]))
    nuclei_count = tree.query_ball_point(np.column_stack([x, y]), radius, return_length=True)
    barcodes = _barcodes(row, col)
    order = np.argsort(barcodes, kind="stable")  # Space Ranger lists spots by barcode
    return _Spots(
        barcodes=barcodes[order],
        array_row=row[order],
        array_col=col[order],
        x_um=x[order],
        y_um=y[order],
        in_tissue=in_tissue[order],
        tissue_fraction=(n_tissue / ox.size)[order],
        type_fractions=fractions[order],
        nuclei_count=np.asarray(nuclei_count)[order],
    )


# ---------------------------------------------------------------------------------------------
# Expression


def _expression(
    spots: _Spots, programs: _Programs, params: SimulationParams, seed: int, sample: str
) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Noiseless rates and negative-binomial counts for the in-tissue spots.

    rate = library size x normalise(sum_t fraction_t x program_t x exp(beta x density_z)),
    where density_z is the log nuclei count in the disk relative to a fixed reference density
    (fixed, not per-sample, so the image -> expression relation is the same in every sample).
    Library size grows with tissue coverage and cellularity, with log-normal spot noise, and is
    scaled so its mean over in-tissue spots is ``mean_counts``.
    """
    rng = _rng(seed, sample, "expression")
    sel = spots.in_tissue
    disk_mm2 = math.pi * (params.spot_diameter_um / 2000.0) ** 2
    reference = params.reference_nuclei_per_mm2 * disk_mm2
    density_z = np.log((spots.nuclei_count[sel] + 1.0) / (reference + 1.0))
    mix = spots.type_fractions[sel] @ programs.proportions
    mix *= np.exp(np.outer(density_z, programs.density_beta))
    mix /= mix.sum(axis=1, keepdims=True)
    noise = rng.lognormal(-(params.library_size_sd**2) / 2, params.library_size_sd, sel.sum())
    library = spots.tissue_fraction[sel] * np.exp(0.3 * density_z) * noise
    library *= params.mean_counts / library.mean()
    rates = mix * library[:, None]
    gamma = rng.gamma(params.nb_theta, rates / params.nb_theta)
    counts = rng.poisson(gamma).astype(np.int32)
    covariates = pd.DataFrame(
        {
            "nuclei_count": spots.nuclei_count[sel].astype(np.int32),
            "nuclei_per_mm2": (spots.nuclei_count[sel] / disk_mm2).astype(np.float32),
            "density_z": density_z.astype(np.float32),
            "tissue_fraction": spots.tissue_fraction[sel].astype(np.float32),
            "expected_library_size": library.astype(np.float32),
        }
    )
    return rates.astype(np.float32), counts, covariates


# ---------------------------------------------------------------------------------------------
# Slide rendering


@dataclass(frozen=True)
class _Renderer:
    """Draws horizontal bands of the level-0 image.

    The stroma (type colour, tissue edge, stain, fibres) is computed on square cells of ``step``
    pixels, ``step`` being the power of two that makes a cell about 1 µm, and repeated onto the
    pixels: it varies over several µm anyway, and this keeps a default slide to seconds. Nuclei
    and camera noise are drawn per pixel. Each band has its own random stream, so a band never
    depends on the bands drawn before it.
    """

    geom: _Geometry
    fields: _Fields
    nuclei: _Nuclei
    looks: tuple[CellTypeLook, ...]
    stain_jitter: np.ndarray  # per-channel OD factor: this sample's staining
    seed: int
    sample: str

    @property
    def step(self) -> int:
        """Pixels per side of the cells the stroma is computed on (cells of ~1 µm)."""
        return 2 ** max(0, math.floor(math.log2(1.0 / self.geom.mpp)))

    def band(self, index: int, y0: int, y1: int) -> np.ndarray:
        """RGB uint8 rows ``y0:y1`` of level 0."""
        rng = _rng(self.seed, self.sample, f"band-{index}")
        od = self._stroma_od(y0, y1, rng)
        self._draw_nuclei(od, y0, y1, rng)
        np.multiply(od, -self.stain_jitter, out=od)
        np.exp(od, out=od)
        od *= 255.0
        noise = rng.random(od.shape[:2], dtype=np.float32) * (2 * CAMERA_NOISE)
        noise += 0.5 - CAMERA_NOISE  # + 0.5: the cast to uint8 below truncates
        od += noise[..., None]
        return np.clip(od, 0, 255, out=od).astype(np.uint8)

    def _stroma_od(self, y0: int, y1: int, rng: np.random.Generator) -> np.ndarray:
        """Optical density (h, width, 3) of tissue-or-background without nuclei.

        Type colour, modulated by a smooth stain field and horizontal fibre streaks, blended
        into the background across the soft tissue edge.
        """
        step, width = self.step, self.geom.width_px
        cell_um = step * self.geom.mpp
        c0, c1 = y0 // step, -(-y1 // step)
        ys_um = (np.arange(c0, c1) + 0.5) * cell_um
        xs_um = (np.arange(-(-width // step)) + 0.5) * cell_um
        values = _interp_band(self.fields.stack[:-1], ys_um, xs_um)
        cell_type = _cell_type(values, self.fields.n_types)
        streak = max(3, round(8.0 / cell_um))
        white = rng.standard_normal(cell_type.shape, dtype=np.float32)
        streaks = ndimage.uniform_filter1d(white, streak, axis=1) * math.sqrt(streak)
        fibre = np.array([look.fibre_texture for look in self.looks], dtype=np.float32)[cell_type]
        factor = np.clip(1.0 + 0.12 * values[-1] + fibre * streaks, 0.3, 2.5)
        stroma = np.stack([_rgb_to_od(look.stroma_rgb) for look in self.looks])[cell_type]
        tissue = np.clip((values[0] - 0.5) * 5.0 + 0.5, 0.0, 1.0)[..., None]
        od = stroma * (factor[..., None] * tissue) + _rgb_to_od(BACKGROUND_RGB) * (1.0 - tissue)
        if step > 1:
            od = od.repeat(step, axis=0).repeat(step, axis=1)
        top = y0 - c0 * step
        return np.ascontiguousarray(od[top : top + y1 - y0, :width])

    def _draw_nuclei(self, od: np.ndarray, y0: int, y1: int, rng: np.random.Generator) -> None:
        """Anti-aliased ellipses with a darker rim and grainy chromatin, composited into ``od``.

        Soft edge pixels go first and solid interiors overwrite them, so an overlapping
        neighbour's edge never lightens a nucleus.
        """
        mpp = self.geom.mpp
        reach_um = float(self.nuclei.semi_major_um.max(initial=0.0)) + 2 * mpp
        lo, hi = np.searchsorted(self.nuclei.y_um, [y0 * mpp - reach_um, y1 * mpp + reach_um])
        in_band = self.nuclei.cell_type[lo:hi]
        pieces = [
            self._stamp(np.flatnonzero(in_band == t) + lo, y0, y1) for t in range(len(self.looks))
        ]
        rows, cols, alpha, which, rim = (np.concatenate(p) for p in zip(*pieces, strict=True))
        grain = rng.uniform(0.75, 1.25, alpha.size).astype(np.float32)
        pixel_od = self.nuclei.od[which] * (grain * np.where(rim, 1.35, 1.0))[:, None]
        soft = alpha < 1.0
        a = alpha[soft, None]
        od[rows[soft], cols[soft]] = od[rows[soft], cols[soft]] * (1.0 - a) + pixel_od[soft] * a
        od[rows[~soft], cols[~soft]] = pixel_od[~soft]

    def _stamp(self, idx: np.ndarray, y0: int, y1: int) -> tuple[np.ndarray, ...]:
        """Pixels covered by nuclei ``idx``: band row, column, alpha, nucleus index, rim flag.

        Called per cell type so the stamping box fits that type's nucleus size.
        """
        mpp = self.geom.mpp
        if idx.size == 0:
            empty = np.empty(0, np.intp)
            return empty, empty, np.empty(0, np.float32), empty, np.empty(0, bool)
        a = self.nuclei.semi_major_um[idx] / mpp
        b = self.nuclei.semi_minor_um[idx] / mpp
        box = 2 * math.ceil(float(a.max())) + 3
        offsets = np.arange(box) - box // 2
        cx, cy = self.nuclei.x_um[idx] / mpp, self.nuclei.y_um[idx] / mpp
        px = np.floor(cx).astype(np.intp)[:, None] + offsets  # (n, box)
        py = np.floor(cy).astype(np.intp)[:, None] + offsets
        dx = (px + 0.5 - cx[:, None])[:, None, :]  # (n, 1, box)
        dy = (py + 0.5 - cy[:, None])[:, :, None]  # (n, box, 1)
        angle = self.nuclei.angle[idx][:, None, None]
        cos, sin = np.cos(angle), np.sin(angle)
        u = (dx * cos + dy * sin) / a[:, None, None]
        v = (dy * cos - dx * sin) / b[:, None, None]
        r = np.sqrt(u * u + v * v)
        alpha = np.clip((1.0 - r) * b[:, None, None] + 0.5, 0.0, 1.0)
        rows = np.broadcast_to(py[:, :, None], r.shape)
        cols = np.broadcast_to(px[:, None, :], r.shape)
        keep = (alpha > 0) & (rows >= y0) & (rows < y1) & (cols >= 0) & (cols < self.geom.width_px)
        which = np.broadcast_to(idx[:, None, None], r.shape)[keep]
        return rows[keep] - y0, cols[keep], alpha[keep].astype(np.float32), which, r[keep] > 0.75


def _downsample2(image: np.ndarray) -> np.ndarray:
    """2x2 box average (rounded); an odd last row/column is averaged with a copy of itself."""
    pad = ((0, image.shape[0] % 2), (0, image.shape[1] % 2), (0, 0))
    if pad[0][1] or pad[1][1]:
        image = np.pad(image, pad, mode="edge")
    total = image[0::2, 0::2].astype(np.uint16)
    total += image[1::2, 0::2]
    total += image[0::2, 1::2]
    total += image[1::2, 1::2]
    total += 2
    return (total >> 2).astype(np.uint8)


def _level0_tiles(renderer: _Renderer, level1: np.ndarray) -> Iterator[bytes]:
    """zlib-compressed level-0 tiles in TIFF order; fills ``level1`` on the way.

    Level 0 is never held whole: it is drawn one tile row (band) at a time, the next band in a
    worker thread while this thread compresses the current one (numpy and zlib both release
    the GIL, so the two overlap on two cores).
    """
    width, height = renderer.geom.width_px, renderer.geom.height_px
    starts = range(0, height, TILE_PX)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(renderer.band, 0, 0, min(TILE_PX, height))
        for index, y0 in enumerate(starts):
            band = pending.result()
            if index + 1 < len(starts):
                y1 = starts[index + 1]
                pending = pool.submit(renderer.band, index + 1, y1, min(y1 + TILE_PX, height))
            small = _downsample2(band)
            level1[y0 // 2 : y0 // 2 + small.shape[0]] = small
            padded = np.full((TILE_PX, -(-width // TILE_PX) * TILE_PX, 3), 255, np.uint8)
            padded[: band.shape[0], :width] = band
            for x0 in range(0, width, TILE_PX):
                yield zlib.compress(padded[:, x0 : x0 + TILE_PX].tobytes(), ZLIB_LEVEL)


def _write_slide(path: Path, renderer: _Renderer, description: str) -> list[np.ndarray]:
    """Pyramidal tiled TIFF, levels as consecutive pages (openslide ignores SubIFDs).

    Returns the levels below level 0, held in memory (level 1 is a quarter of level 0).
    """
    geom = renderer.geom
    level1 = np.zeros(((geom.height_px + 1) // 2, (geom.width_px + 1) // 2, 3), np.uint8)
    pyramid_bytes = geom.width_px * geom.height_px * 3 * 4 // 3  # level 0 + 1/4 + 1/16 + ...
    options = {
        "tile": (TILE_PX, TILE_PX),
        "photometric": "rgb",
        "compression": "zlib",
        "resolutionunit": "CENTIMETER",
        "metadata": None,
    }
    levels: list[np.ndarray] = []
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=pyramid_bytes > 2**31) as tif:
        tif.write(
            _level0_tiles(renderer, level1),
            shape=(geom.height_px, geom.width_px, 3),
            dtype=np.uint8,
            resolution=(1e4 / geom.mpp, 1e4 / geom.mpp),
            subfiletype=0,
            description=description,
            **options,
        )
        level = level1
        while True:
            levels.append(level)
            mpp = geom.mpp * geom.width_px / level.shape[1]
            tif.write(
                level,
                resolution=(1e4 / mpp, 1e4 / mpp),
                subfiletype=1,
                compressionargs={"level": ZLIB_LEVEL},
                maxworkers=2,
                **options,
            )
            if max(level.shape[:2]) <= MIN_LEVEL_SIDE:
                break
            level = _downsample2(level)
    return levels


# ---------------------------------------------------------------------------------------------
# Space Ranger files


def _write_spatial_images(
    spatial: Path, geom: _Geometry, levels: Sequence[np.ndarray], params: SimulationParams
) -> None:
    """hires/lowres PNGs resampled from the smallest pyramid level that is still large enough,
    and the scale factors that map full-resolution pixels onto them."""
    longest = max(geom.width_px, geom.height_px)
    scalefactors = {
        "spot_diameter_fullres": params.spot_diameter_um / params.mpp,
        "fiducial_diameter_fullres": params.fiducial_diameter_um / params.mpp,
        "tissue_hires_scalef": min(1.0, HIRES_MAX_SIDE / longest),
        "tissue_lowres_scalef": min(1.0, LOWRES_MAX_SIDE / longest),
    }
    for name, key in (
        ("tissue_hires_image.png", "tissue_hires_scalef"),
        ("tissue_lowres_image.png", "tissue_lowres_scalef"),
    ):
        size = (round(geom.width_px * scalefactors[key]), round(geom.height_px * scalefactors[key]))
        large_enough = [level for level in levels if level.shape[1] >= size[0]] or [levels[0]]
        source = min(large_enough, key=lambda level: level.shape[1])
        image = Image.fromarray(source).resize(size, Image.Resampling.LANCZOS)
        with atomic_path(spatial / name) as tmp:
            image.save(tmp, format="PNG", compress_level=3)
    with atomic_path(spatial / "scalefactors_json.json") as tmp:
        tmp.write_text(json.dumps(scalefactors, indent=2) + "\n")


def _write_positions(path: Path, spots: _Spots, mpp: float) -> None:
    """Space Ranger >= 2 ``tissue_positions.csv`` (with header), all spots of the grid."""
    table = pd.DataFrame(
        {
            "barcode": spots.barcodes,
            "in_tissue": spots.in_tissue.astype(int),
            "array_row": spots.array_row,
            "array_col": spots.array_col,
            "pxl_row_in_fullres": spots.y_um / mpp,
            "pxl_col_in_fullres": spots.x_um / mpp,
        }
    )
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.3f")


def _write_10x_h5(
    path: Path, counts: np.ndarray, barcodes: np.ndarray, programs: _Programs, sample: str
) -> None:
    """10x Genomics feature-barcode matrix HDF5 (v3): CSC genes x barcodes, i.e. CSR of
    barcodes x genes. ``track_times=False`` keeps the bytes reproducible."""
    matrix = sp.csr_matrix(counts)
    fixed = {"track_times": False}
    packed = {"track_times": False, "compression": "gzip", "shuffle": True}
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["filetype"] = "matrix"
        f.attrs["version"] = np.int64(2)
        f.attrs["software_version"] = "comtip-simulate"
        f.attrs["library_ids"] = np.array([sample.encode()])
        f.attrs["chemistry_description"] = "Visium Spatial Gene Expression (synthetic)"
        group = f.create_group("matrix")
        group.create_dataset("barcodes", data=np.array([b.encode() for b in barcodes]), **packed)
        group.create_dataset("data", data=matrix.data.astype(np.int32), **packed)
        group.create_dataset("indices", data=matrix.indices.astype(np.int64), **packed)
        group.create_dataset("indptr", data=matrix.indptr.astype(np.int64), **packed)
        shape = np.array([counts.shape[1], counts.shape[0]], np.int32)  # genes x barcodes
        group.create_dataset("shape", data=shape, **fixed)
        features = group.create_group("features")
        n = len(programs.ids)
        features.create_dataset("id", data=np.array([g.encode() for g in programs.ids]), **packed)
        names = np.array([g.encode() for g in programs.symbols])
        features.create_dataset("name", data=names, **packed)
        features.create_dataset("feature_type", data=np.array([b"Gene Expression"] * n), **packed)
        features.create_dataset("genome", data=np.array([b"synthetic"] * n), **packed)
        features.create_dataset("_all_tag_keys", data=np.array([b"genome"]), **fixed)


def _write_truth(
    path: Path,
    spots: _Spots,
    rates: np.ndarray,
    covariates: pd.DataFrame,
    programs: _Programs,
    looks: Sequence[CellTypeLook],
    meta: dict,
) -> None:
    """Ground truth for evaluations: noiseless rates (expected counts) per in-tissue spot."""
    sel = spots.in_tissue
    names = [look.name for look in looks]
    fractions = spots.type_fractions[sel].astype(np.float32)
    obs = pd.DataFrame(
        {
            "barcode": spots.barcodes[sel],
            "array_row": spots.array_row[sel],
            "array_col": spots.array_col[sel],
            "dominant_cell_type": pd.Categorical(
                np.array(names)[fractions.argmax(axis=1)], categories=names
            ),
            **{k: v.to_numpy() for k, v in covariates.items()},
        },
        index=pd.Index(spots.barcodes[sel], name=None),
    )
    var = pd.DataFrame(
        {
            "gene_ids": programs.ids,
            "gene_symbol": programs.symbols,
            "marker_of": programs.marker_of,
            "density_beta": programs.density_beta.astype(np.float32),
        },
        index=ad.utils.make_index_unique(pd.Index(programs.symbols)),
    )
    truth = ad.AnnData(X=rates, obs=obs, var=var)
    truth.obsm["cell_type_fractions"] = fractions
    truth.obsm["spatial"] = np.column_stack([spots.x_um[sel], spots.y_um[sel]]) / meta["mpp"]
    truth.uns["cell_types"] = names
    truth.uns["simulation"] = meta
    with atomic_path(path) as tmp:
        truth.write_h5ad(tmp)


# ---------------------------------------------------------------------------------------------
# Entry points


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
        f"{name} must be > 0 (got {getattr(params, name)})"
        for name in positive
        if not getattr(params, name) > 0
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
        problems.append(
            f"n_genes must be >= {needed} (markers, density genes and a duplicate pair)"
        )
    if problems:
        message = "invalid simulation parameters: " + "; ".join(problems)
        raise PipelineInputError(message, sample=sample)


def simulate_sample(
    out_dir: str | Path, sample: str, seed: int, params: SimulationParams = SimulationParams()
) -> dict:
    """Write one synthetic Visium sample (Space Ranger ``outs/``, ``slide.tif``, ``truth.h5ad``).

    Returns the written paths plus ``n_spots_total``, ``n_in_tissue``, ``n_genes``, ``mpp``
    and ``slide_dimensions`` (level-0 width, height).
    """
    _validate(params, sample, seed)
    out = Path(out_dir)
    geom = _geometry(params)
    looks = tuple(_cell_type_looks(params))
    programs = _gene_programs(params, looks)
    fields = _make_fields(geom, params, seed, sample)
    nuclei = _place_nuclei(geom, fields, looks, params, seed, sample)
    spots = _measure_spots(geom, fields, nuclei, params, seed, sample)
    if not spots.in_tissue.any():
        raise PipelineInputError(
            f"no spot centre falls on the tissue (tissue_mm={params.tissue_mm})", sample=sample
        )
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
    parser = argparse.ArgumentParser(
        prog="comtip-simulate", description="Write one synthetic Visium sample."
    )
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
    overrides = {
        k: v for k, v in vars(args).items() if k not in ("out", "sample", "seed") and v is not None
    }
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

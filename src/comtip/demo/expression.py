"""Gene expression: the cohort-wide gene table and cell-type programs, the hexagonal Visium
spot grid with its barcodes, what each spot disk covers (tissue, cell-type fractions, nuclei),
and the noiseless rates and negative-binomial counts of the in-tissue spots.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from comtip.demo.params import DISK_SAMPLE_UM, CellTypeLook, SimulationParams, _rng
from comtip.demo.tissue import _cell_type, _Fields, _Geometry, _interp_points, _Nuclei


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
# Cohort-wide parts: gene names, programs


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
# Per-sample spots


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


def _spot_grid(geom: _Geometry, params: SimulationParams, seed: int, sample: str) -> tuple[np.ndarray, ...]:
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
    type_counts = np.stack([(tissue & (cell_type == t)).sum(axis=1) for t in range(fields.n_types)], axis=1)
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

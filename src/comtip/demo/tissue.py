"""The per-sample tissue: slide geometry, the smooth random fields (tissue shape, cell-type
scores, stain texture, cellularity) and their bilinear interpolation, the cell-type looks of a
cohort, and the nuclei placed on the tissue. Everything is in µm; the slide renderer
(:mod:`comtip.demo.render`) and the spot measurement (:mod:`comtip.demo.expression`) both read
these same fields and nuclei, so what is drawn is what is measured.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from comtip.demo.params import (
    ARCHETYPES,
    FIELD_UM,
    TISSUE_ASPECT,
    CellTypeLook,
    SimulationParams,
    _rng,
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


# ---------------------------------------------------------------------------------------------
# Smooth random fields


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise, z-scored, float32.

    Filtered in Fourier space: the type fields use sigmas of ~40 grid cells, where a direct
    convolution would cost seconds.
    """
    spectrum = np.fft.rfft2(rng.standard_normal(shape, dtype=np.float32))
    smooth = np.fft.irfft2(ndimage.fourier_gaussian(spectrum, sigma, n=shape[1]), s=shape)
    return ((smooth - smooth.mean()) / smooth.std()).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Cohort-wide part: cell-type looks


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


# ---------------------------------------------------------------------------------------------
# Per-sample layout: slide size, fields, nuclei


def _geometry(params: SimulationParams) -> _Geometry:
    """Slide = tissue ellipse bounding box plus margins; deliberately not square."""
    radius_um = params.tissue_mm * 500.0
    margin_um = params.margin_mm * 1000.0
    width_um = 2 * radius_um * TISSUE_ASPECT + 2 * margin_um
    height_um = 2 * radius_um / TISSUE_ASPECT + 2 * margin_um
    return _Geometry(round(width_um / params.mpp), round(height_um / params.mpp), params.mpp)


def _grid_shape(geom: _Geometry) -> tuple[int, int]:
    return math.ceil(geom.height_um / FIELD_UM) + 2, math.ceil(geom.width_um / FIELD_UM) + 2


def _tissue_field(geom: _Geometry, params: SimulationParams, rng: np.random.Generator) -> np.ndarray:
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


def _tissue_scene(
    params: SimulationParams, seed: int, sample: str
) -> tuple[_Geometry, tuple[CellTypeLook, ...], _Fields, _Nuclei]:
    """The slide's geometry, cell-type looks, fields and nuclei: the tissue every simulator of a
    sample draws from (Visium spots, Visium HD bins)."""
    geom = _geometry(params)
    looks = tuple(_cell_type_looks(params))
    fields = _make_fields(geom, params, seed, sample)
    return geom, looks, fields, _place_nuclei(geom, fields, looks, params, seed, sample)

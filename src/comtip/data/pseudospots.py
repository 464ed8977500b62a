"""Pseudo-spots: Visium HD bins summed into Visium-like spots (config ``ingest.hd_pseudospot_um``).

Geometry, and why (docs/data-stages.md, "Visium HD"):

* a **hexagonal grid of discs**, Visium's own layout: disc diameter ``diameter_um`` (55 = a
  Visium spot), centre-to-centre ``pitch_um`` (default 100/55 of the diameter, Visium's ratio),
  so a pseudo-spot measures what a Visium spot at that place would measure, and models trained
  on Visium see the same unit. Array coordinates follow Visium's convention (a row holds only
  columns of its own parity; neighbours are (±2, 0) and (±1, ±1)), so everything that reads
  Visium's array grid (``spot_pitch_px``, mclSTExp's neighbours) reads pseudo-spots unchanged;
* a bin belongs to the disc its **centre** falls in (at most one: the pitch may not be smaller
  than the diameter); bins between discs are left out, as the tissue between Visium spots is;
* the pseudo-spot's centre is the **grid centre** of its disc, not the mean of its bins'
  centres: the counts measure the disc, and the patch cut around the centre should show the
  same disc (at the tissue edge the mean would drift inwards, off the disc);
* a pseudo-spot is kept (``in_tissue`` = 1) when a **strict majority** of the bins in its disc
  are in tissue: a disc that only grazes the tissue would be a low-count spot whose patch is
  mostly glass. Its counts are the sum over its in-tissue bins (out-of-tissue bins have none in
  the filtered matrix).

The grid is laid in the slide's pixel frame from the corner of the bins' bounding box. The sum is
one sparse (pseudo-spots x bins) 0/1 matrix times the bins' sparse counts: memory O(nnz).
"""

from __future__ import annotations

import math

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

VISIUM_PITCH_PER_DIAMETER = 100.0 / 55.0


def default_pitch_um(diameter_um: float, pitch_um: float | None) -> float:
    """The pitch of the pseudo-spot grid: ``pitch_um`` when given, else Visium's 100/55 × diameter."""
    return float(pitch_um) if pitch_um is not None else diameter_um * VISIUM_PITCH_PER_DIAMETER


def hex_cells(xy: np.ndarray, origin: np.ndarray, pitch: float, radius: float) -> tuple[np.ndarray, ...]:
    """For each point (x, y), the (array_row, array_col) of the nearest centre of the hexagonal
    grid (rows ``pitch·√3/2`` apart, columns ``pitch/2`` apart, ``row + col`` even) and whether
    the point lies within ``radius`` of it. Same units for all arguments.

    Only the two grid rows around a point can hold a centre closer than ``pitch/2``, so those two
    are searched; with ``radius <= pitch/2`` that finds every point inside a disc.
    """
    dx, dy = pitch / 2.0, pitch * math.sqrt(3.0) / 2.0
    u = (xy[:, 0] - origin[0]) / dx
    v = (xy[:, 1] - origin[1]) / dy
    below = np.floor(v).astype(np.int64)
    best_row = np.zeros(len(xy), np.int64)
    best_col = np.zeros(len(xy), np.int64)
    best_d2 = np.full(len(xy), np.inf)
    for row in (below, below + 1):
        parity = row % 2
        col = 2 * np.round((u - parity) / 2.0).astype(np.int64) + parity
        d2 = ((u - col) * dx) ** 2 + ((v - row) * dy) ** 2
        closer = d2 < best_d2
        best_row[closer], best_col[closer], best_d2[closer] = row[closer], col[closer], d2[closer]
    return best_row, best_col, best_d2 <= radius**2


def aggregate_bins(
    bins: ad.AnnData, positions: pd.DataFrame, *, mpp: float, diameter_um: float, pitch_um: float | None = None
) -> ad.AnnData:
    """Sum in-tissue bins into pseudo-spots (module docstring for the geometry).

    ``bins``: in-tissue bins with counts and ``obsm["spatial"]`` (x, y) in full-res px;
    ``positions``: every bin (``in_tissue``, ``pxl_col_in_fullres``, ``pxl_row_in_fullres``),
    indexed by barcode. Returns pseudo-spots × genes with ``obs`` in_tissue, array_row,
    array_col, ``n_bins`` (in-tissue bins summed), ``n_bins_disc`` (all bins in the disc) and
    ``obsm["spatial"]`` = the disc centres.
    """
    pitch_um = default_pitch_um(diameter_um, pitch_um)
    if not (diameter_um > 0 and pitch_um >= diameter_um):
        raise ValueError(f"need 0 < diameter_um <= pitch_um, got {diameter_um} and {pitch_um}")
    pitch_px, radius_px = pitch_um / mpp, diameter_um / 2.0 / mpp
    xy_all = positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
    origin = xy_all.min(axis=0) - pitch_px  # a margin keeps every row and column index positive
    row, col, inside = hex_cells(xy_all, origin, pitch_px, radius_px)
    stride = int(col.max()) + 2
    spot_keys, spot_of = np.unique(row[inside] * stride + col[inside], return_inverse=True)
    n_disc = np.bincount(spot_of, minlength=len(spot_keys))
    n_tissue = np.bincount(spot_of, weights=positions["in_tissue"].to_numpy()[inside], minlength=len(spot_keys))
    kept = 2 * n_tissue > n_disc
    new_index = np.where(kept, np.cumsum(kept) - 1, -1)
    spot_of_bin = np.full(len(positions), -1, np.int64)
    spot_of_bin[inside] = new_index[spot_of]
    target = spot_of_bin[positions.index.get_indexer(bins.obs_names)]
    summed = target >= 0
    n_spots = int(kept.sum())
    membership = sp.csr_matrix(
        (np.ones(int(summed.sum()), np.float32), (target[summed], np.flatnonzero(summed))),
        shape=(n_spots, bins.n_obs),
    )
    counts = membership @ sp.csr_matrix(bins.X)
    spot_row, spot_col = spot_keys[kept] // stride, spot_keys[kept] % stride
    names = pd.Index([f"ps_{r:05d}_{c:05d}-1" for r, c in zip(spot_row, spot_col)])
    obs = pd.DataFrame(
        {
            "in_tissue": np.ones(n_spots, bool),
            "array_row": spot_row,
            "array_col": spot_col,
            "n_bins": np.bincount(target[summed], minlength=n_spots),
            "n_bins_disc": n_disc[kept],
        },
        index=names,
    )
    spots = ad.AnnData(X=sp.csr_matrix(counts, dtype=bins.X.dtype), obs=obs, var=bins.var.copy())
    spots.obsm["spatial"] = np.column_stack(
        [origin[0] + spot_col * pitch_px / 2.0, origin[1] + spot_row * pitch_px * math.sqrt(3.0) / 2.0]
    )
    return spots

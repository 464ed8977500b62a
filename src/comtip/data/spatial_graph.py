"""The spots' spatial graphs of one slide and Moran's I on them, from squidpy: one helper for
gene selection (``genes.method: svg``), query smoothing (``comtip.predict.baselines``) and the
evaluation's Moran's I (``comtip.evaluation.spatial``).

Two graphs, both on the spots' level-0 coordinates (``obsm["spatial"]``) of **one** slide:

* :func:`knn_graph` — squidpy's k-nearest-neighbour graph (``squidpy.gr.spatial_neighbors_knn``,
  the ``coord_type="generic"`` graph of ``spatial_neighbors``, which squidpy 1.8 deprecates in
  its favour). With ``k`` = 6 these are a Visium spot's six immediate neighbours, and the same
  ``k`` holds at any spacing or resolution (Visium HD bins, pseudo-spots), unlike a radius in px.
  Moran's I (:func:`morans_i`) is taken on it: row-standardised weights (squidpy's
  ``transformation=True``), the analytic formula (``n_perms=None``: deterministic), NaN for a
  gene constant over the slide's spots.
* :func:`radius_graph` — squidpy's radius graph (``squidpy.gr.spatial_neighbors_radius``, distance
  ≤ radius, the spot itself included) with the radius in units of the slide's spot pitch, the
  median distance from a spot to its nearest other spot (:func:`spot_pitch`, from squidpy's
  1-nearest-neighbour graph). With 1.5 pitches a Visium spot (hexagonal, pitch 100 µm) has its 6
  touching neighbours, a legacy ST spot (square, pitch 200 µm) its 8 (diagonals at √2 pitch), with
  no knowledge of the array. :func:`neighbour_mean` averages rows over it.

squidpy is imported inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import scipy.sparse as sp

log = logging.getLogger(__name__)

N_NEIGHBOURS = 6  # Moran's I graph: a Visium spot's immediate neighbours
RADIUS_PITCHES = 1.5  # neighbour mean: Visium's 6 touching neighbours, legacy ST's 8


def _coordinates(xy: np.ndarray, n_rows: int) -> np.ndarray:
    xy = np.asarray(xy, dtype=np.float64)
    if xy.shape != (n_rows, 2):
        raise ValueError(f"xy must be (N, 2) with N = {n_rows} rows: coordinates of shape {xy.shape}")
    if not np.isfinite(xy).all():
        raise ValueError("spot coordinates must be finite")
    return xy


def _squidpy():
    import squidpy as sq

    return sq


def knn_graph(values, xy: np.ndarray, n_neighbours: int = N_NEIGHBOURS):
    """An AnnData of ``values`` (N spots × G, dense or sparse) with squidpy's ``n_neighbours``-
    nearest-neighbour graph of the spots at ``xy`` in ``obsp["spatial_connectivities"]``."""
    import anndata as ad

    sq = _squidpy()
    n = values.shape[0]
    xy = _coordinates(xy, n)
    if n <= n_neighbours:
        raise ValueError(f"need more than {n_neighbours} spots for a {n_neighbours}-neighbour graph, got {n}")
    x = values.astype(np.float64) if sp.issparse(values) else np.asarray(values, dtype=np.float64)
    adata = ad.AnnData(X=x, obsm={"spatial": xy})
    adata.var_names = [f"g{i}" for i in range(adata.n_vars)]  # gene names need not be valid keys
    sq.gr.spatial_neighbors_knn(adata, n_neighs=n_neighbours)
    return adata


def graph_morans_i(adata, layer: str | None = None) -> np.ndarray:
    """Moran's I of each column of ``adata.X`` (or ``layer``) on its :func:`knn_graph`, in column order."""
    sq = _squidpy()
    with warnings.catch_warnings():
        # "N variables were constant, will return nan for these": the NaN is the documented answer
        warnings.filterwarnings("ignore", message=".*variables were constant", category=UserWarning)
        table = sq.gr.spatial_autocorr(
            adata,
            mode="moran",
            genes=list(adata.var_names),
            layer=layer,
            transformation=True,
            n_perms=None,
            corr_method=None,
            n_jobs=1,
            copy=True,
            show_progress_bar=False,
        )
    return table.loc[list(adata.var_names), "I"].to_numpy(dtype=np.float64)


def morans_i(values, xy: np.ndarray, *, n_neighbours: int = N_NEIGHBOURS) -> np.ndarray:
    """Moran's I of each column of ``values`` (N spots × G, dense or sparse) over the spots at ``xy``."""
    return graph_morans_i(knn_graph(values, xy, n_neighbours))


def spot_pitch(xy: np.ndarray) -> float:
    """The median distance from a spot to its nearest other spot (squidpy's 1-NN graph)."""
    import anndata as ad

    sq = _squidpy()
    xy = _coordinates(xy, len(xy))
    if len(xy) < 2:
        raise ValueError("a spot pitch needs at least 2 spots")
    graph = sq.gr.spatial_neighbors_knn(ad.AnnData(obsm={"spatial": xy}, shape=(len(xy), 0)), n_neighs=1, copy=True)
    nearest = np.asarray(graph.distances.max(axis=1).todense()).ravel()  # a coincident spot: 0
    pitch = float(np.median(nearest))
    if pitch == 0:
        raise ValueError("spot centres coincide: the median nearest-neighbour distance is 0")
    return pitch


def radius_graph(xy: np.ndarray, radius: float = RADIUS_PITCHES) -> sp.csr_matrix:
    """Binary (N, N) CSR: 1 where two spots' centres lie within ``radius`` × :func:`spot_pitch`
    (squidpy's radius graph), the diagonal included."""
    import anndata as ad

    sq = _squidpy()
    xy = _coordinates(xy, len(xy))
    if radius <= 0:
        raise ValueError(f"radius must be > 0, got {radius}")
    if len(xy) < 2:
        return sp.identity(len(xy), format="csr")
    pitch = spot_pitch(xy)
    graph = sq.gr.spatial_neighbors_radius(
        ad.AnnData(obsm={"spatial": xy}, shape=(len(xy), 0)), radius=radius * pitch, set_diag=True, copy=True
    )
    adjacency = sp.csr_matrix(graph.connectivities, dtype=np.float64)
    log.info(
        "radius graph: pitch %.4g, radius %.4g, %.2f neighbours per spot on average",
        pitch,
        radius * pitch,
        (adjacency.nnz - len(xy)) / len(xy),
    )
    return adjacency


def neighbour_mean(rows: np.ndarray, xy: np.ndarray, *, radius: float = RADIUS_PITCHES) -> np.ndarray:
    """Each row averaged with equal weights with the rows of the spots of its :func:`radius_graph`
    (itself included); a spot with no neighbour in range keeps its row. (N, D) float64."""
    rows = np.asarray(rows, dtype=np.float64)
    _coordinates(xy, len(rows))
    adjacency = radius_graph(xy, radius)
    return np.asarray(adjacency @ rows) / np.asarray(adjacency.sum(axis=1))

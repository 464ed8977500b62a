"""One sample as a SpatialData zarr (rule ``spatialdata``), readable by ``spatialdata.read_zarr``,
napari-spatialdata and spatialdata-plot.

Every element is placed in the coordinate system ``global`` = full-resolution (level-0) slide
pixels, the coordinates of ``obsm["spatial"]`` in ``spots.h5ad``:

- images ``he``: the H&E as a multiscale image made of the slide's own pyramid levels whose
  longest side is at most ``image_max_px`` (so level 0 of a large slide is never loaded); its
  finest level carries the scale to level-0 pixels (level-0 size / level size per axis, the
  factors of :meth:`comtip.io.slide.Slide.thumbnail`), the coarser ones their ratio to it. A slide
  with no level that small gets one level, its thumbnail at ``image_max_px``.
- labels ``tissue_mask``: ``tissue_mask.png`` (1 = tissue) with its scale to level-0 pixels.
- shapes ``spots`` (samples with Space Ranger output): one circle per spot of ``spots.h5ad``
  centred at ``obsm["spatial"]``, radius = spot diameter (µm) / µm/px / 2 in level-0 px; squares
  of that side for Visium HD bins. Shapes ``tiles`` (H&E-only slides): the tiles of
  ``virtual_visium.h5ad`` as squares of the tile size centred at the tile centres.
- tables ``table`` annotating those shapes (``region``, ``instance_id`` = barcode or tile name):
  ``var`` = the gene panel; for a measured sample X = raw counts of the panel genes,
  ``layers["log1p_cp10k"]`` the measured values on the prediction scale (gene_sentences.npz
  ``panel_values``) and ``layers[method]`` each evaluated method's predictions (test samples;
  NaN for a panel gene a method does not predict); for an H&E-only slide X =
  ``layers[method]`` = the virtual Visium prediction.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import anndata as ad
import dask
import dask.array as da
import geopandas as gpd
import numpy as np
import pandas as pd
import scipy.sparse as sp
import shapely
import spatialdata as sd
import xarray as xr
from spatialdata.models import Image2DModel, Labels2DModel, ShapesModel, TableModel
from spatialdata.transformations import Identity, Scale, set_transformation

# spatialdata's own reader recomputes the pixel coordinates of a multiscale image with it
from spatialdata.transformations._utils import compute_coordinates

from comtip._core.atomic import atomic_dir
from comtip._core.errors import PipelineInputError
from comtip.data.tiling import read_mask
from comtip.io.readers import open_slide
from comtip.predict.writers import SCALE

log = logging.getLogger(__name__)

DEFAULT_IMAGE_MAX_PX = 10000
COORDINATES = "global"
IMAGE, MASK, TABLE, SPOTS, TILES = "he", "tissue_mask", "table", "spots", "tiles"
REGION_KEY, INSTANCE_KEY = "region", "instance_id"
TRUTH_LAYER = "log1p_cp10k"
CHUNK_PX = 1024


def _scale(sx: float, sy: float) -> Scale | Identity:
    return Identity() if sx == 1 and sy == 1 else Scale([sy, sx], axes=("y", "x"))


def slide_levels(slide, max_px: int) -> tuple[list[np.ndarray], tuple[float, float]]:
    """The RGB (h, w, 3) levels of ``slide`` whose longest side is <= ``max_px``, finest first,
    and the (sx, sy) level-0 px per pixel of the finest; the thumbnail at ``max_px`` when no
    level is that small."""
    width, height = slide.dimensions
    chosen = [i for i, (w, h) in enumerate(slide.level_dimensions) if max(w, h) <= max_px]
    if not chosen:
        thumb, scale = slide.thumbnail(max(width, height) / max_px)
        return [thumb], scale
    levels = [slide.read_region(0, 0, *slide.level_dimensions[i], level=i) for i in chosen]
    w, h = slide.level_dimensions[chosen[0]]
    return levels, (width / w, height / h)


def image_element(levels: list[np.ndarray], scale: tuple[float, float]) -> xr.DataArray | xr.DataTree:
    """The H&E element: one (c, y, x) array per level, placed in level-0 px by ``scale``."""
    transform = {COORDINATES: _scale(*scale)}
    arrays = [
        xr.DataArray(
            da.from_array(np.moveaxis(level, -1, 0), chunks=(3, CHUNK_PX, CHUNK_PX)),
            dims=("c", "y", "x"),
            coords={"c": ["r", "g", "b"]},
        )
        for level in levels
    ]
    if len(arrays) == 1:
        return Image2DModel.parse(arrays[0], transformations=transform)
    tree = xr.DataTree.from_dict({f"scale{i}": xr.Dataset({"image": a}) for i, a in enumerate(arrays)})
    # the coarser levels get their ratio to the finest (from the shapes) composed with `transform`
    set_transformation(tree, transform, set_all=True)
    tree = compute_coordinates(tree)
    Image2DModel().validate(tree)
    return tree


def mask_element(mask_png: str | Path) -> xr.DataArray:
    mask, (sx, sy) = read_mask(mask_png)
    return Labels2DModel.parse(
        mask.astype(np.uint8), dims=("y", "x"), transformations={COORDINATES: _scale(sx, sy)}, chunks=CHUNK_PX
    )


def shapes_element(xy: np.ndarray, names: pd.Index, size: float, shape: str) -> gpd.GeoDataFrame:
    """Circles of diameter ``size`` or squares of side ``size`` centred at ``xy`` (level-0 px)."""
    index = pd.Index(names.astype(str), name=INSTANCE_KEY)
    transform = {COORDINATES: Identity()}
    if shape == "circle":
        return ShapesModel.parse(
            np.asarray(xy, np.float64),
            geometry=0,
            radius=np.full(len(xy), size / 2),
            index=index,
            transformations=transform,
        )
    half = size / 2
    boxes = shapely.box(xy[:, 0] - half, xy[:, 1] - half, xy[:, 0] + half, xy[:, 1] + half)
    return ShapesModel.parse(gpd.GeoDataFrame(geometry=boxes, index=index), transformations=transform)


def spot_diameter_px(uns: dict, *, sample: str, path: str | Path) -> float:
    """The spot's real diameter in level-0 px (µm / µm/px), checked against ingest's px value."""
    try:
        um, mpp = float(uns["spot_diameter_um"]), float(uns["mpp"])
    except KeyError as exc:
        raise PipelineInputError(f'uns["comtip"] lacks {exc}', sample=sample, path=path) from None
    if not (um > 0 and mpp > 0):
        raise PipelineInputError(f"spot diameter {um} µm at {mpp} µm/px is not positive", sample=sample, path=path)
    diameter = um / mpp
    px = float(uns.get("spot_diameter_px", diameter))
    if abs(px - diameter) > 0.01 * diameter:
        raise PipelineInputError(
            f"spot diameter {um} µm / {mpp} µm/px = {diameter:.4g} px, but spot_diameter_px is {px:.4g}",
            sample=sample,
            path=path,
        )
    return diameter


def _table(
    obs: pd.DataFrame, names: pd.Index, genes: list[str], x, layers: dict[str, np.ndarray], region: str, uns: dict
) -> ad.AnnData:
    obs = obs.copy()
    obs.index = pd.Index(names.astype(str))
    obs[REGION_KEY] = pd.Categorical([region] * len(obs))
    obs[INSTANCE_KEY] = obs.index.to_numpy()
    adata = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=pd.Index(genes, dtype=str)), layers=layers)
    adata.uns["comtip_spatialdata"] = uns
    return TableModel.parse(adata, region=region, region_key=REGION_KEY, instance_key=INSTANCE_KEY)


def _aligned(names: np.ndarray, expected: pd.Index, what: str, *, sample: str, path: str | Path) -> None:
    names = np.asarray(names, dtype=str)
    if len(names) != len(expected) or not np.array_equal(names, expected.to_numpy(dtype=str)):
        raise PipelineInputError(
            f"{what} ({len(names)} rows) are not the spots of spots.h5ad ({len(expected)}) in their order",
            sample=sample,
            path=path,
        )


def prediction_layer(
    path: str | Path, barcodes: pd.Index, genes: list[str], *, sample: str
) -> tuple[np.ndarray, str | None]:
    """A method's predictions as a (spots, panel genes) float32 array (NaN for genes it lacks)."""
    pred = ad.read_h5ad(path)
    _aligned(pred.obs_names, barcodes, "predicted spots", sample=sample, path=path)
    extra = sorted(set(pred.var_names) - set(genes))
    if extra:
        raise PipelineInputError(f"predicts genes outside the panel: {extra[:5]}", sample=sample, path=path)
    x = pred.X.toarray() if sp.issparse(pred.X) else np.asarray(pred.X)
    out = np.full((len(barcodes), len(genes)), np.nan, np.float32)
    out[:, pd.Index(genes).get_indexer(pred.var_names)] = x
    return out, pred.uns.get("comtip_prediction", {}).get("scale")


def measured_sample(
    sample: str,
    spots_h5ad: str | Path,
    sentences_npz: str | Path,
    predictions: Mapping[str, str | Path],
) -> tuple[gpd.GeoDataFrame, ad.AnnData, tuple[int, int]]:
    """Spots and table of a sample with Space Ranger output; the slide size ingest recorded."""
    spots = ad.read_h5ad(spots_h5ad)
    meta = dict(spots.uns.get("comtip", {}))
    if "spatial" not in spots.obsm:
        raise PipelineInputError('obsm["spatial"] is missing', sample=sample, path=spots_h5ad)
    diameter = spot_diameter_px(meta, sample=sample, path=spots_h5ad)
    shape = str(meta.get("spot_shape", "circle"))
    shapes = shapes_element(np.asarray(spots.obsm["spatial"], np.float64), spots.obs_names, diameter, shape)
    with np.load(sentences_npz) as z:
        genes = [str(g) for g in z["panel_genes"]]
        _aligned(z["barcodes"], spots.obs_names, "gene sentences", sample=sample, path=sentences_npz)
        layers = {TRUTH_LAYER: np.asarray(z["panel_values"], np.float32)}
    missing = [g for g in genes if g not in spots.var_names]
    if missing:
        raise PipelineInputError(f"panel genes missing from the counts: {missing[:5]}", sample=sample, path=spots_h5ad)
    counts = sp.csr_matrix(spots[:, genes].X, dtype=np.float32)
    for method, path in predictions.items():
        layers[method], scale = prediction_layer(path, spots.obs_names, genes, sample=sample)
        if scale not in (None, SCALE):
            raise PipelineInputError(f"predictions on scale {scale!r}, expected {SCALE!r}", sample=sample, path=path)
    uns = {
        "sample": sample,
        "X": "raw counts (spots.h5ad) of the panel genes",
        "layers": {TRUTH_LAYER: f"measured, {SCALE}", **{m: f"predicted by {m}, {SCALE}" for m in predictions}},
        "methods": list(predictions),
        "coordinates": "level-0 (full-resolution) slide pixels",
        "spot_diameter_px": diameter,
        "spot_shape": shape,
    }
    obs = spots.obs[[c for c in ("in_tissue", "array_row", "array_col", "total_counts") if c in spots.obs]]
    table = _table(obs, spots.obs_names, genes, counts, layers, SPOTS, uns)
    dims = meta.get("slide_dimensions")
    return shapes, table, None if dims is None else (int(dims[0]), int(dims[1]))


def slide_only_sample(sample: str, virtual_visium: str | Path) -> tuple[gpd.GeoDataFrame, ad.AnnData]:
    """Tiles and table of an H&E-only slide from its virtual Visium prediction."""
    pred = ad.read_h5ad(virtual_visium)
    info = dict(pred.uns.get("comtip_prediction", {}))
    if "tile_size_px" not in info or "spatial" not in pred.obsm:
        raise PipelineInputError(
            'lacks uns["comtip_prediction"]["tile_size_px"] or obsm["spatial"]', sample=sample, path=virtual_visium
        )
    method = str(info.get("method", "virtual_visium"))
    x = np.asarray(pred.X.toarray() if sp.issparse(pred.X) else pred.X, np.float32)
    tiles = shapes_element(
        np.asarray(pred.obsm["spatial"], np.float64), pred.obs_names, float(info["tile_size_px"]), "square"
    )
    uns = {
        "sample": sample,
        "X": f"predicted by {method}, {info.get('scale', SCALE)} (H&E-only slide: no counts)",
        "layers": {method: f"predicted by {method}, {info.get('scale', SCALE)}"},
        "methods": [method],
        "coordinates": "level-0 (full-resolution) slide pixels",
        "tile_size_px": float(info["tile_size_px"]),
    }
    obs = pred.obs[[c for c in ("row", "col", "tissue_fraction") if c in pred.obs]]
    return tiles, _table(obs, pred.obs_names, list(map(str, pred.var_names)), x, {method: x.copy()}, TILES, uns)


def write_spatialdata(
    out_zarr: str | Path,
    *,
    sample: str,
    slide_path: str | Path,
    tissue_mask: str | Path,
    spots_h5ad: str | Path | None = None,
    sentences_npz: str | Path | None = None,
    predictions: Mapping[str, str | Path] | None = None,
    virtual_visium: str | Path | None = None,
    image_max_px: int = DEFAULT_IMAGE_MAX_PX,
    threads: int = 2,
) -> sd.SpatialData:
    """Write ``out_zarr`` for one sample (see the module docstring for its elements).

    A measured sample passes ``spots_h5ad`` and ``sentences_npz`` (and, for a test sample, its
    ``predictions``: method → predictions h5ad); an H&E-only slide passes ``virtual_visium``.
    The store is written beside ``out_zarr`` (by ``threads`` dask threads) and renamed onto it
    only when complete.
    """
    if (spots_h5ad is None) == (virtual_visium is None):
        raise ValueError("pass either spots_h5ad (with sentences_npz) or virtual_visium")
    if spots_h5ad is not None:
        if sentences_npz is None:
            raise ValueError("a measured sample needs sentences_npz")
        shapes, table, dims = measured_sample(sample, spots_h5ad, sentences_npz, dict(predictions or {}))
        region = SPOTS
    else:
        (shapes, table), dims, region = slide_only_sample(sample, virtual_visium), None, TILES
    with open_slide(slide_path, sample=sample) as slide:
        if dims is not None and tuple(slide.dimensions) != dims:
            raise PipelineInputError(
                f"slide is {slide.dimensions[0]} x {slide.dimensions[1]} px, "
                f"spots.h5ad was ingested on {dims[0]} x {dims[1]}",
                sample=sample,
                path=slide_path,
            )
        levels, scale = slide_levels(slide, image_max_px)
    log.info(
        "[%s] image: %d level(s), finest %d x %d px (%.4g level-0 px per px); %d %s; table %d x %d, layers %s",
        sample,
        len(levels),
        levels[0].shape[1],
        levels[0].shape[0],
        scale[0],
        len(shapes),
        region,
        table.n_obs,
        table.n_vars,
        list(table.layers),
    )
    sdata = sd.SpatialData(
        images={IMAGE: image_element(levels, scale)},
        labels={MASK: mask_element(tissue_mask)},
        shapes={region: shapes},
        tables={TABLE: table},
    )
    with atomic_dir(out_zarr) as tmp, dask.config.set(scheduler="threads", num_workers=threads):
        sdata.write(tmp)
    return sdata

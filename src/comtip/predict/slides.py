"""Virtual Visium for an H&E-only slide: one observation per tissue tile of ``tiles.parquet``,
predicted from the patch centred on the tile, plus a PNG map (values on the scale of
:mod:`comtip.predict.writers`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from comtip._core.atomic import atomic_paths
from comtip._core.errors import PipelineInputError
from comtip.io.readers import open_slide
from comtip.io.slide import resolve_mpp
from comtip.predict.writers import SCALE, SCALE_DESCRIPTION, TILE_OBS, check_prediction

log = logging.getLogger(__name__)


def _tile_centres(tiles: pd.DataFrame) -> np.ndarray:
    return np.column_stack([tiles["x"] + tiles["size"] / 2, tiles["y"] + tiles["size"] / 2]).astype(np.float64)


def predict_slide(
    slide_path: str | Path,
    tiles_parquet: str | Path,
    out_h5ad: str | Path,
    out_png: str | Path,
    *,
    sample: str,
    predictor: Callable[[np.ndarray], np.ndarray],
    genes: Sequence[str],
    mpp: float | None,
    patch_size_px: int,
    patch_mpp: float,
    method: str,
    batch_size: int = 64,
    map_genes: Sequence[str] | None = None,
    thumbnail_max_px: int = 1200,
) -> ad.AnnData:
    """Virtual Visium: predict every tissue tile of an H&E-only slide; write an h5ad and a map.

    For each tile of ``tiles_parquet`` (from :func:`comtip.data.tiling.tile_slide`) the patch of
    ``patch_size_px`` px at ``patch_mpp`` µm/px centred on the tile centre is read — the
    geometry the model was trained on, whatever the tile size — and ``predictor`` (uint8
    (B, H, W, 3) → (B, G)) is run ``batch_size`` tiles at a time, so memory does not grow with
    the slide. Level-0 µm/px is ``mpp`` (sample sheet) or else the slide's metadata.

    The h5ad has one observation per tile (obs ``row``, ``col``, ``tissue_fraction``),
    ``obsm["spatial"]`` = tile centres in level-0 px, X = predictions, and ``uns["spatial"]``
    with a thumbnail as the "hires" image so that ``sc.pl.spatial`` draws it. The PNG shows
    ``map_genes`` (default: the first three genes) at the tile positions over the thumbnail.
    """
    tiles = pd.read_parquet(tiles_parquet)
    missing = [c for c in ("x", "y", "size", *TILE_OBS) if c not in tiles]
    if missing:
        raise PipelineInputError(f"tiles table lacks columns {missing}", sample=sample, path=tiles_parquet)
    if tiles.empty:
        raise PipelineInputError("no tissue tile to predict", sample=sample, path=tiles_parquet)
    genes = [str(g) for g in genes]
    map_genes = list(genes[:3] if map_genes is None else map_genes)
    unknown = [g for g in map_genes if g not in genes]
    if unknown:
        raise ValueError(f"map_genes {unknown} are not predicted genes")
    centres = _tile_centres(tiles)
    with open_slide(slide_path, sample=sample) as slide:
        level0_mpp, mpp_source = resolve_mpp(
            sheet_mpp=mpp,
            slide_mpp=slide.metadata_mpp,
            spot_diameter_px=None,
            spot_diameter_um=None,
            sample=sample,
            path=slide_path,
        )
        side = patch_size_px * patch_mpp / level0_mpp
        parts = []
        for start in range(0, len(tiles), batch_size):
            batch = np.stack(
                [
                    slide.read_region_scaled(x - side / 2, y - side / 2, side, side, patch_size_px, patch_size_px)
                    for x, y in centres[start : start + batch_size]
                ]
            )
            parts.append(np.asarray(predictor(batch), dtype=np.float32))
        thumb, (sx, sy) = slide.thumbnail(max(1.0, max(slide.dimensions) / thumbnail_max_px))
    pred = check_prediction(np.concatenate(parts), genes)
    log.info(
        "[%s] predicted %d genes on %d tiles (patches of %d px at %.3g µm/px, level-0 %.4g µm/px from %s)",
        sample,
        len(genes),
        len(tiles),
        patch_size_px,
        patch_mpp,
        level0_mpp,
        mpp_source,
    )

    tile_size = float(tiles["size"].median())
    obs = tiles[list(TILE_OBS)].reset_index(drop=True)
    obs.index = [f"tile_{r}_{c}" for r, c in zip(obs["row"], obs["col"])]
    adata = ad.AnnData(X=pred, obs=obs, var=pd.DataFrame(index=pd.Index(genes, dtype=str)))
    adata.obsm["spatial"] = centres
    adata.uns["spatial"] = {
        sample: {
            "images": {"hires": thumb},
            "scalefactors": {"tissue_hires_scalef": 2.0 / (sx + sy), "spot_diameter_fullres": tile_size},
            "metadata": {"source": str(Path(slide_path).absolute())},
        }
    }
    adata.uns["comtip_prediction"] = {
        "method": method,
        "scale": SCALE,
        "scale_description": SCALE_DESCRIPTION,
        "sample": sample,
        "slide_path": str(Path(slide_path).absolute()),
        "mpp": level0_mpp,
        "mpp_source": mpp_source,
        "tile_size_px": tile_size,
        "patch_size_px": int(patch_size_px),
        "patch_mpp": float(patch_mpp),
    }
    figure = spatial_map(thumb, (sx, sy), tiles, pred[:, [genes.index(g) for g in map_genes]], map_genes, sample)
    with atomic_paths(out_h5ad, out_png) as (tmp_h5ad, tmp_png):
        adata.write_h5ad(tmp_h5ad)
        figure.savefig(tmp_png, format="png", dpi=100)
    return adata


def spatial_map(
    thumb: np.ndarray,
    scale: tuple[float, float],
    tiles: pd.DataFrame,
    values: np.ndarray,
    names: Sequence[str],
    title: str,
) -> Figure:
    """One panel per gene: the tiles coloured by predicted value over the slide thumbnail.

    Drawn on a Figure with its own Agg canvas, not through pyplot: no display is needed (cluster
    nodes) and the caller's pyplot backend and open figures are left alone.

    Tiles are drawn as an image on the tile grid (``row``, ``col``; no-tissue cells transparent),
    placed with the tiles' level-0 positions, so each tile covers exactly its footprint.
    """
    size = float(tiles["size"].median())
    rows, cols = tiles["row"].to_numpy(int), tiles["col"].to_numpy(int)
    r0, c0 = rows.min(), cols.min()
    left = float(np.median(tiles["x"] - (cols - c0) * size))
    top = float(np.median(tiles["y"] - (rows - r0) * size))
    n_rows, n_cols = rows.max() - r0 + 1, cols.max() - c0 + 1
    extent = (left / scale[0], (left + n_cols * size) / scale[0], (top + n_rows * size) / scale[1], top / scale[1])
    aspect = thumb.shape[0] / thumb.shape[1]
    figure = Figure(figsize=(4.5 * len(names), 4.5 * aspect + 0.6))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(names), squeeze=False)
    for k, (ax, name) in enumerate(zip(axes[0], names)):
        grid = np.full((n_rows, n_cols), np.nan)
        grid[rows - r0, cols - c0] = values[:, k]
        ax.imshow(thumb)
        shown = ax.imshow(
            np.ma.masked_invalid(grid), extent=extent, cmap="viridis", alpha=0.75, interpolation="nearest"
        )
        ax.set_xlim(0, thumb.shape[1])
        ax.set_ylim(thumb.shape[0], 0)
        ax.set_title(name)
        ax.set_axis_off()
        figure.colorbar(shown, ax=ax, fraction=0.046, pad=0.02, label=f"predicted {SCALE}")
    figure.suptitle(f"{title}: predicted expression")
    return figure

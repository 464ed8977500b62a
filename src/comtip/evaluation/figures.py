"""The report's figures (rule ``evaluation_figures``): bar chart, spatial maps, training curves.

Every figure's title says which slides and genes it shows; genes for the maps are chosen from
training statistics (top highly expressed genes of the panel), never by test performance.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from pathlib import Path

import anndata as ad
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.collections import EllipseCollection, PolyCollection  # noqa: E402

from comtip._core.atomic import atomic_path  # noqa: E402
from comtip.data.genes import read_panel  # noqa: E402
from comtip.io.readers import open_slide  # noqa: E402


def summary_bar_chart(summary_tsv: str | Path, out_png: str | Path, slides: Sequence[str]) -> None:
    """Mean Pearson per method, one group of bars per gene set, error bars = std over slides."""
    summary = pd.read_csv(summary_tsv, sep="\t")
    sets = list(dict.fromkeys(summary["gene_set"]))
    methods = list(dict.fromkeys(summary["method"]))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(methods) * len(sets) / 2), 4))
    width = 0.8 / len(methods)
    for k, method in enumerate(methods):
        rows = summary[summary["method"] == method].set_index("gene_set").reindex(sets)
        ax.bar(
            np.arange(len(sets)) + k * width,
            rows["pearson_mean"],
            width,
            yerr=rows["pearson_std_slides"].fillna(0),
            label=method,
            capsize=2,
        )
    ax.set_xticks(np.arange(len(sets)) + width * (len(methods) - 1) / 2, sets)
    ax.set_ylabel("mean Pearson r (per gene, averaged)")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_title(f"Test slides: {', '.join(slides)}", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def headline_table(summary_tsv: str | Path, out_tsv: str | Path) -> pd.DataFrame:
    """The report's landing-page table: one row per method, its mean Pearson per gene set (columns
    in summary.tsv's order) and its MSE over all panel genes, 3 decimals; ``n/a`` where undefined
    (the constant ``mean`` baseline has no correlation)."""
    summary = pd.read_csv(summary_tsv, sep="\t")
    methods = list(dict.fromkeys(summary["method"]))
    sets = list(dict.fromkeys(summary["gene_set"]))
    table = summary.pivot(index="method", columns="gene_set", values="pearson_mean")
    table = table.reindex(index=methods, columns=sets)
    table.columns = [f"Pearson {s}" for s in sets]
    mse = summary[summary["gene_set"] == "all"].set_index("method")["mse_mean"] if "all" in sets else None
    if mse is not None:
        table["MSE all"] = mse.reindex(methods)
    out = table.map(lambda v: "n/a" if pd.isna(v) else f"{v:.3f}").rename_axis("method").reset_index()
    with atomic_path(out_tsv) as tmp:
        out.to_csv(tmp, sep="\t", index=False)
    return out


def genes_to_map(panel_tsv: str | Path, n: int) -> list[str]:
    """The ``n`` most expressed panel genes on the training slides (held-out genes excluded)."""
    panel = read_panel(panel_tsv)
    return list(panel[~panel["heldout"]].sort_values("mean_rank")["gene"].head(n))


def he_background(slide_path: str | Path, xy: np.ndarray, margin: float, max_px: int = 1200):
    """The H&E around the spots: the slide's box holding them (+ ``margin`` level-0 px) read at
    most ``max_px`` on its longest side, and that box's ``imshow`` extent in level-0 px (left,
    right, bottom, top: y grows downwards, as in the slide)."""
    with open_slide(slide_path) as slide:
        width, height = slide.dimensions
        x0, y0 = max(0.0, xy[:, 0].min() - margin), max(0.0, xy[:, 1].min() - margin)
        x1, y1 = min(float(width), xy[:, 0].max() + margin), min(float(height), xy[:, 1].max() + margin)
        scale = max(1.0, max(x1 - x0, y1 - y0) / max_px)
        out_w, out_h = max(1, round((x1 - x0) / scale)), max(1, round((y1 - y0) / scale))
        image = slide.read_region_scaled(x0, y0, x1 - x0, y1 - y0, out_w, out_h)
    return image, (x0, x1, y1, y0)


def spatial_maps(
    sample: str,
    truth_npz: str | Path,
    spots_h5ad: str | Path,
    predictions: Mapping[str, str | Path],
    genes: Sequence[str],
    out_png: str | Path,
    slide_path: str | Path,
) -> None:
    """Truth and every method's prediction for ``genes``, drawn as the spots (their real size and
    shape) over the slide's H&E, one row per gene, one column per method."""
    spots = ad.read_h5ad(spots_h5ad, backed="r")
    xy = np.asarray(spots.obsm["spatial"], dtype=float)
    unit = dict(spots.uns.get("comtip", {}))
    spots.file.close()
    diameter = float(unit.get("spot_diameter_px", 0.0)) or 0.5 * float(unit.get("spot_pitch_px", 100.0))
    square = unit.get("spot_shape") == "square"
    image, extent = he_background(slide_path, xy, margin=2 * diameter)
    truth = np.load(truth_npz)
    panel = list(truth["panel_genes"])
    columns = {"truth": truth["panel_values"]}
    for method, path in predictions.items():
        columns[method] = np.asarray(ad.read_h5ad(path).X)
    aspect = (extent[2] - extent[3]) / max(extent[1] - extent[0], 1.0)
    side = 2.4
    size = (max(5.0, side * len(columns)), side * aspect * len(genes) + 0.8)
    fig, axes = plt.subplots(len(genes), len(columns), figsize=size, squeeze=False)
    for r, gene in enumerate(genes):
        j = panel.index(gene)
        # one colour scale per gene (the truth's 1st-99th percentile), so methods compare by eye
        low, high = np.percentile(columns["truth"][:, j], [1, 99])
        for c, (name, values) in enumerate(columns.items()):
            ax = axes[r, c]
            ax.imshow(image, extent=extent, interpolation="bilinear")
            dots = (
                EllipseCollection(
                    diameter,
                    diameter,
                    0.0,
                    units="xy",
                    offsets=xy,
                    offset_transform=ax.transData,
                    cmap="viridis",
                    linewidths=0,
                    alpha=0.85,
                )
                if not square
                else _squares(xy, diameter)
            )
            dots.set_array(np.asarray(values[:, j], dtype=float))
            dots.set_clim(low, max(high, low + 1e-6))
            ax.add_collection(dots)
            ax.set_xlim(extent[0], extent[1])
            ax.set_ylim(extent[2], extent[3])
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=8)
            if c == 0:
                ax.set_ylabel(gene, fontsize=8)
    fig.suptitle(
        f"{sample}: truth vs predictions over the H&E (log1p CP10k), top expressed training genes\n"
        "colour scale per gene = truth's 1st-99th percentile",
        fontsize=9,
    )
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def landing_maps_html(map_pngs: Sequence[str | Path], out_html: str | Path) -> None:
    """The maps of the report's first page as an HTML fragment, each PNG inlined as a data URI
    (``workflow/report/workflow.rst`` includes it). Snakemake's ``embeddedimage`` directive
    would link the file instead (9.27.1 sets the data URI after building the image node), so
    a report moved away from ``results/`` would lose its maps."""
    parts = []
    for png in map_pngs:
        data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
        name = html.escape(str(png))
        parts.append(
            f'<figure class="comtip-map"><img alt="{name}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(Path(png).stem)}</figcaption></figure>"
        )
    with atomic_path(out_html) as tmp:
        Path(tmp).write_text("\n".join(parts) + "\n", encoding="utf-8")


def _squares(xy: np.ndarray, side: float) -> PolyCollection:
    """Visium HD bins: squares of ``side`` level-0 px centred on ``xy``."""
    h = side / 2
    corners = np.array([[-h, -h], [h, -h], [h, h], [-h, h]])
    return PolyCollection(xy[:, None, :] + corners[None], cmap="viridis", linewidths=0, alpha=0.85)


def training_curves(
    pretrain_metrics: str | Path, finetune_metrics: Mapping[str, str | Path], out_png: str | Path
) -> None:
    """Pretraining loss terms per step, fine-tuning train/val loss per epoch and, when the run had
    validation slides, pretraining's held-out alignment (InfoNCE and median rank against chance)."""
    pre = pd.read_csv(pretrain_metrics, sep="\t")
    val = pre.dropna(subset=["val_infonce"]) if "val_infonce" in pre else pre.iloc[:0]
    fig, axes = plt.subplots(1, 3 if len(val) else 2, figsize=(15 if len(val) else 10, 3.5))
    for column in ("loss", "loss_infonce", "loss_mfm", "loss_paat", "loss_value"):
        if column in pre and pre[column].abs().sum() > 0:
            axes[0].plot(pre["step"], pre[column], label=column)
    axes[0].set_xlabel("optimiser step")
    axes[0].set_title("Pretraining (training slides)", fontsize=9)
    axes[0].legend(fontsize=7)
    for mode, path in finetune_metrics.items():
        table = pd.read_csv(path, sep="\t")
        axes[1].plot(table["epoch"], table["train_loss"], label=f"{mode} train")
        if table["val_loss"].notna().any():
            axes[1].plot(table["epoch"], table["val_loss"], linestyle="--", label=f"{mode} val")
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("MSE")
    axes[1].set_title("Fine-tuning (train / validation slides)", fontsize=9)
    axes[1].legend(fontsize=7)
    if len(val):
        axes[2].plot(val["step"], val["val_infonce"] / val["val_chance_infonce"], marker="o", label="InfoNCE / ln N")
        axes[2].plot(
            val["step"],
            val["val_median_rank"] / val["val_chance_median_rank"],
            marker="s",
            label="median rank / chance",
        )
        axes[2].axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
        axes[2].set_xlabel("optimiser step")
        axes[2].set_ylabel("fraction of chance (1 = chance)")
        axes[2].set_title(
            f"Pretraining alignment on validation slides (N = {int(2 * val['val_chance_median_rank'].iloc[-1] + 1)})",
            fontsize=9,
        )
        axes[2].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)

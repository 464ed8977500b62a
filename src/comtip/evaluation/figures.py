"""The report's figures (rule ``evaluation_figures``): bar chart, spatial maps, training curves.

Every figure's title says which slides and genes it shows; genes for the maps are chosen from
training statistics (top highly expressed genes of the panel), never by test performance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import anndata as ad
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from comtip._core.atomic import atomic_path  # noqa: E402
from comtip.data.genes import read_panel  # noqa: E402


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


def genes_to_map(panel_tsv: str | Path, n: int) -> list[str]:
    """The ``n`` most expressed panel genes on the training slides (held-out genes excluded)."""
    panel = read_panel(panel_tsv)
    return list(panel[~panel["heldout"]].sort_values("mean_rank")["gene"].head(n))


def spatial_maps(
    sample: str,
    truth_npz: str | Path,
    spots_h5ad: str | Path,
    predictions: Mapping[str, str | Path],
    genes: Sequence[str],
    out_png: str | Path,
) -> None:
    """Truth and every method's prediction for ``genes`` at the spot positions of one slide."""
    spots = ad.read_h5ad(spots_h5ad, backed="r")
    xy = np.asarray(spots.obsm["spatial"])
    truth = np.load(truth_npz)
    panel = list(truth["panel_genes"])
    columns = {"truth": truth["panel_values"]}
    for method, path in predictions.items():
        columns[method] = np.asarray(ad.read_h5ad(path).X)
    fig, axes = plt.subplots(len(genes), len(columns), figsize=(2.2 * len(columns), 2.2 * len(genes)), squeeze=False)
    size = max(2.0, 6000.0 / max(len(xy), 1))
    for r, gene in enumerate(genes):
        j = panel.index(gene)
        # one colour scale per gene (the truth's 1st-99th percentile), so methods compare by eye
        low, high = np.percentile(columns["truth"][:, j], [1, 99])
        for c, (name, values) in enumerate(columns.items()):
            ax = axes[r, c]
            ax.scatter(
                xy[:, 0],
                xy[:, 1],
                c=values[:, j],
                s=size,
                cmap="viridis",
                linewidths=0,
                vmin=low,
                vmax=max(high, low + 1e-6),
            )
            ax.set_aspect("equal")
            ax.invert_yaxis()
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=8)
            if c == 0:
                ax.set_ylabel(gene, fontsize=8)
    fig.suptitle(
        f"{sample}: truth vs predictions (log1p CP10k), top expressed training genes; "
        "colour scale per gene = truth's 1st-99th percentile",
        fontsize=9,
    )
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


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

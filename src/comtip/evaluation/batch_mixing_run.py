"""Rule ``batch_mixing``'s table and figure: the scores of :mod:`comtip.evaluation.batch_mixing`
for the expression and every encoder's image embeddings, on the same subsampled spots."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from comtip._core.atomic import atomic_path
from comtip._core.errors import PipelineInputError
from comtip.evaluation.batch_mixing import (
    COLUMNS,
    EMBEDDING_KEY,
    EXPRESSION,
    WARN_BELOW,
    mixing_scores,
    neighbourhoods,
    pca,
    subsample_rows,
)

log = logging.getLogger(__name__)


def _read_expression(sentences: Mapping[str, str | Path]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Sample → (barcodes, panel values); the values are already log1p of counts per 10,000."""
    out = {}
    for sample, path in sentences.items():
        with np.load(path) as npz:
            out[sample] = (np.asarray(npz["barcodes"], dtype=str), np.asarray(npz["panel_values"], dtype=np.float64))
    return out


def _read_embedding(path: str | Path, sample: str, barcodes: np.ndarray, rows: np.ndarray) -> np.ndarray:
    with np.load(path) as npz:
        if not np.array_equal(np.asarray(npz["barcodes"], dtype=str), barcodes):
            raise PipelineInputError(
                "embedding rows are not the sample's spots in gene_sentences.npz order", sample=sample, path=path
            )
        return np.asarray(npz[EMBEDDING_KEY][rows], dtype=np.float64)


def mixing_table(
    representations: Mapping[str, np.ndarray],
    labels: Mapping[str, np.ndarray],
    *,
    perplexity: float,
    kernel: str,
    silhouette_spots: int,
    seed: int,
) -> pd.DataFrame:
    """One row per representation × label (columns :data:`COLUMNS`); the neighbourhoods are
    computed once per representation. ``ilisi_norm_vs_expression`` = the row's ``ilisi_norm``
    minus the expression's for the same label (0 for the expression, NaN without it)."""
    rows = []
    for name, x in representations.items():
        neighbours = neighbourhoods(x, perplexity, kernel)
        for label, values in labels.items():
            scores = mixing_scores(
                x,
                values,
                perplexity=perplexity,
                kernel=kernel,
                silhouette_spots=silhouette_spots,
                seed=seed,
                neighbours=neighbours,
            )
            rows.append({"representation": name, "label": label, **scores})
    table = pd.DataFrame(rows)
    reference = table[table["representation"] == EXPRESSION].set_index("label")["ilisi_norm"]
    table["ilisi_norm_vs_expression"] = table["ilisi_norm"] - table["label"].map(reference)
    return table[list(COLUMNS)]


def mixing_figure(table: pd.DataFrame, out_png: str | Path, title: str) -> None:
    """ilisi_norm, kBET acceptance and silhouette per representation, one bar group per label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(table["label"]))
    names = list(dict.fromkeys(table["representation"]))
    panels = (
        ("ilisi_norm", "iLISI, normalised (1 = mixed)"),
        ("kbet_acceptance", "kBET acceptance (1 = mixed)"),
        ("silhouette", "slide silhouette (≤ 0 = mixed)"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(4 + 1.2 * len(names) * len(labels), 3.6))
    width = 0.8 / len(names)
    for ax, (column, ylabel) in zip(axes, panels, strict=True):
        for k, name in enumerate(names):
            values = table[table["representation"] == name].set_index("label").reindex(labels)[column]
            ax.bar(np.arange(len(labels)) + k * width, values.fillna(0), width, label=name)
        ax.set_xticks(np.arange(len(labels)) + width * (len(names) - 1) / 2, labels)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.axhline(0, color="black", linewidth=0.5)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def mixing_run(
    sentences: Mapping[str, str | Path],
    embeddings: Mapping[str, Mapping[str, str | Path]],
    labels: Mapping[str, Mapping[str, str]],
    out_tsv: str | Path,
    out_png: str | Path,
    *,
    spots_per_slide: int = 500,
    perplexity: float = 30,
    kernel: str = "gaussian",
    pca_dim: int = 50,
    silhouette_spots: int = 5000,
    seed: int = 0,
) -> pd.DataFrame:
    """The batch-mixing table and figure of the samples of ``sentences`` (sample →
    gene_sentences.npz) for the expression and each encoder of ``embeddings`` (encoder → sample →
    embeddings npz), with ``labels`` (label → sample → value, :func:`sample_labels`).

    At most ``spots_per_slide`` spots per slide (:func:`subsample_rows`), the same spots for
    every representation. The expression is its ``panel_values`` (log1p of counts per 10,000),
    reduced to ``pca_dim`` principal components; an encoder is its ``image_embeddings`` as
    written (what the retrieval methods compare). Logs a WARNING for every encoder and label with
    ``ilisi_norm_vs_expression`` below −0.1 (it separates slides more than the expression does).
    """
    samples = list(sentences)
    expression = _read_expression(sentences)
    chosen = subsample_rows({s: len(expression[s][0]) for s in samples}, seed, spots_per_slide)
    representations = {EXPRESSION: pca(np.concatenate([expression[s][1][chosen[s]] for s in samples]), pca_dim)}
    for encoder, files in embeddings.items():
        representations[encoder] = np.concatenate(
            [_read_embedding(files[s], s, expression[s][0], chosen[s]) for s in samples]
        )
    per_spot = {
        label: np.concatenate([[values[s]] * len(chosen[s]) for s in samples]) for label, values in labels.items()
    }
    table = mixing_table(
        representations, per_spot, perplexity=perplexity, kernel=kernel, silhouette_spots=silhouette_spots, seed=seed
    )
    for row in table[table["ilisi_norm_vs_expression"] < WARN_BELOW].itertuples():
        log.warning(
            "encoder %s separates slides (label %s) more than the expression does: ilisi_norm %.3f, %.3f "
            "below the expression's; its predictions may not transfer to new slides",
            row.representation,
            row.label,
            row.ilisi_norm,
            -row.ilisi_norm_vs_expression,
        )
    with atomic_path(out_tsv) as tmp:
        table.to_csv(tmp, sep="\t", index=False, float_format="%.6g")
    n_spots = sum(len(r) for r in chosen.values())
    mixing_figure(table, out_png, f"Batch mixing of {len(samples)} slides ({n_spots} spots): {', '.join(samples)}")
    log.info("batch mixing of %d slides, %d spots, %d representations", len(samples), n_spots, len(representations))
    return table

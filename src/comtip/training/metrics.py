"""``metrics.tsv`` rows and the progress line of the log.

Rows are appended to a live file in the resume folder as training goes (the declared
``metrics.tsv`` is only written, complete, at the end). On resume, rows after the resumed step
are dropped and written again by the resumed run, so the final table equals that of an
uninterrupted run except in the timing columns.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass
class Window:
    """Timing of the steps since the last metrics row."""

    start: float
    steps: int = 0
    wait: float = 0.0


LOSS_COLUMNS = (
    "loss",
    "loss_infonce",
    "loss_mfm",
    "loss_paat",
    "loss_value",
    "loss_entail_cross",
    "loss_entail_intra",
    "logit_scale",
)
# held-out alignment (comtip.training.retrieval.heldout_alignment): at the end of every epoch
# when there are validation slides, empty (NaN) in the other rows
VAL_COLUMNS = ("val_infonce", "val_chance_infonce", "val_median_rank", "val_chance_median_rank")
COLUMNS = ("step", "epoch", *LOSS_COLUMNS, "lr", "samples_per_s", "data_wait_fraction", *VAL_COLUMNS)
TIMING_COLUMNS = ("samples_per_s", "data_wait_fraction")


class MetricsLog:
    """Append-only TSV of training metrics that can be cut back to a resumed step; ``columns``
    (``step`` first) are CoMTIP's unless given (BLEEP's run has its own, ``comtip.baselines``)."""

    def __init__(self, path: Path, resume_step: int, columns: tuple[str, ...] = COLUMNS):
        self.path, self.columns = path, columns
        kept = []
        if path.exists() and resume_step > 0:
            lines = path.read_text().splitlines()
            if lines and lines[0] == "\t".join(columns):
                kept = [line for line in lines[1:] if line and int(line.split("\t", 1)[0]) <= resume_step]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(["\t".join(columns), *kept]) + "\n")

    def append(self, row: dict[str, float]) -> None:
        values = [str(int(row["step"]))] + [f"{row.get(c, float('nan')):.8g}" for c in self.columns[1:]]
        with open(self.path, "a") as fh:
            fh.write("\t".join(values) + "\n")


def progress_line(row: dict[str, float], total_steps: int, seconds_per_step: float) -> str:
    eta = datetime.timedelta(seconds=round(seconds_per_step * (total_steps - row["step"])))
    return (
        f"step {int(row['step'])}/{total_steps} (epoch {row['epoch']:.2f}) loss {row['loss']:.4f} "
        f"(infonce {row['loss_infonce']:.4f}, mfm {row['loss_mfm']:.4f}, paat {row['loss_paat']:.4f}, "
        f"value {row['loss_value']:.4f}) "
        f"lr {row['lr']:.3g} {row['samples_per_s']:.1f} samples/s "
        f"data wait {100 * row['data_wait_fraction']:.0f}% ETA {eta}"
        + (
            f"; validation slides: infonce {row['val_infonce']:.4f} (chance {row['val_chance_infonce']:.4f}), "
            f"median rank {row['val_median_rank']:.0f} (chance {row['val_chance_median_rank']:.0f})"
            if "val_infonce" in row
            else ""
        )
    )

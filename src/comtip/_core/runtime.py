"""What every rule script needs: logging into the rule's log file, errors recorded there too."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

PIPELINE_DIR_VARIABLE = "COMTIP_PIPELINE_DIR"


def export_pipeline_dir(path: str | Path) -> None:
    """Tell the jobs, and the conda envs' post-deploy scripts (``envs/*.post-deploy.sh``, which
    install the package into a new env), which checkout this workflow runs from."""
    os.environ[PIPELINE_DIR_VARIABLE] = str(Path(path).resolve())


def prepend_pythonpath(path: str | Path) -> None:
    """Put ``path`` first on PYTHONPATH, for the jobs Snakemake starts from this process."""
    parts = [str(path)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(path)]
    os.environ["PYTHONPATH"] = os.pathsep.join(parts)


@contextlib.contextmanager
def rule_logging(log_path: str | Path | None) -> Iterator[logging.Logger]:
    """Send ``comtip`` log records and third-party warnings (``warnings.warn`` of anndata, scanpy,
    torch ..., through :func:`logging.captureWarnings`) to the rule's log file (and stderr); log
    any exception.

    The exception is re-raised so that Snakemake marks the job failed and removes its outputs.
    """
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w"))
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    loggers = [logging.getLogger("comtip"), logging.getLogger("py.warnings")]
    loggers[0].setLevel(logging.INFO)
    for handler in handlers:
        handler.setFormatter(fmt)
        for logger in loggers:
            logger.addHandler(handler)
    logging.captureWarnings(True)
    try:
        yield loggers[0]
    except Exception:
        loggers[0].exception("failed")
        raise
    finally:
        logging.captureWarnings(False)
        for handler in handlers:
            for logger in loggers:
                logger.removeHandler(handler)
            handler.close()

"""Start a training run with one process per GPU: under ``torchrun`` when more than one is asked for.

The Snakemake rule asks for ``resources: gpu=N``; with N > 1 this module re-runs itself under
``torch.distributed.run --standalone --nproc-per-node N`` (one node), each process calling the
run's function (:func:`comtip.training.pretrain`, or another named ``"module:function"``, e.g.
BLEEP's ``comtip.baselines.bleep_train:train_bleep``), which takes its rank from the environment
torchrun sets. With N = 1 it calls the function directly, in this process. The function and its
arguments travel as a JSON file.
"""

from __future__ import annotations

import importlib
import json
import logging
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

PRETRAIN = "comtip.training.loop:pretrain"


def _function(target: str) -> Callable[..., object]:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def run_pretrain(kwargs: Mapping, processes: int, log_path: str | Path | None = None) -> None:
    """``pretrain(**kwargs)`` with ``processes`` processes (1 = in this process)."""
    run_processes(PRETRAIN, kwargs, processes, log_path)


def run_processes(target: str, kwargs: Mapping, processes: int, log_path: str | Path | None = None) -> None:
    """``target(**kwargs)`` (``"module:function"``) with ``processes`` processes (1 = in this process).

    The worker processes' output is appended to ``log_path`` (the rule's log) when given; a
    failing worker fails this call with torchrun's exit code.
    """
    if processes <= 1:
        _function(target)(**kwargs)
        return
    plain = {
        k: ([str(p) for p in v] if isinstance(v, list | tuple) else (str(v) if isinstance(v, Path) else v))
        for k, v in kwargs.items()
    }
    with tempfile.TemporaryDirectory(prefix="comtip-launch-") as tmp:
        args = Path(tmp) / "run_args.json"
        args.write_text(json.dumps({"target": target, "kwargs": plain}))
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={processes}",
            "-m",
            "comtip.training.launch",
            str(args),
        ]
        log.info("launching %d processes: %s", processes, " ".join(command))
        output = open(log_path, "a") if log_path else None  # noqa: SIM115 (closed below)
        try:
            result = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT if output else None, check=False)
        finally:
            if output:
                output.close()
    if result.returncode != 0:
        raise RuntimeError(f"torchrun with {processes} processes failed (exit {result.returncode}); see the log")


def main(argv: Sequence[str] | None = None) -> int:
    """Worker entry point: ``python -m comtip.training.launch ARGS.json`` (started by torchrun)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run = json.loads(Path(argv[0]).read_text())
    _function(run["target"])(**run["kwargs"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

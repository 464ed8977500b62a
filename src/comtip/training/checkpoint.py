"""Resume checkpoints (periodic, undeclared) and the final pretrained checkpoint (declared output).

The resume folder sits next to the declared checkpoint (``{model}.resume/``): Snakemake deletes
the declared outputs of a killed job but leaves this folder, so a rerun continues where the
killed one stopped. It is only reused when it was written by the same run definition (model and
pretraining options, number of processes, data fingerprint); anything else is refused rather
than silently mixed.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from comtip._core.atomic import atomic_path
from comtip.model import CoMTIP, ModelConfig
from comtip.training.config import RUN_ONLY_KEYS, TrainConfig

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
RESUME_FILE = "last.pt"


def resume_dir(checkpoint: str | Path) -> Path:
    """``results/models/pretrain/comtip.pt`` -> ``results/models/pretrain/comtip.resume/``."""
    return Path(checkpoint).with_suffix(".resume")


def plain(value: Any) -> Any:
    """JSON-shaped copy (tuples -> lists, numpy scalars -> Python) so that saved and fresh
    configs compare equal and the checkpoint loads with ``weights_only=True``."""
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


def run_definition(
    model_config: dict, train_config: dict, fingerprint: dict, *, world_size: int, device_type: str
) -> dict:
    """What a resume checkpoint must match: everything that changes the computed result (the
    number of processes changes the batches, the device type the numerics)."""
    pretrain = {k: v for k, v in train_config.items() if k not in RUN_ONLY_KEYS}
    return plain(
        {
            "model": model_config,
            "pretrain": pretrain,
            "data": fingerprint,
            "processes": {"world_size": world_size, "device": device_type},
        }
    )


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(key, "<absent>"), new.get(key, "<absent>"), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def load_resume(folder: Path, definition: dict) -> dict | None:
    """The resume state in ``folder`` if there is one; a ValueError if it belongs to another run."""
    path = folder / RESUME_FILE
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    changed = _differences(state["definition"], definition)
    if changed:
        raise ValueError(
            f"resume checkpoint {path.absolute()} was written by a different run ("
            + "; ".join(changed[:8])
            + (f"; and {len(changed) - 8} more" if len(changed) > 8 else "")
            + f"). Delete the folder {folder.absolute()} to start pretraining from scratch, "
            "or restore the previous configuration to continue it."
        )
    return state


def save_torch(obj: Any, path: str | Path) -> None:
    """``torch.save`` through a file handle: given a path, torch names the zip archive's folder
    after the file, so the same state written under two temporary names (``comtip._core.atomic`` adds
    the pid) gives different bytes. Through a handle the folder is always ``archive``: the same
    state gives the same file, and sha256 records of checkpoints are reproducible."""
    with open(path, "wb") as fh:
        torch.save(obj, fh)


def save_resume(folder: Path, state: dict) -> None:
    """Write ``last.pt`` atomically: a kill during the write leaves the previous one intact."""
    with atomic_path(folder / RESUME_FILE) as tmp:
        save_torch(state, tmp)


def rng_states() -> dict[str, Any]:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def final_state(
    model: torch.nn.Module,
    *,
    model_config: dict,
    train_config: dict,
    vocabulary: list[str],
    bin_edges: list[float],
    step: int,
    fingerprint: dict,
) -> dict:
    """The pretrained checkpoint: everything needed to rebuild the model and to read new data the
    same way (vocabulary, value-bin edges), and what it was trained on."""
    return {
        "format_version": FORMAT_VERSION,
        "model_state": model.state_dict(),
        "model_config": plain(model_config),
        "train_config": plain(train_config),
        "vocabulary": list(vocabulary),
        "bin_edges": [float(e) for e in bin_edges],
        "step": int(step),
        "data": plain(fingerprint),
    }


def load_pretrained(path: str | Path, *, map_location: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the pretrained CoMTIP from ``path``; ``info`` holds everything else in the file
    (model_config, train_config, vocabulary, bin_edges, step, data, format_version)."""
    state = torch.load(path, map_location=map_location, weights_only=True)
    version = state.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{Path(path).absolute()}: checkpoint format_version {version!r}, this code reads {FORMAT_VERSION}"
        )
    model = CoMTIP(ModelConfig.architecture(state["model_config"]), state["vocabulary"])
    model.load_state_dict(state.pop("model_state"))
    model.eval()
    return model, state


def resume_due(step: int, total: int, cfg: TrainConfig, saved_at: float, world_size: int, device: torch.device) -> bool:
    """Whether optimiser step ``step`` writes a resume checkpoint: the last step, every
    ``checkpoint_every`` steps, and the first log step ``checkpoint_minutes`` after the last one
    (``saved_at``, ``time.monotonic()``), decided on rank 0's clock for all ranks (a collective at
    log steps when ``checkpoint_minutes`` is set: every rank calls it at every step)."""
    due = step == total or (cfg.checkpoint_every is not None and step % cfg.checkpoint_every == 0)
    if cfg.checkpoint_minutes is not None and step % cfg.log_every == 0:
        late = torch.tensor([float(time.monotonic() - saved_at >= 60 * cfg.checkpoint_minutes)], device=device)
        if world_size > 1:
            dist.broadcast(late, src=0)
        due = due or bool(late.item())
    return due

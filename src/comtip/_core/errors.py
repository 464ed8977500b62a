"""One error type for bad inputs, so that every message names the sample and the file."""

from __future__ import annotations

from pathlib import Path


class PipelineInputError(Exception):
    """A problem with a user's input: the message names the sample and the file it concerns.

    ``str(err)`` reads ``[sample S] /full/path: what is wrong``; either prefix is left out when
    unknown.
    """

    def __init__(self, message: str, *, sample: str | None = None, path: str | Path | None = None):
        self.message = message
        self.sample = sample
        self.path = None if path is None else str(Path(path).absolute())
        prefix = ""
        if sample is not None:
            prefix += f"[sample {sample}] "
        if self.path is not None:
            prefix += f"{self.path}: "
        super().__init__(prefix + message)


class ConfigError(Exception):
    """The config or the sample sheet breaks its schema; the message names the key or sample."""

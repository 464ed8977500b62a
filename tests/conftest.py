"""Shared fixtures: paths of the repo and of the real data beside it, the tiny pretraining cohort and
the tiny workflow run (shared helpers are in _helpers/)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from _helpers import REPO
from _helpers.pretraining import make_cohort
from _helpers.workflow import snakemake, write_tiny_run_folder

SHARED_DATA = REPO.parent / "shared" / "data"
CONFIG_SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
SAMPLES_SCHEMA = REPO / "workflow" / "schemas" / "samples.schema.yaml"


def rule_blocks() -> Iterator[tuple[Path, str, str]]:
    """(.smk file, rule name, rule text) of every rule under workflow/rules."""
    for smk in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        for block in re.split(r"\n(?=rule \w+:)", smk.read_text()):
            head = re.match(r"rule (\w+):", block)
            if head:
                yield smk, head.group(1), block


def dry_run_jobs(text: str) -> list[tuple[str, str]]:
    """(rule, printed block) of every job in the output of ``snakemake -n``."""
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", text):
        head = re.match(r"(?:local)?rule (\w+):", block)
        if head:
            jobs.append((head.group(1), block))
    return jobs


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test with the reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (see ../shared/data/README.md)")
    return path


@pytest.fixture
def one_torch_thread():
    """One torch thread for CPU-bound model tests: on 2 shared cores, two spinning threads are
    many times slower. Modules opt in with ``pytestmark = pytest.mark.usefixtures(...)``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    """A tiny pretraining cohort (_helpers.pretraining.make_cohort), once per module: test_train,
    test_launch. test_finetune overrides the name with its own fine-tuning cohort."""
    return make_cohort(tmp_path_factory.mktemp("cohort"))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """The whole workflow run once, locally, on the tiny synthetic cohort: the checked-in test
    config .test/config/ (_helpers.workflow.write_tiny_run_folder)."""
    root = write_tiny_run_folder(tmp_path_factory.mktemp("run"))
    snakemake(root)
    return root

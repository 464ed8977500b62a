"""Helpers shared by several test modules: synthetic inputs, tiny configurations, run folders.

Test modules import from here (and fixtures come from conftest.py), never from one another;
tests/test_layout_of_tests.py checks that. One module per subject:

- ``slides``: synthetic slide pyramids whose pixels encode their position
- ``pretraining``: tiny pretraining cohorts and the model/training config that fits them
- ``finetuning``: tiny fine-tuning slides and a random pretrained checkpoint
- ``workflow``: run folders of the checked-in test config (.test/config/) and Snakemake runs
- ``chromium``: headless Chromium over the DevTools protocol (the report's landing page)
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

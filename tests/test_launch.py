"""The rule's launcher: N > 1 processes run pretraining under torchrun (CPU/gloo here)."""

from __future__ import annotations

import pandas as pd

from _helpers.pretraining import TINY_MODEL, TINY_TRAIN
from comtip.training import load_pretrained
from comtip.training.launch import run_pretrain


def test_two_processes_are_launched_under_torchrun(cohort, tmp_path):  # cohort: conftest.py
    log = tmp_path / "pretrain.log"
    kwargs = {
        **cohort,
        "out_checkpoint": tmp_path / "comtip.pt",
        "out_metrics": tmp_path / "comtip.metrics.tsv",
        "out_retrieval": tmp_path / "comtip.retrieval.tsv",
        "model_config": TINY_MODEL,
        "train_config": TINY_TRAIN,
    }
    run_pretrain(kwargs, processes=2, log_path=log)
    text = log.read_text()
    assert "2 processes on cpu" in text, text[-3000:]
    assert list(pd.read_csv(tmp_path / "comtip.metrics.tsv", sep="\t")["step"]) == [2, 4, 6]
    assert load_pretrained(tmp_path / "comtip.pt")[1]["step"] == 6

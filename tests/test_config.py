"""Config and sample-sheet validation: defaults, and one clear error per bad value."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from _helpers.workflow import PREDICT_SAMPLE, SAMPLES, TEST_CONFIG
from comtip._core.errors import ConfigError
from comtip.config import load_sample_sheet, validate_config
from conftest import CONFIG_SCHEMA, REPO, SAMPLES_SCHEMA

HEADER = "sample\tspaceranger_dir\tslide\tsplit\tmpp\tspot_diameter_um\tbatch\tpatient\tspot_pitch_um\n"


def test_shipped_config_is_valid_and_gets_defaults():
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    validate_config(config, CONFIG_SCHEMA)
    assert config["patches"]["size_px"] == 224
    assert config["tiling"]["min_saturation"] == 0.05  # filled from the schema


def test_minimal_config_gets_every_default():
    config = validate_config({"samples": "s.tsv"}, CONFIG_SCHEMA)
    assert config["seed"] == 0
    assert config["patches"] == {"size_px": 224, "mpp": 0.5, "chunk_size": 256, "max_upsample": 4.0}
    assert config["demo"]["dir"] == "resources/demo"


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        (("patches", "size_px"), -3, "config key 'patches.size_px'"),
        (("tiling", "mask_mpp"), "big", "config key 'tiling.mask_mpp'"),
        (("ingest", "spot_diamter_um"), 55, "Additional properties"),
        (("seed",), 1.5, "config key 'seed'"),
    ],
)
def test_bad_config_value_names_the_key(key, value, needle):
    config = copy.deepcopy({"samples": "s.tsv", "patches": {}, "tiling": {}, "ingest": {}})
    target = config
    for k in key[:-1]:
        target = target[k]
    target[key[-1]] = value
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        validate_config(config, CONFIG_SCHEMA)


@pytest.mark.parametrize(
    ("evaluate", "needles"),
    [
        ({"methods": ["mean", "bleep_comtip"]}, ["'bleep_comtip' in evaluate.methods is now 'retrieval_mean_comtip'"]),
        (
            {"methods": ["mclstexp_comtip", "bleep_comtip"], "mclstexp_k": 100},
            [
                "'bleep_comtip' in evaluate.methods is now 'retrieval_mean_comtip'",
                "'mclstexp_comtip' in evaluate.methods is now 'retrieval_weighted_comtip'",
                "evaluate.mclstexp_k is now evaluate.retrieval_weighted_k",
            ],
        ),
        (
            {"mclstexp_smooth_query": True},
            ["evaluate.mclstexp_smooth_query is now evaluate.retrieval_weighted_smooth_query"],
        ),
    ],
)
def test_a_renamed_method_or_setting_gets_one_error_with_its_new_name(evaluate, needles):
    with pytest.raises(ConfigError) as err:
        validate_config({"samples": "s.tsv", "evaluate": evaluate}, CONFIG_SCHEMA)
    text = str(err.value)
    assert text.startswith("config key 'evaluate': renamed: ") and text.count("\n") == 0
    for needle in needles:
        assert needle in text
    assert "`bleep` in evaluate.methods is now BLEEP trained as itself" in text
    assert "is not one of" not in text and "Additional properties" not in text  # not the schema's errors


def test_bleep_config_defaults_are_bleeps_and_its_budget_is_pretrainings():
    from comtip.baselines.bleep_config import BleepConfig
    from comtip.training.config import TrainConfig

    config = validate_config(
        {"samples": "s.tsv", "pretrain": {"epochs": 5, "batch_size": 16, "lr": 0.01}}, CONFIG_SCHEMA
    )
    cfg = BleepConfig.from_dict(config["bleep"])
    assert (cfg.image_encoder, cfg.projection_dim, cfg.dropout, cfg.temperature) == ("resnet50", 256, 0.1, 1.0)
    assert (cfg.lr, cfg.weight_decay, cfg.pretrained_weights, cfg.image_size) == (1e-3, 1e-3, None, None)
    train = TrainConfig.from_dict(cfg.train_config(config["pretrain"], seed=4))
    assert (train.epochs, train.batch_size, train.seed, train.sampler) == (5, 16, 4, "blocks")  # shared
    assert (train.lr, train.weight_decay, train.warmup_steps, train.min_lr_ratio) == (1e-3, 1e-3, 0, 1.0)  # BLEEP's
    assert train.clip_grad_norm is None and train.color_jitter == 0.0 and train.flip and train.rot90
    override = BleepConfig.from_dict({**config["bleep"], "epochs": 2, "batch_size": 8})
    train = TrainConfig.from_dict(override.train_config({**config["pretrain"], "max_steps": 40}, seed=4))
    assert (train.epochs, train.max_steps, train.batch_size) == (2, None, 8)
    with pytest.raises(ConfigError, match=r"config key 'bleep\.image_encodr'"):
        BleepConfig.from_dict({"image_encodr": "resnet50"})
    with pytest.raises(ConfigError, match=r"config key 'bleep\.lr'"):
        validate_config({"samples": "s.tsv", "bleep": {"lr": 0}}, CONFIG_SCHEMA)


def _sheet(tmp_path: Path, rows: list[str]) -> Path:
    sheet = tmp_path / "config" / "samples.tsv"
    sheet.parent.mkdir(parents=True, exist_ok=True)
    sheet.write_text(HEADER + "".join(r + "\n" for r in rows))
    return sheet


@pytest.fixture
def run_folder(tmp_path: Path) -> Path:
    (tmp_path / "data" / "a" / "outs").mkdir(parents=True)
    (tmp_path / "data" / "a" / "slide.svs").write_bytes(b"x")
    return tmp_path


def test_relative_paths_resolve_against_the_sheet_folder(run_folder):
    sheet = _sheet(run_folder, ["a\t../data/a/outs\t../data/a/slide.svs\ttrain\t0.25\t\t\tP1"])
    df = load_sample_sheet(sheet, SAMPLES_SCHEMA, run_dir=run_folder)
    row = df.loc["a"]
    assert row["spaceranger_dir"] == "data/a/outs"  # relative to the working directory
    assert row["slide"] == "data/a/slide.svs"
    assert row["mpp"] == 0.25 and row["patient"] == "P1"


def test_missing_path_is_reported_in_full_with_the_sample(run_folder):
    sheet = _sheet(run_folder, ["a\t../data/zz/outs\t../data/a/slide.svs\ttrain\t\t\t\t"])
    with pytest.raises(ConfigError) as err:
        load_sample_sheet(sheet, SAMPLES_SCHEMA, run_dir=run_folder)
    assert "'a'" in str(err.value) and str(run_folder / "data" / "zz" / "outs") in str(err.value)


def test_paths_under_the_demo_folder_may_not_exist_yet(run_folder):
    sheet = _sheet(run_folder, ["d\t../resources/demo/d/outs\t../resources/demo/d/slide.tif\ttest\t\t\t\t"])
    df = load_sample_sheet(sheet, SAMPLES_SCHEMA, run_dir=run_folder, generated_under="resources/demo")
    assert df.loc["d", "slide"] == "resources/demo/d/slide.tif"


@pytest.mark.parametrize(
    ("row", "needle"),
    [
        ("a\t../data/a/outs\t../data/a/slide.svs\ttraining\t\t\t\t", "sample 'a'.*split"),
        ("a\t../data/a/outs\t../data/a/slide.svs\ttrain\t-1\t\t\t", "sample 'a'.*mpp"),
        ("a\t../data/a/outs\t../data/a/slide.svs\ttrain\tfast\t\t\t", "sample 'a'.*mpp"),
        ("a b\t../data/a/outs\t../data/a/slide.svs\ttrain\t\t\t\t", "sample 'a b'.*does not match"),
        ("genes\t../data/a/outs\t../data/a/slide.svs\ttrain\t\t\t\t", "'genes' is reserved"),
        ("a\t\t../data/a/slide.svs\ttest\t\t\t\t", "sample 'a'.*needs a spaceranger_dir"),
        ("a\t../data/a/outs\t\ttrain\t\t\t\t", "sample 'a'.*'slide' is a required property"),
    ],
)
def test_bad_sample_row_names_the_sample(run_folder, row, needle):
    with pytest.raises(ConfigError, match=needle):
        load_sample_sheet(_sheet(run_folder, [row]), SAMPLES_SCHEMA, run_dir=run_folder)


def test_duplicate_sample_names_are_refused(run_folder):
    row = "a\t../data/a/outs\t../data/a/slide.svs\ttrain\t\t\t\t"
    with pytest.raises(ConfigError, match="'a' appears more than once"):
        load_sample_sheet(_sheet(run_folder, [row, row]), SAMPLES_SCHEMA, run_dir=run_folder)


def test_predict_sample_needs_only_a_slide(run_folder):
    df = load_sample_sheet(
        _sheet(run_folder, ["p\t\t../data/a/slide.svs\tpredict\t0.5\t\t\t"]), SAMPLES_SCHEMA, run_dir=run_folder
    )
    assert "spaceranger_dir" not in df.columns or not isinstance(df.loc["p"].get("spaceranger_dir"), str)


def test_shipped_sample_sheet_is_valid():
    df = load_sample_sheet(
        REPO / "config" / "samples.tsv", SAMPLES_SCHEMA, run_dir=REPO, generated_under="resources/demo"
    )
    assert set(df["split"]) >= {"train", "test"}


def test_checked_in_test_config_is_valid():
    """.test/config/config.yaml (the test config the e2e tests run, as the snakemake-workflows
    catalogue expects it) passes the schema, as the Snakefile validates it."""
    config = validate_config(yaml.safe_load((TEST_CONFIG / "config.yaml").read_text()), CONFIG_SCHEMA)
    assert config["samples"] == "config/samples.tsv" and config["seed"] == 7
    assert config["demo"]["dir"] == "resources/demo"


def test_checked_in_test_sample_sheet_loads_and_lists_the_tiny_cohort():
    """.test/config/samples.tsv loads as workflow/rules/common.smk loads it, run from .test: its
    demo paths (under .test/resources/demo) need not exist yet."""
    run_dir = TEST_CONFIG.parent
    config = validate_config(yaml.safe_load((TEST_CONFIG / "config.yaml").read_text()), CONFIG_SCHEMA)
    df = load_sample_sheet(
        run_dir / config["samples"], SAMPLES_SCHEMA, run_dir=run_dir, generated_under=config["demo"]["dir"]
    )
    assert dict(df["split"]) == {**SAMPLES, PREDICT_SAMPLE: "predict"}
    assert df.loc["tiny_a", "slide"] == "resources/demo/tiny_a/slide.tif"
    assert df.loc["tiny_a", "spaceranger_dir"] == "resources/demo/tiny_a/outs"
    assert not isinstance(df.loc[PREDICT_SAMPLE].get("spaceranger_dir"), str)


def test_cohort_overlay_merges_into_the_paper_backbone_and_a_cohort_schedule(tmp_path):
    """config/cohort.yaml, as `--configfile` extends config/config.yaml with it (Snakemake's own
    recursive merge): a valid config with ViT-B/32 at 224 px, every block, and PAAT's warm-up as
    a fraction of the run; a dry run of the demo with it plans the same jobs."""
    import subprocess
    import sys

    from snakemake.utils import update_config

    from comtip.training.config import TrainConfig, model_config_from_yaml

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    update_config(config, yaml.safe_load((REPO / "config" / "cohort.yaml").read_text()))
    validate_config(config, CONFIG_SCHEMA)
    model = model_config_from_yaml(config["model"], gene_bins=config["genes"]["n_bins"])
    assert (model.vision_model, model.image_size, model.vision_kwargs) == ("vit_base_patch32_224", 224, {"depth": 12})
    train = TrainConfig.from_dict(config["pretrain"])
    assert train.paat_warmup_steps is None and train.batch_size == 256
    assert config["pretrain"]["subsample_genes"] == "vocabulary"  # config.yaml's keys kept

    (tmp_path / "config").mkdir()
    for name in ("config.yaml", "samples.tsv", "cohort.yaml"):
        (tmp_path / "config" / name).write_text((REPO / "config" / name).read_text())
    dry = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--snakefile", str(REPO / "Snakefile"),
         "--directory", str(tmp_path), "--configfile", str(tmp_path / "config" / "cohort.yaml")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-3000:]
    assert "extended by additional config" in dry.stdout + dry.stderr and "rule pretrain" in dry.stdout


def test_a_dry_run_of_the_tiny_config_pretrains_each_ablation_its_methods_read(tmp_path):
    """.test/config/ reads ridge_comtip_no_mfm and zeroshot_comtip_no_mfm: rule pretrain runs
    for comtip and that variant once (and no other), which is embedded from its own checkpoint
    (one ablation only: each costs a pretraining run of the tiny end-to-end test)."""
    from _helpers.workflow import snakemake, write_tiny_run_folder
    from conftest import dry_run_jobs

    root = write_tiny_run_folder(tmp_path / "run")
    jobs = dry_run_jobs(snakemake(root, "-n").stdout)
    pretrained = sorted(re.search(r"model=(\w+)", block).group(1) for rule, block in jobs if rule == "pretrain")
    assert pretrained == ["comtip", "comtip_no_mfm"]
    embedded = {re.search(r"encoder=(\w+)", block).group(1) for rule, block in jobs if rule == "embed_spots"}
    assert {"comtip", "random", "comtip_no_mfm"} <= embedded and "comtip_name_only" not in embedded
    for variant in ("comtip_no_mfm",):
        block = next(b for rule, b in jobs if rule == "embed_spots" and f"encoder={variant}," in b)
        assert f"results/models/pretrain/{variant}.pt" in block

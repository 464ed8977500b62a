"""Sample sheet, wildcard constraints and input functions shared by the rules."""

import dataclasses
import os
import re
import zlib

from comtip.config import load_sample_sheet
from comtip.io.layout import is_visium_hd, spaceranger_files

SAMPLES = load_sample_sheet(
    config["samples"],
    Path(workflow.basedir) / "workflow" / "schemas" / "samples.schema.yaml",
    run_dir=os.getcwd(),
    generated_under=config["demo"]["dir"],
)
ST_SAMPLES = [s for s in SAMPLES.index if isinstance(SAMPLES.loc[s].get("spaceranger_dir"), str)]
DEMO_DIR = config["demo"]["dir"].rstrip("/")


wildcard_constraints:
    sample="|".join(re.escape(s) for s in SAMPLES.index),


def all_outputs(wildcards):
    """Per-sample outputs of every stage implemented so far."""
    files = ["results/genes/gene_panel.tsv", f"results/models/pretrain/{PRETRAIN_MODEL}.pt"]
    for sample in ST_SAMPLES:
        files += [
            f"results/{sample}/spots.h5ad",
            f"results/{sample}/tissue_mask.png",
            f"results/{sample}/tiles.parquet",
            f"results/{sample}/thumbnail.png",
            f"results/{sample}/spot_patches.npy",
            f"results/{sample}/spot_patches.parquet",
            f"results/{sample}/gene_sentences.npz",
        ]
    if TEST_SAMPLES:
        files += [
            "results/evaluation/summary.tsv",
            "results/evaluation/summary_pearson.png",
            "results/evaluation/training_cost.tsv",
        ]
    if BATCH_MIXING:
        files += ["results/evaluation/batch_mixing.tsv", "results/evaluation/batch_mixing.png"]
    files += [f"results/predictions/{s}/virtual_visium.h5ad" for s in PREDICT_SAMPLES]
    files += [f"results/{s}/spatialdata.zarr" for s in [*ST_SAMPLES, *PREDICT_SAMPLES]]
    return files


# Samples with Space Ranger output by split, in sheet order (computed once: input functions run
# for every job of the DAG).
_SPLITS = {
    split: [s for s in ST_SAMPLES if SAMPLES.loc[s, "split"] == split] for split in ("train", "val", "test", "predict")
}


def samples_with_split(split):
    return list(_SPLITS[split])


def training_spots(wildcards):
    """spots.h5ad of the training samples only: what gene selection may see."""
    return [f"results/{s}/spots.h5ad" for s in samples_with_split("train")]


def _sheet_value(sample, column):
    value = SAMPLES.loc[sample].get(column)
    return None if value is None or (isinstance(value, float) and value != value) else value


def spaceranger_inputs(wildcards):
    """The outs/ files ingest reads (h5 or mtx matrix, v1 or v2 positions, scale factors; for
    Visium HD those of the sheet's bin size)."""
    files = spaceranger_files(SAMPLES.loc[wildcards.sample, "spaceranger_dir"], sample_bin_size_um(wildcards))
    return {role: str(path) for role, path in files.items()}


def sample_bin_size_um(wildcards):
    """Visium HD bin size from the sample sheet, or None (16 µm for an HD run)."""
    value = _sheet_value(wildcards.sample, "bin_size_um")
    return None if value is None else int(value)


def _hd_setting(wildcards, key):
    """ingest.{key} for a Visium HD sample, None for the others: a Visium sample's ingest does
    not depend on the HD settings, so changing them reruns only the HD samples."""
    outs = SAMPLES.loc[wildcards.sample, "spaceranger_dir"]
    return config["ingest"][key] if outs and is_visium_hd(outs) else None


def sample_hd_pseudospot_um(wildcards):
    return _hd_setting(wildcards, "hd_pseudospot_um")


def sample_hd_pseudospot_pitch_um(wildcards):
    return _hd_setting(wildcards, "hd_pseudospot_pitch_um")


def tiling_inputs(wildcards):
    """The slide, and spots.h5ad (µm/px, spots to draw) for samples with Space Ranger output."""
    inputs = {"slide": slide_path(wildcards)}
    if wildcards.sample in ST_SAMPLES:
        inputs["spots"] = f"results/{wildcards.sample}/spots.h5ad"
    return inputs


def spaceranger_dir(wildcards):
    return SAMPLES.loc[wildcards.sample, "spaceranger_dir"]


def slide_path(wildcards):
    return SAMPLES.loc[wildcards.sample, "slide"]


def sample_mpp(wildcards):
    """µm/px from the sample sheet, or None (then slide metadata or spot geometry decide)."""
    value = _sheet_value(wildcards.sample, "mpp")
    return None if value is None else float(value)


def sample_spot_diameter_um(wildcards):
    value = _sheet_value(wildcards.sample, "spot_diameter_um")
    return config["ingest"]["spot_diameter_um"] if value is None else float(value)


def sample_spot_pitch_um(wildcards):
    value = _sheet_value(wildcards.sample, "spot_pitch_um")
    return config["ingest"]["spot_pitch_um"] if value is None else float(value)


def sample_mpp_source(wildcards):
    value = _sheet_value(wildcards.sample, "mpp_source")
    return "auto" if value is None else str(value)


def demo_seed(wildcards):
    """A seed per demo sample, derived from the config seed and the sample's name."""
    return zlib.crc32(f"{config['seed']}:{wildcards.demo}".encode())


def demo_sample_dir(wildcards, output):
    """The folder simulate_demo_sample fills: the one holding the slide."""
    return str(Path(output.slide).parent)


# -- pretraining ---------------------------------------------------------------------------------

from comtip.model.config import ModelConfig  # noqa: E402
from comtip.training.config import model_config_from_yaml  # noqa: E402

# CoMTIP, the model every later stage reads; its ablations (registry.ABLATIONS) are pretrained
# by the same rule under their own {model} name when a method reads them.
PRETRAIN_MODEL = "comtip"
# Checked now, so a wrong `model` key stops the run before any job, naming the key.
MODEL_CONFIG = model_config_from_yaml(config["model"], gene_bins=config["genes"]["n_bins"]).to_dict()


def pretrain_model_config(wildcards):
    """The model config of pretrained model {model}: the configured one, with the ablation's
    override for a variant (registry.variant_model_config); checked like MODEL_CONFIG."""
    return ModelConfig.from_dict(registry.variant_model_config(MODEL_CONFIG, wildcards.model)).to_dict()


def embedding_checkpoint(wildcards):
    """The checkpoint embed_spots reads for {encoder}: the ablation's own, CoMTIP's otherwise."""
    return registry.pretrained_checkpoint(wildcards.encoder)


from comtip.baselines.bleep_config import BleepConfig  # noqa: E402
from comtip.training.config import TrainConfig  # noqa: E402

# BLEEP trained as itself (by train_bleep): its own settings, pretraining's data and budget;
# both checked now.
BLEEP_CONFIG = BleepConfig.from_dict(config["bleep"]).to_dict()
BLEEP_TRAIN_CONFIG = BleepConfig.from_dict(config["bleep"]).train_config(config["pretrain"], config["seed"])
TrainConfig.from_dict(BLEEP_TRAIN_CONFIG)

from comtip.baselines.mclstexp_config import MclstexpConfig  # noqa: E402

# mclSTExp trained as itself (by train_mclstexp): likewise.
MCLSTEXP_CONFIG = MclstexpConfig.from_dict(config["mclstexp"]).to_dict()
MCLSTEXP_TRAIN_CONFIG = MclstexpConfig.from_dict(config["mclstexp"]).train_config(config["pretrain"], config["seed"])
TrainConfig.from_dict(MCLSTEXP_TRAIN_CONFIG)


wildcard_constraints:
    model="[A-Za-z0-9_-]+",


def training_inputs(wildcards):
    """Patches, patch index and gene sentences of the training samples only, in sheet order:
    pretraining never sees a val/test slide."""
    train = samples_with_split("train")
    return {
        "patches": [f"results/{s}/spot_patches.npy" for s in train],
        "index": [f"results/{s}/spot_patches.parquet" for s in train],
        "sentences": [f"results/{s}/gene_sentences.npz" for s in train],
    }


def spot_training_inputs(wildcards):
    """training_inputs plus the training samples' spots.h5ad (mclSTExp reads their array row and
    column)."""
    return {**training_inputs(wildcards), "spots": [f"results/{s}/spots.h5ad" for s in samples_with_split("train")]}


def validation_inputs(wildcards):
    """Patches, patch index and gene sentences of the validation samples: pretraining's held-out
    alignment check (never trained on)."""
    val = samples_with_split("val")
    return {
        "val_patches": [f"results/{s}/spot_patches.npy" for s in val],
        "val_index": [f"results/{s}/spot_patches.parquet" for s in val],
        "val_sentences": [f"results/{s}/gene_sentences.npz" for s in val],
    }


# -- fine-tuning, prediction, evaluation -------------------------------------------------------

from comtip.evaluation.paired import paired_reference  # noqa: E402
from comtip.finetune.config import FinetuneConfig  # noqa: E402
from comtip.predict import reference, registry  # noqa: E402

TEST_SAMPLES = samples_with_split("test")
PREDICT_SAMPLES = [s for s in SAMPLES.index if SAMPLES.loc[s, "split"] == "predict" and s not in ST_SAMPLES]
METHODS = list(config["evaluate"]["methods"])
FINETUNE_MODES = [m.removeprefix("finetune_") for m in METHODS if m.startswith("finetune_")]
PAIRED_REFERENCE = paired_reference(config["evaluate"]["paired_reference"], METHODS)
if PREDICT_SAMPLES and config["evaluate"]["slide_model"] not in FINETUNE_MODES:
    FINETUNE_MODES.append(config["evaluate"]["slide_model"])
# Checked now, so a wrong `finetune` key stops the run before any job, naming the key.
for _mode in registry.FINETUNE_MODES:
    FinetuneConfig.from_dict({**config["finetune"], "mode": _mode, "seed": config["seed"]}).check()


wildcard_constraints:
    mode="|".join(registry.FINETUNE_MODES),
    encoder="|".join(registry.ENCODERS),


# The local weights file of each foundation model the methods read (config key
# foundation_models); checked now, so a ridge_<preset> without its file stops the run naming the key.
FOUNDATION_WEIGHTS = registry.foundation_weights(METHODS, config["foundation_models"])


def foundation_weights_file(wildcards):
    """The weights file embed_foundation reads for {encoder} (config key foundation_models)."""
    return registry.foundation_weights([f"ridge_{wildcards.encoder}"], config["foundation_models"])[wildcards.encoder]


def finetune_params(wildcards):
    return {**config["finetune"], "mode": wildcards.mode, "seed": config["seed"]}


def _pairs(samples):
    return {
        "patches": [f"results/{s}/spot_patches.npy" for s in samples],
        "sentences": [f"results/{s}/gene_sentences.npz" for s in samples],
    }


def finetune_inputs(wildcards):
    """Training slides to fit on, validation slides for early stopping."""
    train, val = _pairs(samples_with_split("train")), _pairs(samples_with_split("val"))
    return {
        "train_patches": train["patches"],
        "train_sentences": train["sentences"],
        "val_patches": val["patches"],
        "val_sentences": val["sentences"],
    }


def baseline_inputs(wildcards):
    """What each comparison method reads, as its registry entry (comtip.predict.registry) says."""
    return registry.method_inputs(wildcards.method, wildcards.sample, f"results/models/pretrain/{PRETRAIN_MODEL}.pt")


def training_value_inputs(wildcards):
    """gene_sentences.npz of the training samples, in sheet order."""
    return {"files": [f"results/{s}/gene_sentences.npz" for s in samples_with_split("train")]}


def training_embedding_inputs(wildcards):
    """Embeddings of the training samples by one encoder, in sheet order."""
    return {"files": [f"results/embeddings/{wildcards.encoder}/{s}.npz" for s in samples_with_split("train")]}


def ridge_fit_inputs(wildcards):
    """Embeddings by one encoder and gene sentences of the training samples, in sheet order."""
    train = samples_with_split("train")
    return {
        "embeddings": [f"results/embeddings/{wildcards.encoder}/{s}.npz" for s in train],
        "sentences": [f"results/{s}/gene_sentences.npz" for s in train],
    }


def prediction_files():
    return {(s, m): f"results/predictions/{s}/{m}.h5ad" for s in TEST_SAMPLES for m in METHODS}


def evaluation_inputs(wildcards):
    """Predictions, truth and the spots' coordinates (Moran's I) of the test slides."""
    return {
        "predictions": list(prediction_files().values()),
        "truth": [f"results/{s}/gene_sentences.npz" for s in TEST_SAMPLES],
        "spots": [f"results/{s}/spots.h5ad" for s in TEST_SAMPLES],
    }


def figure_inputs(wildcards):
    return {
        **evaluation_inputs(wildcards),
        "finetune_metrics": [f"results/models/finetune/{m}.metrics.tsv" for m in FINETUNE_MODES],
        "slides": [SAMPLES.loc[s, "slide"] for s in TEST_SAMPLES],  # the maps' H&E
    }


# -- batch mixing --------------------------------------------------------------------------------

from comtip.evaluation.batch_mixing import sample_labels  # noqa: E402  (numpy and pandas only)

# The slides whose spots are mixed: training and test (both have expression and embeddings).
BATCH_MIXING_SAMPLES = samples_with_split("train") + TEST_SAMPLES
BATCH_MIXING_ENCODERS = registry.encoders_of(METHODS)
BATCH_MIXING = bool(config["evaluate"]["batch_mixing"]) and len(BATCH_MIXING_SAMPLES) >= 2


def batch_mixing_inputs(wildcards):
    """Gene sentences of the mixed slides and their embeddings by each encoder the methods read,
    encoder-major, both in BATCH_MIXING_SAMPLES order."""
    return {
        "sentences": [f"results/{s}/gene_sentences.npz" for s in BATCH_MIXING_SAMPLES],
        "embeddings": [
            registry.EMBEDDINGS.format(encoder=e, sample=s) for e in BATCH_MIXING_ENCODERS for s in BATCH_MIXING_SAMPLES
        ],
    }


def batch_mixing_labels():
    """Label → {sample: value}: the slide, and the sheet's batch / patient when they vary; a
    partially blank column stops the parse (only when batch mixing runs)."""
    if not BATCH_MIXING:
        return {}
    return sample_labels(SAMPLES, BATCH_MIXING_SAMPLES, sheet_path=config["samples"])


# Every model trained for the configured methods, with its checkpoint, metrics and benchmark file
# (rule training_cost).
TRAINED_MODELS = [dataclasses.asdict(m) for m in registry.trained_models(METHODS)]


def training_cost_inputs(wildcards):
    inputs = {}
    for model in TRAINED_MODELS:
        for role in ("checkpoint", "metrics", "benchmark"):
            inputs[f"{role}_{model['name']}"] = model[role]
    return inputs


# -- exports -------------------------------------------------------------------------------------


def spatialdata_methods(wildcards):
    """The methods whose predictions go into a sample's SpatialData table: all, on test samples."""
    return list(METHODS) if wildcards.sample in TEST_SAMPLES else []


def spatialdata_inputs(wildcards):
    """The slide and tissue mask; spots, sentences and predictions (test samples) of a measured
    sample; the virtual Visium prediction of an H&E-only slide."""
    sample = wildcards.sample
    inputs = {"slide": slide_path(wildcards), "mask": f"results/{sample}/tissue_mask.png"}
    if sample in ST_SAMPLES:
        inputs["spots"] = f"results/{sample}/spots.h5ad"
        inputs["sentences"] = f"results/{sample}/gene_sentences.npz"
        inputs["predictions"] = [f"results/predictions/{sample}/{m}.h5ad" for m in spatialdata_methods(wildcards)]
    else:
        inputs["virtual_visium"] = f"results/predictions/{sample}/virtual_visium.h5ad"
    return inputs

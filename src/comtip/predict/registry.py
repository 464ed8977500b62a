"""Every prediction method, declared once: its name, what it reads, the rule that runs it and the
function that computes it.

Standard library only (and the torch-free fine-tuning config and foundation-model presets,
``comtip.model.presets``, each of which is a ``ridge_<preset>`` method): the workflow reads this
registry when Snakemake parses it (wildcard constraints, input functions), so it must not import
torch.
The functions are named by dotted path and imported when a prediction runs. Adding a method =
one :class:`Method` entry here plus its function; ``workflow/schemas/config.schema.yaml`` lists
the same names for ``evaluate.methods`` and ``docs/evaluation.md`` holds :func:`method_table`,
both checked against this registry by ``tests/test_registry.py``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from comtip._core.errors import ConfigError
from comtip.finetune.config import MODES as FINETUNE_MODES
from comtip.model.presets import PRESETS as FOUNDATION_PRESETS

# The encoders whose embeddings methods read, and the rule that writes them
# (results/embeddings/{encoder}/{sample}.npz): the pretrained CoMTIP and a seeded random
# initialisation of it (embed_spots), and BLEEP and mclSTExp trained as themselves (train_bleep,
# embed_bleep; train_mclstexp, embed_mclstexp).
# CoMTIP's ablations (issue 13): each a CoMTIP pretrained by rule pretrain (model={variant}) on
# the same data, budget and seed with one `model:` key overridden (variant_model_config), embedded
# by embed_spots from its own checkpoint. comtip_minilm and comtip_hash are both declared: the one
# equal to the configured name encoder is the same model as comtip (a duplicate run, refused by
# variant_model_config so that it is never trained twice under two names).
ABLATIONS: dict[str, dict[str, Any]] = {
    "comtip_no_mfm": {"mfm": False},
    "comtip_no_paat": {"paat": False},
    "comtip_value_only": {"gene_tokens": "value_only"},
    "comtip_name_only": {"gene_tokens": "name_only"},
    "comtip_minilm": {"name_encoder": "minilm"},
    "comtip_hash": {"name_encoder": "hash"},
}
ABLATION_SUMMARIES = {
    "comtip_no_mfm": "without Masked Feature Modeling",
    "comtip_no_paat": "without Pair-aware Adversarial Training",
    "comtip_value_only": "value-only gene tokens (no name embedding)",
    "comtip_name_only": "name-only gene tokens (no value embedding)",
    "comtip_minilm": "the MiniLM gene-name encoder",
    "comtip_hash": "the hashed n-gram gene-name encoder",
}
ENCODER_RULES = {
    "comtip": "embed_spots",
    "random": "embed_spots",
    **{variant: "embed_spots" for variant in ABLATIONS},
    "bleep": "embed_bleep",
    "mclstexp": "embed_mclstexp",
    # the pathology foundation models (comtip.model.presets), frozen, from their local files
    # (config key foundation_models), embedded by embed_foundation
    **{name: "embed_foundation" for name in FOUNDATION_PRESETS},
}
ENCODERS = tuple(ENCODER_RULES)
COMTIP_ENCODERS = tuple(e for e, rule in ENCODER_RULES.items() if rule == "embed_spots")
FOUNDATION_ENCODERS = tuple(e for e, rule in ENCODER_RULES.items() if rule == "embed_foundation")
# The pretrained CoMTIP models (rule pretrain's {model}): CoMTIP and its ablations.
PRETRAIN_MODELS = ("comtip", *ABLATIONS)
PRETRAINED_CHECKPOINT = "results/models/pretrain/{model}.pt"

# What a method reads besides the training and test gene sentences (which every method reads) and
# the test sample's spots.h5ad (whose spots every prediction file copies):
TEST_EMBEDDING = "test_embedding"  # the test sample's embeddings by the method's encoder
TRAIN_EMBEDDINGS = "train_embeddings"  # the training samples' embeddings by the method's encoder
PRETRAINED = "pretrained"  # the pretrained CoMTIP checkpoint
FINETUNED = "finetuned"  # a fine-tuned head (results/models/finetune/{mode}.pt) and the test patches
SPOT_XY = "spot_xy"  # the test spots' coordinates (from spots.h5ad), for spatial context
RIDGE_PROBE = "ridge_probe"  # the ridge probe fitted once on the training samples by the method's encoder
NEEDS = (TEST_EMBEDDING, TRAIN_EMBEDDINGS, RIDGE_PROBE, PRETRAINED, FINETUNED, SPOT_XY)
ENCODER_NEEDS = {TEST_EMBEDDING, TRAIN_EMBEDDINGS, RIDGE_PROBE}  # what a method's encoder computes

RULES = ("predict_baseline", "predict_finetuned")

# The files of the contract between rules (docs/architecture.md) that methods read: the training
# slides' values and embeddings stacked into one file each (comtip.predict.reference), the ridge
# probe fitted once per encoder (comtip.predict.ridge, rule fit_ridge), and the test slide's
# embeddings.
TRAINING_VALUES = "results/genes/training_values.npz"
TRAINING_EMBEDDINGS = "results/embeddings/{encoder}/training/reference.npz"
RIDGE_PROBES = "results/models/ridge/{encoder}.npz"
EMBEDDINGS = "results/embeddings/{encoder}/{sample}.npz"


@dataclass(frozen=True)
class Method:
    """One prediction method: ``function`` ("module:attribute") computes it in rule ``rule``.

    A ``predict_baseline`` function takes a :class:`comtip.predict.methods.PredictionContext` and
    returns the (spots, panel genes) prediction; ``settings`` are the ``evaluate.*`` keys it reads.
    """

    name: str
    summary: str
    function: str
    rule: str = "predict_baseline"
    encoder: str | None = None
    needs: tuple[str, ...] = ()
    settings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # programming errors in this file, caught by the registry's tests
        assert self.rule in RULES, self.rule
        assert set(self.needs) <= set(NEEDS), self.needs
        assert (self.encoder is None) == (not ENCODER_NEEDS & set(self.needs)), self.name
        assert self.encoder is None or self.encoder in ENCODERS, self.encoder

    def resolve(self) -> Callable[..., Any]:
        """The function that computes this method (imports its module, e.g. torch for zero-shot)."""
        module, attribute = self.function.split(":")
        return getattr(importlib.import_module(module), attribute)


def _ridge(encoder: str, what: str) -> Method:
    return Method(
        f"ridge_{encoder}",
        f"HEST-Benchmark probe on frozen {what} image features: StandardScaler → PCA → ridge "
        "(exact solution, fitted once per encoder by `fit_ridge`)",
        "comtip.predict.methods:ridge",
        encoder=encoder,
        needs=(TEST_EMBEDDING, RIDGE_PROBE),
        settings=("ridge_pca_dim",),
    )


def _zeroshot(encoder: str, what: str) -> Method:
    return Method(
        "zeroshot" if encoder == "comtip" else f"zeroshot_{encoder}",
        f'{what} zero-shot: the image embedding scored against "gene at value v" prompts, '
        "weighted by the training value prior",
        "comtip.predict.methods:zeroshot",
        encoder=encoder,
        needs=(TEST_EMBEDDING, PRETRAINED),
        settings=("zeroshot_grid", "zeroshot_grid_kind", "zeroshot_prior", "zeroshot_temperature"),
    )


def _finetune(mode: str, what: str) -> Method:
    return Method(
        f"finetune_{mode}",
        f"{what} on the pretrained image encoder (`comtip.finetune`)",
        "comtip.finetune.predict:predict_finetuned",
        rule="predict_finetuned",
        needs=(PRETRAINED, FINETUNED),
    )


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "mean",
            "mean expression of the training spots (the floor any method must beat)",
            "comtip.predict.methods:mean",
        ),
        _ridge("comtip", "CoMTIP"),
        _ridge("random", "random-init (same architecture, seeded)"),
        Method(
            "retrieval_mean_comtip",
            "retrieval on CoMTIP's embeddings (BLEEP's prediction rule, not BLEEP): mean expression "
            "of the top-k training spots whose sentence embedding is closest (cosine) to the test "
            "image embedding",
            "comtip.predict.methods:retrieval_mean",
            encoder="comtip",
            needs=(TEST_EMBEDDING, TRAIN_EMBEDDINGS),
            settings=("retrieval_mean_k",),
        ),
        Method(
            "retrieval_weighted_comtip",
            "retrieval on CoMTIP's embeddings (mclSTExp's prediction rule, not mclSTExp): the top-k "
            "training spots by the same cosine, weighted by 1 / L1 distance²",
            "comtip.predict.methods:retrieval_weighted",
            encoder="comtip",
            needs=(TEST_EMBEDDING, TRAIN_EMBEDDINGS, SPOT_XY),
            settings=("retrieval_weighted_k", "retrieval_weighted_smooth_query"),
        ),
        Method(
            "bleep",
            "BLEEP (Xie et al. 2023) trained as itself by `train_bleep` (its ResNet-50 and "
            "expression projection heads, its soft-target loss) on CoMTIP's training spots and "
            "budget; prediction: mean expression of the top-k training spots by cosine of "
            "expression to image embedding",
            "comtip.predict.methods:bleep",
            encoder="bleep",
            needs=(TEST_EMBEDDING, TRAIN_EMBEDDINGS),
            settings=("bleep_k",),
        ),
        Method(
            "mclstexp",
            "mclSTExp (Min et al. 2024) trained as itself by `train_mclstexp` (its DenseNet-121 "
            "image encoder and identity-target CLIP loss, its spot-level Transformer over the "
            "spots of a batch with array row/column embeddings) on CoMTIP's training spots and "
            "budget; prediction: the top-k "
            "training spots by cosine of spot to image embedding, weighted by 1 / L1 distance²",
            "comtip.predict.methods:mclstexp",
            encoder="mclstexp",
            needs=(TEST_EMBEDDING, TRAIN_EMBEDDINGS),
            settings=("mclstexp_top_k",),
        ),
        _zeroshot("comtip", "CoMTIP"),
        *(_ridge(v, f"CoMTIP {what}") for v, what in ABLATION_SUMMARIES.items()),
        *(_zeroshot(v, f"CoMTIP {what}") for v, what in ABLATION_SUMMARIES.items()),
        *(
            _ridge(name, f"{p.title} ({p.source}, local weights from `foundation_models.{name}`)")
            for name, p in FOUNDATION_PRESETS.items()
        ),
        _finetune("linear", "linear probe"),
        _finetune("full", "full fine-tune"),
    )
}
BASELINE_METHODS = tuple(name for name, m in METHODS.items() if m.rule == "predict_baseline")
assert [m.name for m in METHODS.values() if m.rule == "predict_finetuned"] == [f"finetune_{x}" for x in FINETUNE_MODES]


def method(name: str) -> Method:
    """The registry entry of ``name``; a ``ValueError`` listing the known names otherwise (the
    config schema has already refused unknown names in ``evaluate.methods``)."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}") from None


def encoders_of(methods: Iterable[str]) -> list[str]:
    """The encoders (in :data:`ENCODERS` order) whose embeddings the methods ``methods`` read;
    a ``ValueError`` for an unknown name."""
    used = {method(name).encoder for name in methods}
    return [e for e in ENCODERS if e in used]


def foundation_weights(methods: Iterable[str], configured: Mapping[str, Any] | None) -> dict[str, str]:
    """The weights file of each foundation model the methods ``methods`` read, from config key
    ``foundation_models`` (preset → local file); a ConfigError naming the key when a method's
    model has no file configured or the file does not exist. Checked when the workflow is
    parsed, so that no job starts."""
    methods, configured = list(methods), dict(configured or {})
    files = {}
    for encoder in encoders_of(methods):
        if encoder not in FOUNDATION_ENCODERS:
            continue
        readers = ", ".join(m for m in methods if method(m).encoder == encoder)
        path = configured.get(encoder)
        if not path:
            raise ConfigError(
                f"config key 'foundation_models.{encoder}': not set, but evaluate.methods has {readers}; "
                f"set it to the local {FOUNDATION_PRESETS[encoder].weights_file} of "
                f"{FOUNDATION_PRESETS[encoder].source} (docs/model.md, Foundation-model presets)"
            )
        if not Path(path).expanduser().is_file():
            raise ConfigError(
                f"config key 'foundation_models.{encoder}': no such file {Path(path).expanduser().absolute()}"
            )
        files[encoder] = str(Path(path).expanduser())
    return files


def method_inputs(name: str, sample: str, pretrained: str) -> dict[str, str]:
    """The files a ``predict_baseline`` job of ``name`` on test ``sample`` reads, by role (the
    rule's named inputs, as :class:`comtip.predict.methods.PredictionContext` takes them)."""
    entry = method(name)
    inputs = {"train_values": TRAINING_VALUES}
    if TEST_EMBEDDING in entry.needs:
        inputs["test_embedding"] = EMBEDDINGS.format(encoder=entry.encoder, sample=sample)
    if TRAIN_EMBEDDINGS in entry.needs:
        inputs["train_embeddings"] = TRAINING_EMBEDDINGS.format(encoder=entry.encoder)
    if RIDGE_PROBE in entry.needs:
        inputs["ridge_probe"] = RIDGE_PROBES.format(encoder=entry.encoder)
    if PRETRAINED in entry.needs:  # the method's own encoder's checkpoint for an ablation
        inputs["checkpoint"] = pretrained_checkpoint(entry.encoder) if entry.encoder in ABLATIONS else pretrained
    return inputs


def pretrained_checkpoint(encoder: str) -> str:
    """The checkpoint an ``embed_spots`` encoder is computed from: its own for an ablation,
    CoMTIP's for ``comtip`` and ``random`` (a seeded random initialisation of its architecture)."""
    return PRETRAINED_CHECKPOINT.format(model=encoder if encoder in ABLATIONS else "comtip")


@dataclass(frozen=True)
class TrainedModel:
    """A model the workflow trains for the configured methods: its rule's checkpoint, metrics and
    Snakemake benchmark file, and the methods that read it (rule ``training_cost``)."""

    name: str
    rule: str
    checkpoint: str
    metrics: str
    benchmark: str
    methods: tuple[str, ...]


def trained_models(methods: Iterable[str]) -> list[TrainedModel]:
    """The models trained for ``methods``: CoMTIP always (the workflow's default target), each
    ablation, BLEEP and mclSTExp whose embeddings a method reads, and each fine-tuned head. A
    model's methods are those whose encoder it is, those that read its checkpoint (zero-shot) and,
    for ``comtip``, the fine-tuned heads built on it; ``random`` is an untrained initialisation."""
    methods = [method(name) for name in methods]
    pretrained = [
        m
        for m in PRETRAIN_MODELS
        if m == "comtip" or any(x.encoder == m for x in methods)  # an ablation only when read
    ]
    models = []
    for name in pretrained:
        readers = tuple(
            x.name for x in methods if x.encoder == name or (name == "comtip" and x.rule == "predict_finetuned")
        )
        models.append(
            TrainedModel(
                name,
                "pretrain",
                PRETRAINED_CHECKPOINT.format(model=name),
                f"results/models/pretrain/{name}.metrics.tsv",
                f"logs/benchmark/pretrain/{name}.tsv",
                readers,
            )
        )
    for name in ("bleep", "mclstexp"):
        readers = tuple(x.name for x in methods if x.encoder == name)
        if readers:
            models.append(
                TrainedModel(
                    name,
                    f"train_{name}",
                    f"results/models/{name}/{name}.pt",
                    f"results/models/{name}/{name}.metrics.tsv",
                    f"logs/benchmark/train_{name}/{name}.tsv",
                    readers,
                )
            )
    for x in methods:
        if x.rule == "predict_finetuned":
            mode = x.name.removeprefix("finetune_")
            models.append(
                TrainedModel(
                    x.name,
                    "finetune",
                    f"results/models/finetune/{mode}.pt",
                    f"results/models/finetune/{mode}.metrics.tsv",
                    f"logs/benchmark/finetune/{mode}.tsv",
                    (x.name,),
                )
            )
    return models


def variant_model_config(base: Mapping[str, Any], model: str) -> dict[str, Any]:
    """The ``model:`` config that pretrained model ``model`` is trained with: ``base`` (the
    configured one, as ModelConfig.to_dict gives it) for ``comtip``, with the ablation's override
    for a variant. A variant whose override changes nothing (``comtip_hash`` when the name encoder
    is already hash) is refused: it would be CoMTIP trained again under another name."""
    if model == "comtip":
        return dict(base)
    if model not in ABLATIONS:
        raise ValueError(f"unknown pretrained model {model!r}; known: {', '.join(PRETRAIN_MODELS)}")
    override = ABLATIONS[model]
    if all(base.get(k) == v for k, v in override.items()):
        raise ValueError(
            f"{model} is CoMTIP itself with this config ({override} is already the configured `model:`); "
            "use ridge_comtip / zeroshot instead"
        )
    return {**base, **override}


def method_table(methods: Mapping[str, Method] = METHODS) -> str:
    """The markdown table of the methods that ``docs/evaluation.md`` holds."""
    rows = ["| method | rule | reads | settings (`evaluate.*`) | what it is |", "|---|---|---|---|---|"]
    for m in methods.values():
        reads = ", ".join(("gene sentences", *m.needs))
        settings = ", ".join(f"`{s}`" for s in m.settings) or "—"
        rows.append(f"| `{m.name}` | `{m.rule}` | {reads} | {settings} | {m.summary} |")
    return "\n".join(rows) + "\n"

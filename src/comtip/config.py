"""Validate ``config.yaml`` and the sample sheet against the JSON schemas in ``workflow/schemas``.

Done here rather than with ``snakemake.utils.validate`` so that every error names the key or the
sample in one line, and so the checks are unit-tested without Snakemake. Defaults written in the
schemas are filled in, as Snakemake's own validation does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import jsonschema
import pandas as pd
import yaml

from comtip._core.errors import ConfigError

SPLITS = ("train", "val", "test", "predict")
# Folder names under results/ that belong to the whole cohort, not to one sample.
RESERVED_SAMPLE_NAMES = {"genes", "models", "predictions", "evaluation", "report", "provenance", "demo"}
PATH_COLUMNS = ("spaceranger_dir", "slide")
# Names a config may still use, and what they are called now (checked before the schema, so that
# an old config gets one error saying what to write instead of an enum or additional-key error).
RENAMED = {
    "evaluate.methods": {
        "bleep_comtip": "retrieval_mean_comtip",
        "mclstexp_comtip": "retrieval_weighted_comtip",
    },
    "evaluate": {
        "mclstexp_k": "retrieval_weighted_k",
        "mclstexp_smooth_query": "retrieval_weighted_smooth_query",
    },
}
RENAME_REASON = (
    "they were BLEEP's and mclSTExp's prediction rules applied to CoMTIP's embeddings, not those "
    "methods; `bleep` in evaluate.methods is now BLEEP trained as itself (docs/evaluation.md)"
)


def _with_defaults(validator_class):
    """A validator that also writes each property's ``default`` into the instance."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = sub["default"]
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_Validator = _with_defaults(jsonschema.Draft7Validator)


def _load_schema(path: str | Path) -> dict:
    with open(path) as fh:
        return yaml.safe_load(fh)


def _where(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "(top level)"


def validate_config(config: dict, schema_path: str | Path) -> dict:
    """Validate ``config`` in place (defaults filled in) and return it.

    Raises ConfigError naming the offending key, e.g. ``config key 'patches.size_px': -1 is
    less than the minimum of 16``; a renamed method or setting (:data:`RENAMED`) gets one error
    naming its new name.
    """
    _refuse_renamed(config)
    errors = sorted(_Validator(_load_schema(schema_path)).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"config key '{_where(e)}': {e.message}" for e in errors]
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines))
    _check_pseudospots(config.get("ingest", {}))
    return config


def _check_pseudospots(ingest: dict) -> None:
    diameter, pitch = ingest.get("hd_pseudospot_um"), ingest.get("hd_pseudospot_pitch_um")
    if pitch is not None and diameter is None:
        raise ConfigError("config key 'ingest.hd_pseudospot_pitch_um': set, but ingest.hd_pseudospot_um is null")
    if pitch is not None and pitch < diameter:
        raise ConfigError(
            f"config key 'ingest.hd_pseudospot_pitch_um': {pitch} is smaller than ingest.hd_pseudospot_um "
            f"{diameter} (pseudo-spot discs would overlap and a bin would count twice)"
        )


def _refuse_renamed(config: dict) -> None:
    evaluate = config.get("evaluate")
    if not isinstance(evaluate, dict):
        return
    methods = evaluate.get("methods")
    found = [
        f"'{old}' in evaluate.methods is now '{new}'"
        for old, new in RENAMED["evaluate.methods"].items()
        if isinstance(methods, list) and old in methods
    ]
    found += [f"evaluate.{old} is now evaluate.{new}" for old, new in RENAMED["evaluate"].items() if old in evaluate]
    if found:
        raise ConfigError(f"config key 'evaluate': renamed: {'; '.join(found)} ({RENAME_REASON})")


def _row_to_record(row: pd.Series) -> dict:
    record = {}
    for key, value in row.items():
        if isinstance(value, str):
            value = value.strip()
            if value == "":
                continue
        elif value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        record[key] = value
    for key in ("mpp", "spot_diameter_um", "spot_pitch_um", "bin_size_um"):
        if key in record:
            try:
                record[key] = float(record[key])
            except ValueError:
                pass  # left as a string: the schema names the column and the sample
    if isinstance(record.get("bin_size_um"), float) and record["bin_size_um"].is_integer():
        record["bin_size_um"] = int(record["bin_size_um"])
    return record


def _resolve(value: str, base: Path, run_dir: Path) -> str:
    """Absolute path for a sheet entry (relative ones are relative to the sheet's folder),
    shown relative to the working directory when it lies inside it, so that Snakemake matches
    it against rule outputs."""
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = base / path
    path = Path(*_normalise_parts(path.absolute().parts))
    try:
        return str(path.relative_to(run_dir))
    except ValueError:
        return str(path)


def _normalise_parts(parts: Iterable[str]) -> list[str]:
    # Path.resolve() would follow symlinks, which a user may rely on; only fold "..".
    out: list[str] = []
    for part in parts:
        if part == ".." and len(out) > 1:
            out.pop()
        elif part != ".":
            out.append(part)
    return out


def load_sample_sheet(
    sheet_path: str | Path,
    schema_path: str | Path,
    *,
    run_dir: str | Path = ".",
    generated_under: str | Path | None = None,
) -> pd.DataFrame:
    """Read, validate and resolve the sample sheet; index = sample name.

    Paths are resolved against the sheet's folder. A path that does not exist is an error
    naming the sample and the full path, unless it lies under ``generated_under`` (the demo
    folder that a rule of the workflow fills).
    """
    sheet_path = Path(sheet_path)
    if not sheet_path.exists():
        raise ConfigError(f"sample sheet {sheet_path.absolute()} does not exist")
    df = pd.read_csv(sheet_path, sep="\t", dtype=str, comment="#", keep_default_na=False)
    if df.empty:
        raise ConfigError(f"sample sheet {sheet_path.absolute()} lists no sample")
    schema = _load_schema(schema_path)
    run_dir = Path(run_dir).absolute()
    generated = None if generated_under is None else Path(_resolve(str(generated_under), run_dir, run_dir))
    if "sample" not in df.columns:
        raise ConfigError(
            f"sample sheet {sheet_path.absolute()}: column 'sample' is missing (columns found: {', '.join(df.columns)})"
        )
    dup = df["sample"][df["sample"].duplicated()]
    if len(dup):
        raise ConfigError(f"sample sheet {sheet_path.absolute()}: sample name {dup.iloc[0]!r} appears more than once")

    records = []
    for i, row in df.iterrows():
        record = _row_to_record(row)
        name = record.get("sample", f"(row {i + 2})")
        errors = list(_Validator(schema).iter_errors(record))
        if errors:
            lines = [f"column '{_where(e)}': {e.message}" if e.absolute_path else e.message for e in errors]
            raise ConfigError(f"sample sheet {sheet_path.absolute()}, sample {name!r}: " + "; ".join(lines))
        if name in RESERVED_SAMPLE_NAMES:
            raise ConfigError(
                f"sample sheet {sheet_path.absolute()}: sample name {name!r} is reserved "
                f"(used for cohort outputs: {', '.join(sorted(RESERVED_SAMPLE_NAMES))})"
            )
        if record["split"] != "predict" and "spaceranger_dir" not in record:
            raise ConfigError(
                f"sample sheet {sheet_path.absolute()}, sample {name!r}: split "
                f"{record['split']!r} needs a spaceranger_dir (only 'predict' samples may lack one)"
            )
        for col in PATH_COLUMNS:
            if col not in record:
                continue
            record[col] = _resolve(record[col], sheet_path.parent, run_dir)
            full = run_dir / record[col]  # absolute paths stay as they are
            is_generated = generated is not None and (
                Path(record[col]) == generated or generated in Path(record[col]).parents
            )
            if not is_generated and not full.exists():
                raise ConfigError(f"sample sheet {sheet_path.absolute()}, sample {name!r}: {col} {full} does not exist")
        records.append(record)
    out = pd.DataFrame.from_records(records).set_index("sample", drop=False)
    return out

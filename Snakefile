"""comtip-pipeline: CoMTIP on 10x Visium runs (H&E slide + Space Ranger outs/).

Entry point only: config + validation + includes. Logic lives in the `comtip` package (src/),
stages in workflow/rules/*.smk. See README.md.
"""

import sys
from pathlib import Path

from snakemake.utils import min_version

# The pinned release (pyproject.toml, envs/) is 9.27.1; the profiles' executor plugins need 9.
min_version("9.0")

# The rule scripts import the package from this checkout: put src/ first on the import path of
# this process and of every job it starts (also when the package is not pip-installed, e.g.
# `--sdm conda` before an env's post-deploy script ran). COMTIP_PIPELINE_DIR tells the conda
# envs' post-deploy scripts (envs/*.post-deploy.sh) which checkout to install into the env.
sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from comtip.config import validate_config  # noqa: E402
from comtip._core.runtime import export_pipeline_dir, prepend_pythonpath  # noqa: E402

prepend_pythonpath(Path(workflow.basedir) / "src")
export_pipeline_dir(workflow.basedir)


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


validate_config(config, Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml")


# Provenance: every run with jobs to do records config, sample sheet, package versions and git
# commit under results/provenance/{run_id}/ (comtip._core.provenance); only the main process does.
from comtip._core import provenance  # noqa: E402

RUN_RECORD = {}


onstart:
    RUN_RECORD["dir"] = provenance.start_run_record(
        "results", config, sample_sheet=config["samples"], pipeline_dir=workflow.basedir
    )
    print(f"provenance of this run: {RUN_RECORD['dir']}")


onsuccess:
    if "dir" in RUN_RECORD:
        provenance.finish_run_record(RUN_RECORD["dir"], "success")


onerror:
    if "dir" in RUN_RECORD:
        provenance.finish_run_record(RUN_RECORD["dir"], "failed")


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/ingest.smk"
include: "workflow/rules/tiling.smk"
include: "workflow/rules/patches.smk"
include: "workflow/rules/sentences.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/baselines.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/predict.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/export.smk"


# Every per-sample output of the stages implemented so far (a comment, not a docstring: snakefmt
# moves `default_target` above a rule's docstring and then cannot parse the rule).
rule all:
    default_target: True
    input:
        all_outputs,

"""comtip-pipeline: CoMTIP on 10x Visium runs (H&E slide + Space Ranger outs/).

Entry point only: config + validation + includes. Logic lives in the `comtip` package (src/),
stages in workflow/rules/*.smk. See README.md.
"""

import sys
from pathlib import Path

# The rule scripts import the package from this checkout, also inside per-rule conda envs
# and on cluster nodes, where it is not pip-installed: put src/ first on the import path of
# this process and of every job it starts.
sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from comtip.config import validate_config  # noqa: E402
from comtip.runtime import prepend_pythonpath  # noqa: E402

prepend_pythonpath(Path(workflow.basedir) / "src")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


validate_config(config, Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/ingest.smk"
include: "workflow/rules/tiling.smk"
include: "workflow/rules/patches.smk"
include: "workflow/rules/sentences.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/predict.smk"
include: "workflow/rules/evaluate.smk"


rule all:
    """Every per-sample output of the stages implemented so far."""
    input:
        all_outputs,
    default_target: True

#!/usr/bin/env bash
# Snakemake runs this inside the conda env right after creating it (--sdm conda): it installs
# this checkout's `comtip` package into the env, editable (the env follows the checkout when the
# pipeline is updated) and without dependencies (the env file pins them). The Snakefile sets
# COMTIP_PIPELINE_DIR to the checkout; on a cluster it must be on a filesystem the nodes share.
set -euo pipefail
: "${COMTIP_PIPELINE_DIR:?is set by the Snakefile: create the envs through snakemake (README)}"
python -m pip install --no-deps --no-build-isolation --disable-pip-version-check -q -e "$COMTIP_PIPELINE_DIR"
python -c "import comtip, sys; print('comtip installed from', comtip.__file__, file=sys.stderr)"

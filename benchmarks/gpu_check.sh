#!/usr/bin/env bash
# The GPU check of issue 16: pretraining throughput of ViT-B/32 at 224 px (batches 128 and 256),
# a profile of the step with its host-device syncs, kill-and-resume against an uninterrupted run,
# and the tiny workflow on the device. Python part: benchmarks/gpu_check.py (its docstring says
# what each part measures); results in OUT/gpu_check.json and OUT/gpu_check.md.
#
#   bash benchmarks/gpu_check.sh [--wheels DIR] --device cuda --out OUT     # GPU machine, < 8 min
#   bash benchmarks/gpu_check.sh --device cpu --quick --out OUT             # anywhere, a few minutes
#
# --wheels DIR: install every wheel in DIR (no index, no dependency resolution) into
# /tmp/comtip-site and put it on PYTHONPATH first; DIR/COMMIT, if there, is the commit recorded.
# The other options go to gpu_check.py.
# PYTHON (default python3) is the interpreter. A failed install is reported, not fatal: the parts
# that need nothing from it still run, and the JSON names what could not be imported.
#
# ---- On the lent H200 machine (docs/gpu.md says why each step) -------------------------------
# 1. Here, in the repository root (.gitignore ignores .whl/): the wheels the machine lacks, for
#    its Python 3.12 (~40 MB; the working tree travels within 64 MiB), and the commit:
#
#      mkdir -p .whl && python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
#        -d .whl $(grep -v '^#' benchmarks/gpu_wheels.txt)
#      python3 -m pip wheel --no-deps -w .whl connection-pool==0.0.3    # published as source only
#      git rev-parse --short HEAD > .whl/COMMIT && du -sh .whl           # the copy there has no .git
#
# 2. One device call, timeout_s 570 (no part starts after 400 s; the last is stopped at 490 s):
#
#      run(command="mkdir -p $OUT && bash benchmarks/gpu_check.sh --wheels .whl --device cuda
#          --out $OUT 2>&1 | tee $OUT/console.log", carry=[".whl"], timeout_s=570)
#
# 3. Here, from the files that came back (files_at):
#      python benchmarks/gpu_check.py --from-json FILES_AT/gpu_check.json --markdown BENCHMARKS.md
# -------------------------------------------------------------------------------------------------
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
original="$*"
python="${PYTHON:-python3}"
wheels=""
args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --wheels)
            wheels="${2:?--wheels needs a folder}"
            shift 2
            ;;
        *)
            args+=("$1")
            shift
            ;;
    esac
done

echo "gpu_check.sh: $(date -u +%FT%TZ) on $(uname -nm), $(nproc) cores; python: $("$python" -V 2>&1)"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi

if [[ -n "$wheels" ]]; then
    shopt -s nullglob
    found=("$wheels"/*.whl)
    shopt -u nullglob
    if [[ ${#found[@]} -eq 0 ]]; then
        echo "gpu_check.sh: no wheels in $wheels; going on with what is installed" >&2
    else
        site=/tmp/comtip-site
        started=$SECONDS
        if "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$site" "${found[@]}"; then
            echo "gpu_check.sh: installed ${#found[@]} wheels into $site in $((SECONDS - started)) s"
        else
            echo "gpu_check.sh: installing the wheels failed; going on with what is installed" >&2
        fi
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi

if [[ -n "$wheels" && -f "$wheels/COMMIT" ]]; then
    args+=(--commit "$(tr -d '[:space:]' <"$wheels/COMMIT")")
fi
export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
cd "$repo" || exit 1
exec "$python" benchmarks/gpu_check.py --command "bash benchmarks/gpu_check.sh $original" "${args[@]}"

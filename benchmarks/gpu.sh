#!/usr/bin/env bash
# The scale benchmark on a GPU machine whose Python already has torch, transformers, peft and
# accelerate but cannot reach a package index: the missing packages travel as wheels.
#
#   bash benchmarks/gpu.sh wheels      # here, with PyPI: wheels for the GPU machine's Python into .whl/
#   bash benchmarks/gpu.sh run OUT     # there: install .whl/, then both presets at full size -> OUT/*.json
#
# `run` gives each preset at most $SCALE_TIMEOUT seconds (default 240), so one slow preset cannot
# eat the other's time; each writes OUT/<preset>.json and OUT/<preset>.log.
set -euo pipefail
cd "$(dirname "$0")/.."

# Not in the GPU image (or a version too old for this project); versions as requirements/constraints.txt pins them.
WHEELS=(diffusers==0.42.1 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5)
PYVER=${PYVER:-3.12}

case "${1:-}" in
wheels)
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    rm -rf .whl && mkdir -p .whl
    # pip matches a platform tag exactly: offer the manylinux generations these wheels use.
    platforms=()
    for tag in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_27_x86_64 manylinux_2_28_x86_64 manylinux1_x86_64; do
        platforms+=(--platform "$tag")
    done
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
        "${platforms[@]}" -d .whl "${WHEELS[@]}"
    ls -la .whl
    ;;
run)
    out=${2:?usage: benchmarks/gpu.sh run OUT}
    mkdir -p "$out"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
    status=0
    for preset in sd35m_pickscore flux1dev_pickscore; do
        timeout "${SCALE_TIMEOUT:-240}" python3 benchmarks/scale.py --preset "configs/presets/$preset.yaml" \
            --device cuda --json "$out/$preset.json" 2>&1 | tee "$out/$preset.log" || status=1
    done
    exit $status
    ;;
*)
    sed -n '2,9p' "$0"
    exit 2
    ;;
esac

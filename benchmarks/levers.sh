#!/usr/bin/env bash
# Levers of the embedded task (issue: RL must clearly learn): trains every configuration listed in
# a plan file, JOBS (default 2) runs at a time with one thread each, and prints each run's eval curve.
# Plan lines: `NAME VARIANT [--set key=value ...]`; '#' starts a comment. Every run uses the tuning
# seed of params.yaml (never a study seed), its own MLflow store (two processes creating one new
# sqlite store race in its schema migration) and OUT_DIR as runs_dir; finished runs are kept.
# Usage: bash benchmarks/levers.sh PLAN OUT_DIR   (then: python benchmarks/levers_table.py OUT_DIR)
set -euo pipefail
plan=$(realpath "${1:?usage: levers.sh PLAN OUT_DIR}")
out=$(realpath -m "${2:?usage: levers.sh PLAN OUT_DIR}")
mkdir -p "$out"
run_line() {
  local name=$1 variant=$2; shift 2
  [ -f "$out/$name/metrics.json" ] && return 0
  tpgrpo train --variant "$variant" --run-name "$name" --restart \
    --set "runs_dir=$out" --set "tracking.uri=sqlite:///$out/$name.db" --set train.num_threads=1 "$@" \
    > "$out/$name.log" 2>&1 || echo "FAILED: $name (see $out/$name.log)"
  echo "done: $name"
}
export -f run_line
export out
grep -v '^\s*\(#\|$\)' "$plan" | xargs -P "${JOBS:-2}" -L 1 bash -c 'run_line "$@"' _

#!/usr/bin/env bash
# The embedded default's EMA, chosen by measurement: flow_grpo and tp_grpo for params.yaml's 10
# epochs on seed 42 (the tuning seed), evaluated with the EMA warm-up at decay 0.9 every step, the
# published cadence (0.9 every 8 optimizer steps), and the raw weights (no EMA). Two runs at a
# time, one thread each; finished runs are kept. Usage: bash benchmarks/ema_choice.sh OUT_DIR  (then read OUT_DIR/*/metrics.json)
set -euo pipefail
out=$(realpath -m "${1:?usage: ema_choice.sh OUT_DIR}")
mkdir -p "$out"
run() {  # variant setting-name overrides...
  local variant=$1 name=$2; shift 2
  # A store per run: two processes creating one new sqlite store race in its schema migration.
  [ -f "$out/$variant-$name/metrics.json" ] || tpgrpo train --variant "$variant" --run-name "$variant-$name" \
    --set "runs_dir=$out" --set "tracking.uri=sqlite:///$out/$variant-$name.db" --set train.num_threads=1 "$@" \
    > "$out/$variant-$name.log" 2>&1
}
for variant in flow_grpo tp_grpo; do
  run "$variant" ema-every-1 --set train.ema_decay=0.9 --set train.ema_every=1 &
  run "$variant" ema-every-8 --set train.ema_decay=0.9 --set train.ema_every=8
  wait
  run "$variant" raw --set train.ema_decay=null
done
for f in "$out"/*/metrics.json; do
  printf '%s\t%s\n' "$(basename "$(dirname "$f")")" "$(python -c "import json,sys; m=json.load(open(sys.argv[1])); print(m['eval_reward_initial'], m['eval_reward'], m['minutes'])" "$f")"
done

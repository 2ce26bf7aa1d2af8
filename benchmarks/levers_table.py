"""Print the runs of a lever study (benchmarks/levers.sh) as one table: eval reward per evaluated
epoch (test prompts; and the held-in train prompts when the run evaluated them), gain over the
base model, minutes. Usage: python benchmarks/levers_table.py OUT_DIR"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path


def main(out: Path) -> None:
    for run in sorted(p for p in out.iterdir() if (p / "metrics.json").exists()):
        metrics = json.loads((run / "metrics.json").read_text())
        rows = list(csv.DictReader((run / "history.csv").open()))
        base = metrics["eval_reward_initial"]
        curve = " ".join(
            f"{int(float(r['epoch']))}:{float(r['eval/reward']) - base:+.3f}" for r in rows if r.get("eval/reward")
        )
        heldin = metrics.get("eval_train_reward")
        heldin_initial = metrics.get("eval_train_reward_initial")
        held = f" held-in {heldin_initial:.3f}->{heldin:.3f}" if heldin is not None else ""
        print(
            f"{run.name:40s} base {base:.3f} final {metrics['eval_reward']:.3f} "
            f"gain {metrics['eval_reward'] - base:+.3f}{held} [{curve}] {metrics['minutes']:.1f} min"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]))

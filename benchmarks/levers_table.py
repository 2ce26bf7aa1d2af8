"""Print the runs of a lever study (benchmarks/levers.sh) as one table: eval reward per evaluated
epoch (test prompts; and the held-in train prompts when the run evaluated them), gain over the
base model, minutes. Usage: python benchmarks/levers_table.py OUT_DIR"""

from __future__ import annotations

import sys
from pathlib import Path

from tpgrpo.rundir import read_run


def main(out: Path) -> None:
    for run in (read_run(p) for p in sorted(out.iterdir()) if p.is_dir()):
        if not run.ok or run.base_reward is None:
            continue
        base = run.base_reward
        curve = " ".join(f"{epoch}:{value - base:+.3f}" for epoch, value in run.reward_curve() if epoch > 0)
        final, initial = run.details(), run.details(initial=True)
        held = ""
        if "train_reward" in final and "train_reward" in initial:
            held = f" held-in {initial['train_reward']:.3f}->{final['train_reward']:.3f}"
        minutes = "n/a" if run.minutes is None else f"{run.minutes:.1f}"
        print(
            f"{run.name:40s} base {base:.3f} final {run.reward:.3f} "
            f"gain {run.reward - base:+.3f}{held} [{curve}] {minutes} min"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]))

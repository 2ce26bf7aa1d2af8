"""What one training epoch costs: TP-GRPO against Flow-GRPO, split into rollout, scoring, credit
and update, on the same config (params.yaml unless told otherwise).

Each variant is a real :class:`tpgrpo.trainer.Trainer` (a ``NullTracker``, a temporary
``runs_dir``), driven step by step as ``Trainer.fit`` drives it: ``rollout`` -> ``score`` ->
``credit`` -> ``update`` (evaluation and checkpoints left out: they cost the same for every
variant). Scoring runs in a background thread while the next batch is sampled, so two figures
are given for it: the reward work itself (summed over batches, partly hidden behind the
rollout) and the time ``score`` still waits after the rollout. Besides ``flow_grpo`` and
``tp_grpo`` (full ODE completions), TP-GRPO runs with the cheaper completion estimators.

Every trainer first runs one untimed epoch (CPU kernels are set up per shape on first use); the
timed epochs then alternate between the variants, so a change in the machine's load hits them
alike, and each variant's fastest of ``--rounds`` epochs is printed (on a loaded machine an
epoch can take many times its cost; the step split is that epoch's).

    python benchmarks/epoch_cost.py [--params params.yaml] [--rounds 3] [--set sample.batch_size=16 ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch

from tpgrpo.config import load_config
from tpgrpo.tracking import NullTracker
from tpgrpo.trainer import Trainer

# name -> (variant of params.yaml, extra overrides)
VARIANTS = {
    "flow_grpo": ("flow_grpo", []),
    "tp_grpo (ode)": ("tp_grpo", []),
    "tp_grpo one_step": ("tp_grpo", ["sample.completion=one_step"]),
    "tp_grpo coarse m=2": ("tp_grpo", ["sample.completion=coarse", "sample.completion_steps=2"]),
}
STEPS = ("rollout", "scoring work", "score wait", "credit", "update")


@dataclass
class Timed:
    """A trainer whose reward computation is timed, and its epochs' step times."""

    trainer: Trainer
    reward_seconds: float = 0.0
    epochs: list[dict[str, float]] = field(default_factory=list)
    rows: int = 0

    def __post_init__(self) -> None:
        score_batch = self.trainer.score_batch

        def timed(*args):
            start = time.perf_counter()
            try:
                return score_batch(*args)
            finally:
                self.reward_seconds += time.perf_counter() - start

        # An instance attribute: Trainer.rollout submits self.score_batch to its thread.
        self.trainer.score_batch = timed

    def epoch(self, epoch: int) -> dict[str, float]:
        t = self.trainer
        self.reward_seconds = 0.0
        start = time.perf_counter()
        samples = t.rollout(epoch)
        rolled = time.perf_counter()
        scores = t.score(samples)
        scored = time.perf_counter()
        credit = t.credit(samples, scores)
        credited = time.perf_counter()
        t.update(samples, credit)
        done = time.perf_counter()
        self.rows = sum(b.rollout.stats.rows for b in samples.batches)
        return {
            "rollout": rolled - start,
            "scoring work": self.reward_seconds,
            "score wait": scored - rolled,
            "credit": credited - scored,
            "update": done - credited,
            "epoch": done - start,
        }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--rounds", type=int, default=3, help="timed epochs per variant")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="dotted override, repeatable")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="tpgrpo-epoch-cost-") as runs_dir:
        timed: dict[str, Timed] = {}
        for name, (variant, extra) in VARIANTS.items():
            cfg = load_config(args.params, variant=variant, overrides=[f"runs_dir={runs_dir}", *args.overrides, *extra])
            timed[name] = Timed(Trainer(cfg, variant=name.replace(" ", "_"), tracker=NullTracker(), resume=False))
            timed[name].epoch(0)  # warm-up
        for r in range(args.rounds):
            for run in timed.values():
                run.epochs.append(run.epoch(1 + r))
        for run in timed.values():
            run.trainer.executor.shutdown()

    s = cfg.sample
    print(f"params={args.params} {' '.join(args.overrides)} | {s.batches_per_epoch} batches x {s.batch_size} "
          f"trajectories ({s.batch_size // s.group_size} prompts x {s.group_size}), steps={s.num_steps} "
          f"window={s.window_size} cfg={s.guidance_scale} threads={args.threads}; fastest of {args.rounds} epochs, seconds")
    print(f"{'variant':<19} " + " ".join(f"{c:>12}" for c in (*STEPS, "epoch")) + f" {'x flow':>7} {'rows':>6}")
    fastest = {name: min(run.epochs, key=lambda e: e["epoch"]) for name, run in timed.items()}
    for name, run in timed.items():
        best = fastest[name]
        print(f"{name:<19} " + " ".join(f"{best[c]:>12.2f}" for c in (*STEPS, "epoch"))
              + f" {best['epoch'] / fastest['flow_grpo']['epoch']:>7.2f} {run.rows:>6d}")
    print(json.dumps({name: run.epochs for name, run in timed.items()}), file=sys.stderr)


if __name__ == "__main__":
    main()

"""Completion estimators against the full ODE completion: what R_k costs, and how faithful it is.

TP-GRPO scores every intermediate state z_k by the reward R_k of its ODE completion. The
estimators of ``RolloutConfig.completion`` replace that completion by something cheaper
(``one_step``: the one-step prediction z_k - sigma v(z_k); ``coarse``: m Euler steps on a sub-grid
of the remaining schedule). This script samples the same trajectories once per estimator — same
prompts, same x_T and the same SDE noise, so the states z_k agree up to float rounding (the
batches of the forwards differ) — and reports, for the hard and the graded (``soft=True``)
verifiable reward:

- cost: rollout seconds (wall, all batches), transformer calls and rows, of which completions;
- fidelity of R_k: Spearman rank correlation with the full-completion R_k, per k (k < W; R_W is
  the final image in every mode) and pooled over k, and of the increments d_k = R_k - R_{k-1},
  pooled, plus how often sign(d_k) agrees (turning points are defined by those signs);
- turning points: precision / recall of ``assign_credit(R, turning_point)``'s ``detected`` (before
  balancing) and ``turning`` (after) masks against those of the full completion, per batch.

Defaults mirror training (params.yaml): the embedded base model at its 32 px, 10 steps, window 9
from the first step, cps at noise 0.7, CFG 2.0, batches of 32 trajectories = 4 train prompts x 8,
drawn as epoch 0 of the trainer draws them.

    python benchmarks/completion_estimators.py [--batches 2] [--coarse 2 3 5] [--repeats 3] [--model models/base]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass, field, replace

import torch
from scipy.stats import spearmanr
from torch import Tensor

from tpgrpo.credit import CreditConfig, assign_credit
from tpgrpo.data import GroupPlan, epoch_batches, load_prompt_set
from tpgrpo.models import load_adapter
from tpgrpo.rewards import build_reward
from tpgrpo.rollout import Rollout, RolloutConfig, rollout
from tpgrpo.scoring import reward_sequence

REWARDS = {"verifiable (hard)": {}, "verifiable (soft)": {"soft": True}}


@dataclass
class Run:
    """One estimator over all batches: cost, R per reward (one [B, W+1] per batch), and the
    seconds of each round of each batch."""

    name: str
    seconds: float
    passes: int
    rows: int
    completion_rows: int
    R: dict[str, list[Tensor]]
    max_state_diff: float
    round_seconds: list[list[float]] = field(default_factory=list)


def _spearman(a: Tensor, b: Tensor) -> float:
    """Rank correlation of two 1-D samples (ties get average ranks); NaN when one is constant."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input: scipy warns and returns NaN
        return float(spearmanr(a.numpy(), b.numpy()).statistic)


def _agreement(pred: Tensor, true: Tensor) -> str:
    """``count precision recall`` of a predicted mask against the reference one."""
    hits = int((pred & true).sum())
    n_pred, n_true = int(pred.sum()), int(true.sum())
    precision, recall = (hits / n_pred if n_pred else math.nan), (hits / n_true if n_true else math.nan)
    return f"{n_pred:>4d} {precision:>5.2f} {recall:>5.2f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/base")
    parser.add_argument("--prompts", default="data/prompts/train.jsonl")
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32, help="trajectories per batch")
    parser.add_argument("--group", type=int, default=8, help="trajectories per prompt")
    parser.add_argument("--coarse", type=int, nargs="*", default=[2, 3, 5], help="completion_steps of coarse runs")
    parser.add_argument("--num-steps", type=int, default=10)
    parser.add_argument("--window", type=int, default=9)
    parser.add_argument("--guidance-scale", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3, help="timed rollouts of each estimator per batch")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    adapter = load_adapter(args.model)
    prompt_set = load_prompt_set(args.prompts)
    plan = GroupPlan(batch_size=args.batch, group_size=args.group, batches_per_epoch=args.batches, num_processes=1)
    batches = [prompt_set.take(idx.tolist()) for idx in epoch_batches(plan, len(prompt_set), seed=args.seed, epoch=0)]
    base = RolloutConfig(
        num_steps=args.num_steps, window_start=0, window_size=args.window, noise_level=0.7, sampler="cps",
        guidance_scale=args.guidance_scale, completions=True,
    )
    estimators = {"ode": base, "one_step": replace(base, completion="one_step")}
    estimators |= {f"coarse m={m}": replace(base, completion="coarse", completion_steps=m) for m in args.coarse}
    rewards = {name: build_reward("verifiable", **options) for name, options in REWARDS.items()}

    # The same x_T and SDE noise for every estimator, batch by batch.
    generator = torch.Generator().manual_seed(args.seed)
    inputs = []
    for chosen in batches:
        x_T = adapter.prepare_latents(len(chosen), generator)
        noise = torch.randn((len(chosen), args.window, *x_T.shape[1:]), generator=generator)
        inputs.append((x_T, noise))
    # Warm-up: the CPU kernels are set up per input shape on first use, and every estimator
    # forwards its own row counts; one untimed first batch each keeps that out of the timings.
    for cfg in estimators.values():
        rollout(adapter, batches[0].prompts, cfg, latents=inputs[0][0], noise=inputs[0][1])

    runs = {name: Run(name, 0.0, 0, 0, 0, {r: [] for r in rewards}, 0.0) for name in estimators}
    sampled: dict[str, Rollout] = {}
    score_seconds = dict.fromkeys(rewards, 0.0)
    # Estimators alternate within each batch, round after round, so a change in the machine's
    # load hits them alike; a batch's seconds are the best of the rounds (the samples are the same
    # in every round), the least disturbed by other work on a shared machine.
    for b, (chosen, (x_T, noise)) in enumerate(zip(batches, inputs)):
        seconds: dict[str, list[float]] = {name: [] for name in estimators}
        for _ in range(args.repeats):
            for name, cfg in estimators.items():
                start = time.perf_counter()
                ro = rollout(adapter, chosen.prompts, cfg, latents=x_T, noise=noise)
                seconds[name].append(time.perf_counter() - start)
                sampled[name] = ro
        for name, ro in sampled.items():
            run = runs[name]
            run.seconds += min(seconds[name])
            run.round_seconds.append(seconds[name])
            run.passes += ro.stats.passes
            run.rows += ro.stats.rows
            run.completion_rows += ro.stats.completion_rows
            run.max_state_diff = max(run.max_state_diff, float((ro.latents - sampled["ode"].latents).abs().max()))
            for reward_name, fn in rewards.items():
                start = time.perf_counter()
                run.R[reward_name].append(reward_sequence(ro, chosen.prompts, chosen.metadata, fn).R)
                score_seconds[reward_name] += time.perf_counter() - start

    W, n = args.window, args.batch * args.batches
    ode = runs["ode"]
    print(f"model={args.model} trajectories={n} ({args.batches} batches of {args.batch} = "
          f"{args.batch // args.group} prompts x {args.group}) steps={args.num_steps} window={W} "
          f"cfg={args.guidance_scale} threads={args.threads}")
    print(f"cost (all batches; best of {args.repeats} alternated rounds; the same (W+1)B images are "
          "decoded and scored in every mode):")
    print(f"  {'estimator':<12} {'rollout s':>9} {'x ode':>6} {'calls':>6} {'rows':>7} {'compl. rows':>11} {'max|dz|':>8}")
    for run in runs.values():
        print(f"  {run.name:<12} {run.seconds:>9.2f} {run.seconds / ode.seconds:>6.2f} {run.passes:>6d} "
              f"{run.rows:>7d} {run.completion_rows:>11d} {run.max_state_diff:>8.1e}")
    print("  scoring s per estimator: " + ", ".join(f"{r} {s / len(runs):.2f}" for r, s in score_seconds.items()))

    credit = CreditConfig(mode="turning_point")
    for reward_name in rewards:
        full = ode.R[reward_name]
        R_full = torch.cat(full)
        d_full = R_full.diff(dim=1)
        credit_full = [assign_credit(R.double(), credit) for R in full]
        print(f"\n{reward_name}: full-completion R_k mean {R_full[:, :W].mean():.3f}, final {R_full[:, W].mean():.3f}; "
              f"turning points {sum(int(c.turning.sum()) for c in credit_full)} "
              f"(detected {sum(int(c.detected.sum()) for c in credit_full)}) in {n} trajectories")
        print(f"  {'':<12} {'':>7} {'':>7} {'':>6} {'detected (n P R)':>16} {'turning (n P R)':>16}")
        print(f"  {'estimator':<12} {'rho R_k':>7} {'rho d_k':>7} {'sign d':>6} "
              f"{'':>16} {'':>16}   rho R_k per k = 0..{W - 1}")
        for run in runs.values():
            if run is ode:
                continue
            est = run.R[reward_name]
            R_est = torch.cat(est)
            d_est = R_est.diff(dim=1)
            credit_est = [assign_credit(R.double(), credit) for R in est]
            detected = _agreement(torch.cat([c.detected for c in credit_est]), torch.cat([c.detected for c in credit_full]))
            turning = _agreement(torch.cat([c.turning for c in credit_est]), torch.cat([c.turning for c in credit_full]))
            per_k = [_spearman(R_est[:, k], R_full[:, k]) for k in range(W)]
            sign = float((torch.sign(d_est) == torch.sign(d_full)).float().mean())
            print(f"  {run.name:<12} {_spearman(R_est[:, :W].flatten(), R_full[:, :W].flatten()):>7.3f} "
                  f"{_spearman(d_est.flatten(), d_full.flatten()):>7.3f} {sign:>6.3f} "
                  f"{detected:>16} {turning:>16}   "
                  + " ".join(f"{r:.2f}" for r in per_k))
    print(json.dumps({run.name: run.round_seconds for run in runs.values()}), file=sys.stderr)


if __name__ == "__main__":
    main()

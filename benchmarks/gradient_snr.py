"""Why the credit modes train differently: their policy gradients on the same rollouts.

Flow-GRPO, incremental credit and TP-GRPO differ only in the advantages they put on each SDE
step, so on one set of rollouts their updates can be compared directly. This script samples
``--batches`` rollout batches of the base model once (a real :class:`tpgrpo.trainer.Trainer`, a
``NullTracker``, a temporary ``runs_dir``), scores them once, and for each credit mode

- computes credit and advantages on those scores (``Trainer.credit``, the mode's ``credit`` and
  ``advantage`` sections as the params file's variant defines them);
- takes the policy gradient of every batch alone: ``PolicyUpdate.accumulate`` on its kept rows, the
  training loss at importance ratio 1 (fresh rollouts), i.e. exactly what one optimizer step of
  training sees before clipping (with ``train.gradient_accumulation`` 1);
- reports, over the N batch gradients g_1..g_N (flattened trainable parameters, float64):
  the pooled gradient's norm, the mean batch norm, the signal-to-noise ratio of the pooled
  gradient (its norm over the norm of its standard error), that of one batch's gradient with
  the noise taken out of its signal, the mean cosine of each g_b with the mean of the other
  batches, the share of kept rows and turning points; and the cosine between every two modes'
  pooled gradients.

A mode whose batch gradients point the same way (high SNR, high leave-one-out cosine) gives
steps that add up; a low one gives steps that mostly cancel. Batch gradients g_b = mu + noise
(covariance S) give E||gbar||^2 = ||mu||^2 + tr(S)/N against a squared standard error of
tr(S)/N on average, so SNR^2 is about 1 + N ||mu||^2 / tr(S): pure noise reads SNR ~ 1 and
leave-one-out cosine ~ 0. Modes whose advantages mostly agree (incremental and turning_point
differ only at turning points) also share their batches' noise: a high cosine between their
pooled gradients says that their advantages agree, not that both found the same signal. The
modes:

- ``outcome``: Flow-GRPO (variant ``flow_grpo``);
- ``incremental``: r_k = R_k - R_{k-1} (variant ``incremental``);
- ``turning_point``: TP-GRPO with all options (variant ``tp_grpo``);
- ``published``: TP-GRPO as the published code computes it (variant ``tp_grpo_published``),
  except its independent-noise R_0: every mode keeps the same rollouts, whose R_0 comes from
  the trajectory's own x_T (``sample.baseline_noise=shared``). With one process,
  ``balance_scope=process`` pools the whole batch, so only ``balance_key=trajectory`` differs.

With the LoRA adapter freshly initialised (B = 0) the gradient of every LoRA A matrix is zero:
the vectors compared are, in effect, those of the B matrices.

    python benchmarks/gradient_snr.py [--params params.yaml] [--batches 8] [--batch-size 32]
        [--seed 7] [--threads 1] [--set KEY=VALUE ...] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from tpgrpo.config import ExperimentConfig, config_from_dict, read_yaml_mapping
from tpgrpo.steps import EpochCredit, EpochSamples
from tpgrpo.trainer import Trainer

# mode -> the params.yaml variant whose credit and advantage sections define it
MODES: dict[str, str] = {
    "outcome": "flow_grpo",
    "incremental": "incremental",
    "turning_point": "tp_grpo",
    "published": "tp_grpo_published",
}
# Sections a mode takes from its variant; any other difference of the variant is listed as
# not applied, since every mode reuses the same rollouts.
CREDIT_SECTIONS = ("credit", "advantage")
# Why a variant's setting outside those sections matters, where it is known to.
NOT_APPLIED_WHY = {
    "sample.baseline_noise": "the published code's independent-noise R_0 is NOT included: all modes keep the same "
    "rollouts, whose R_0 is the ODE image of the trajectory's own x_T",
}


# ---------------------------------------------------------------------------- statistics


def cosine(a: Tensor, b: Tensor) -> float:
    """Cosine of two vectors of shape [P]; NaN when either is zero (no direction)."""
    norms = float(a.norm() * b.norm())
    return float(a @ b) / norms if norms > 0 else math.nan


def snr(G: Tensor) -> float:
    """Signal-to-noise ratio of the mean of N vectors: the norm of the mean over the norm of its
    standard error.

    Args:
        G: [N, P], N >= 2 vectors (one per row).

    Returns:
        ``||gbar|| / sqrt(sum_b ||g_b - gbar||^2 / (N (N - 1)))`` with ``gbar`` the mean row;
        ``inf`` when all rows are equal and non-zero, NaN when they are all zero. Pure noise
        (rows of mean zero) reads about 1: ``||gbar||`` is then its own standard error.
    """
    N = G.shape[0]
    if N < 2:
        raise ValueError(f"G: expected at least 2 rows, got {N}")
    mean = G.mean(dim=0)
    stderr = math.sqrt(float(((G - mean) ** 2).sum()) / (N * (N - 1)))
    signal = float(mean.norm())
    if stderr == 0:
        return math.inf if signal > 0 else math.nan
    return signal / stderr


def batch_snr(G: Tensor) -> float:
    """Signal-to-noise ratio of one row, ``||mu|| / sqrt(tr S)`` for rows drawn with mean mu and
    covariance S, with the noise taken out of the signal.

    Args:
        G: [N, P], N >= 2 vectors.

    Returns:
        ``sqrt(max(||gbar||^2 - se^2, 0) / v)`` with ``se^2 = sum_b ||g_b - gbar||^2 / (N (N-1))``
        and ``v = sum_b ||g_b - gbar||^2 / (N - 1)``: ``||gbar||^2 - se^2`` estimates ``||mu||^2``
        without bias (``E||gbar||^2 = ||mu||^2 + tr S / N``), ``v`` estimates ``tr S``. Equal to
        ``sqrt(max(snr^2 - 1, 0) / N)``; 0 when ``||gbar||`` is no larger than its standard error,
        ``inf`` when all rows are equal and non-zero, NaN when they are all zero. One batch's
        gradient is one optimizer step's: this is how much of a step points the pooled way.
    """
    N = G.shape[0]
    if N < 2:
        raise ValueError(f"G: expected at least 2 rows, got {N}")
    mean = G.mean(dim=0)
    spread = float(((G - mean) ** 2).sum())
    signal2 = float(mean @ mean) - spread / (N * (N - 1))
    if spread == 0:
        return math.inf if signal2 > 0 else math.nan
    return math.sqrt(max(signal2, 0.0) / (spread / (N - 1)))


def leave_one_out_cosines(G: Tensor) -> Tensor:
    """Cosine of each row with the mean of the other rows.

    Args:
        G: [N, P], N >= 2 vectors.

    Returns:
        [N] float64; NaN where the row or the mean of the others is zero.
    """
    N = G.shape[0]
    if N < 2:
        raise ValueError(f"G: expected at least 2 rows, got {N}")
    others = (G.sum(dim=0, keepdim=True) - G) / (N - 1)  # [N, P]
    norms = G.norm(dim=1) * others.norm(dim=1)
    dots = (G * others).sum(dim=1)
    return torch.where(norms > 0, dots / norms, torch.full_like(dots, math.nan)).to(torch.float64)


def cosine_matrix(V: Tensor) -> Tensor:
    """Cosines between every two rows.

    Args:
        V: [M, P], M vectors.

    Returns:
        [M, M] float64, entry (i, j) the cosine of rows i and j; NaN in the row and column of a
        zero vector.
    """
    norms = V.norm(dim=1)
    outer = norms[:, None] * norms[None, :]
    dots = V @ V.T
    return torch.where(outer > 0, dots / outer, torch.full_like(dots, math.nan)).to(torch.float64)


def kept_fraction(keep: list[Tensor]) -> float:
    """Share of rows kept for the update, over batches of [B_b] bool masks."""
    total = sum(k.numel() for k in keep)
    return sum(int(k.sum()) for k in keep) / total if total else math.nan


@dataclass(frozen=True)
class GradientStats:
    """Statistics of N batch gradients (see :func:`gradient_stats`).

    Attributes:
        pooled_norm: ``||gbar||``, the norm of the mean gradient.
        batch_norm: mean of ``||g_b||``.
        snr: :func:`snr` of the batch gradients (the pooled gradient's).
        batch_snr: :func:`batch_snr`, the signal-to-noise ratio of one batch's gradient.
        loo_cosine: mean of :func:`leave_one_out_cosines` over the batches where it is defined.
    """

    pooled_norm: float
    batch_norm: float
    snr: float
    batch_snr: float
    loo_cosine: float


def gradient_stats(G: Tensor) -> GradientStats:
    """:class:`GradientStats` of the rows of G ([N, P], N >= 2)."""
    loo = leave_one_out_cosines(G)
    defined = loo[~loo.isnan()]
    return GradientStats(
        pooled_norm=float(G.mean(dim=0).norm()),
        batch_norm=float(G.norm(dim=1).mean()),
        snr=snr(G),
        batch_snr=batch_snr(G),
        loo_cosine=float(defined.mean()) if defined.numel() else math.nan,
    )


# ---------------------------------------------------------------------------- the measurement


@dataclass
class ModeResult:
    """One credit mode on the shared rollouts.

    Attributes:
        variant: the params variant its credit comes from.
        stats: statistics of its batch gradients.
        kept: share of rows kept for the update.
        active_batches: batches with at least one kept row (the others give a zero gradient).
        turning_rate: share of (row, step) pairs credited as turning points.
        clip_fraction: mean share of rows outside the clip range (0 expected: ratio 1).
        not_applied: the variant's settings outside credit/advantage that the shared rollouts
            leave out, dotted name -> value.
        notes: those settings, and why a setting has no effect here, one line each.
        credit_seconds: ``Trainer.credit``.
        gradient_seconds: the backward passes of all batches.
    """

    variant: str
    stats: GradientStats
    kept: float
    active_batches: int
    turning_rate: float
    clip_fraction: float
    not_applied: dict[str, object]
    notes: list[str]
    credit_seconds: float
    gradient_seconds: float


@dataclass(frozen=True)
class BatchGradients:
    """G [N, P] float64 on the CPU, one flattened gradient per batch, and each batch's clip
    fraction."""

    G: Tensor
    clip_fraction: list[float]


def batch_gradients(trainer: Trainer, samples: EpochSamples, credit: EpochCredit) -> BatchGradients:
    """The policy gradient of each rollout batch alone, as one training step would accumulate it
    (mean over the batch's kept rows and the window's steps), flattened over the trainable
    parameters in their order."""
    params = list(trainer.policy.trainable.values())
    trainer.policy.ddp_transformer.train()  # as Trainer.update runs the backward passes
    rows, clipped = [], []
    for batch, adv, keep in zip(samples.batches, credit.advantages, credit.keep):
        trainer.policy.optimizer.zero_grad(set_to_none=True)
        terms: dict[str, float] = {}
        trainer.updater.accumulate(batch.rollout, adv, keep, int(keep.sum()), terms, sync=True)
        # A parameter the loss does not reach keeps grad None: its gradient is zero.
        rows.append(torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten().to("cpu", torch.float64)
            for p in params
        ]))
        clipped.append(terms["clip_fraction"])
    trainer.policy.optimizer.zero_grad(set_to_none=True)
    return BatchGradients(torch.stack(rows), clipped)


def _not_applied(variant_cfg: ExperimentConfig, rollout_cfg: ExperimentConfig) -> dict[str, object]:
    """The variant's settings, outside the credit sections, that differ from the rollouts'."""
    ours = rollout_cfg.flat()
    return {
        key: value
        for key, value in variant_cfg.flat().items()
        if key.split(".")[0] not in CREDIT_SECTIONS and ours.get(key) != value
    }


def _notes(cfg: ExperimentConfig, variant: str, not_applied: dict[str, object], num_processes: int) -> list[str]:
    """One line per setting of the mode that the benchmark leaves out or that has no effect here."""
    notes = [
        f"{key}={value} of variant {variant} not applied" + (f": {NOT_APPLIED_WHY[key]}" if key in NOT_APPLIED_WHY else "")
        for key, value in not_applied.items()
    ]
    if cfg.credit.mode == "turning_point" and cfg.credit.balance and cfg.credit.balance_scope == "process" and num_processes == 1:
        notes.append("balance_scope=process with 1 process pools the whole batch, as balance_scope=batch does")
    return notes


def _fmt(x: float, width: int, digits: int) -> str:
    return f"{x:>{width}.{digits}f}" if math.isfinite(x) else f"{x!s:>{width}}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--batches", type=int, default=8, help="rollout batches N (>= 2)")
    parser.add_argument("--batch-size", type=int, default=None, help="trajectories per batch (default: sample.batch_size)")
    parser.add_argument("--seed", type=int, default=7, help="rollout seed (not 42: the defaults were tuned on it)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="dotted override, repeatable")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args(argv)
    if args.batches < 2:
        parser.error("--batches: expected at least 2 (the SNR needs a spread)")

    torch.set_num_threads(args.threads)
    timings: dict[str, float] = {}
    # Read once: every configuration below comes from the same text, even if the file is edited
    # while the benchmark runs.
    raw = read_yaml_mapping(args.params, "params")

    def config(variant: str, overrides: list[str]) -> ExperimentConfig:
        return config_from_dict(raw, source=args.params, variant=variant, overrides=overrides, base_dir=Path(args.params).parent)

    with tempfile.TemporaryDirectory(prefix="tpgrpo-gradient-snr-") as runs_dir:
        # Shared by the rollout trainer and each mode's variant, so their differences are the
        # variants' own.
        common = [*args.overrides, f"runs_dir={runs_dir}", f"seed={args.seed}", f"sample.batches_per_epoch={args.batches}"]
        if args.batch_size is not None:
            common.append(f"sample.batch_size={args.batch_size}")
        # turning_point: the rollouts need the completions R_1..R_{W-1} that the step-level
        # modes score (outcome mode would sample without them).
        rollout_cfg = config("tp_grpo", [*common, "sample.baseline_noise=shared", "credit.mode=turning_point"])
        start = time.perf_counter()
        trainer = Trainer(rollout_cfg, variant="gradient_snr", tracker=None, resume=False)
        timings["build"] = time.perf_counter() - start
        try:
            start = time.perf_counter()
            samples = trainer.rollout(0)
            timings["rollout"] = time.perf_counter() - start
            start = time.perf_counter()
            scores = trainer.score(samples)
            timings["score wait"] = time.perf_counter() - start

            results: dict[str, ModeResult] = {}
            pooled: dict[str, Tensor] = {}
            for mode, variant in MODES.items():
                variant_cfg = config(variant, common)
                trainer.cfg = rollout_cfg.model_copy(update={s: getattr(variant_cfg, s) for s in CREDIT_SECTIONS})
                start = time.perf_counter()
                credit = trainer.credit(samples, scores)
                credit_seconds = time.perf_counter() - start
                start = time.perf_counter()
                grads = batch_gradients(trainer, samples, credit)
                gradient_seconds = time.perf_counter() - start
                not_applied = _not_applied(variant_cfg, rollout_cfg)
                pooled[mode] = grads.G.mean(dim=0)
                results[mode] = ModeResult(
                    variant=variant,
                    stats=gradient_stats(grads.G),
                    kept=kept_fraction(credit.keep),
                    active_batches=sum(credit.active),
                    turning_rate=credit.metrics["turning/rate"],
                    clip_fraction=sum(grads.clip_fraction) / len(grads.clip_fraction),
                    not_applied=not_applied,
                    notes=_notes(trainer.cfg, variant, not_applied, trainer.acc.num_processes),
                    credit_seconds=credit_seconds,
                    gradient_seconds=gradient_seconds,
                )
        finally:
            trainer.executor.shutdown()

    cfg, s = rollout_cfg, rollout_cfg.sample
    n_params = sum(p.numel() for p in trainer.policy.trainable.values())
    cosines = cosine_matrix(torch.stack(list(pooled.values())))
    names = list(results)

    print(f"gradient SNR of each credit mode on the same rollouts of the base model {cfg.model.path} "
          f"({cfg.model.family}, {cfg.model.resolution} px)")
    print(f"  {args.batches} batches x {s.batch_size} trajectories ({s.batch_size // s.group_size} prompts x "
          f"{s.group_size}), seed={args.seed}, threads={args.threads}; steps={s.num_steps} window={s.window_size} "
          f"{s.sampler} noise={s.noise_level} cfg={s.guidance_scale} completion={s.completion} "
          f"baseline_noise={s.baseline_noise}; reward={cfg.reward.name}; trainable={n_params} "
          f"(LoRA rank {cfg.train.lora_rank})")
    print(f"  mean reward {scores.metrics['reward/mean']:.4f} (std {scores.metrics['reward/std']:.4f}); "
          f"gradients: the training loss at ratio 1, one batch at a time, before clipping "
          f"(train.max_grad_norm={cfg.train.max_grad_norm})")
    print()
    print(f"{'mode':<14} {'variant':<18} {'kept':>5} {'active':>6} {'TP rate':>7} {'|g_b|':>9} {'|gbar|':>9} "
          f"{'SNR':>7} {'b SNR':>7} {'LOO cos':>7} {'clip':>5} {'credit s':>8} {'grad s':>7}")
    for mode, r in results.items():
        st = r.stats
        print(f"{mode:<14} {r.variant:<18} {r.kept:>5.3f} {r.active_batches:>3d}/{args.batches:<2d} "
              f"{r.turning_rate:>7.4f} {st.batch_norm:>9.3e} {st.pooled_norm:>9.3e} {_fmt(st.snr, 7, 2)} "
              f"{_fmt(st.batch_snr, 7, 3)} {_fmt(st.loo_cosine, 7, 3)} {r.clip_fraction:>5.3f} "
              f"{r.credit_seconds:>8.2f} {r.gradient_seconds:>7.1f}")
    print()
    print("cosine between pooled gradients")
    print(f"{'':<14} " + " ".join(f"{n:>13}" for n in names))
    for i, n in enumerate(names):
        print(f"{n:<14} " + " ".join(_fmt(float(cosines[i, j]), 13, 3) for j in range(len(names))))
    print()
    for mode, r in results.items():
        for note in r.notes:
            print(f"note: {mode}: {note}")
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    print("SNR = ||gbar|| / sqrt(sum_b ||g_b - gbar||^2 / (N(N-1))); b SNR: one batch's ||mu|| / sqrt(tr S), "
          "noise removed (sqrt(max(SNR^2 - 1, 0) / N)); "
          "LOO cos: mean cosine of g_b with the mean of the other batches; TP rate: turning points per (row, step)")
    print("pure noise (batch gradients of mean zero) reads SNR ~ 1, b SNR ~ 0 and LOO cos ~ 0")

    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "setup": {
                "params": args.params, "overrides": args.overrides, "model": cfg.model.path, "batches": args.batches,
                "batch_size": s.batch_size, "group_size": s.group_size, "seed": args.seed, "threads": args.threads,
                "trainable_parameters": n_params, "reward": scores.metrics,
            },
            "modes": {mode: asdict(r) for mode, r in results.items()},
            "pooled_cosine": {a: {b: float(cosines[i, j]) for j, b in enumerate(names)} for i, a in enumerate(names)},
            "seconds": timings,
        }, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

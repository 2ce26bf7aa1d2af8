"""One readable TP-GRPO / Flow-GRPO epoch: rollout -> score -> credit -> update -> evaluate.

The :class:`Trainer` takes a validated :class:`~tpgrpo.config.ExperimentConfig` and a tracker; it
never parses YAML or command lines and never imports Prefect. Each step of an epoch is a method
with plain inputs and outputs, so an orchestrator can run them as separate tasks;
:meth:`Trainer.fit` runs them in a loop.

Data parallelism (``accelerate launch``): every process samples its slice of each global batch;
reward sequences and prompts are gathered so credit, balancing and group normalisation see whole
groups; each process then updates on its own rows and DDP averages the gradients. Only the main
process writes files and talks to the tracker.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from accelerate import Accelerator
from torch import Tensor
from tqdm.auto import tqdm

from tpgrpo.advantages import group_advantages, local_rows
from tpgrpo.checkpoint import (
    begin_checkpoint,
    canonical_safetensors_header,
    capture_rng_state,
    commit_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    write_main_state,
    write_rank_state,
)
from tpgrpo.config import ExperimentConfig
from tpgrpo.console import epoch_line, log, plural
from tpgrpo.credit import assign_credit
from tpgrpo.data import GroupPlan, PromptSet, epoch_batches, load_prompt_set
from tpgrpo.ema import WeightEMA
from tpgrpo.errors import ModelLoadError, RewardError, TrackingError, TrainingError, UserError
from tpgrpo.evaluate import EvalResult, evaluate_prompts, save_grid
from tpgrpo.loss import grpo_loss
from tpgrpo.models import ManagedAdapter, check_family, load_adapter
from tpgrpo.rollout import Rollout, RolloutConfig, rollout
from tpgrpo.runguard import RunLock, check_resume, run_config, write_run_config
from tpgrpo.scoring import reward_sequence
from tpgrpo.summary import run_summary
from tpgrpo.sde import sde_step
from tpgrpo.tracking import NullTracker, Tracker, describe_run, key_metrics

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BatchSamples:
    """One rollout batch of this process, with its reward computation under way.

    ``rewards`` resolves to R [B_local, W+1]: the reward sequence with completions, otherwise the
    final reward repeated (Flow-GRPO sees only the outcome). ``failed`` records that scoring
    raised once, so the next :meth:`Trainer.score` call scores the batch again.
    """

    prompts: list[str]
    metadata: list[dict[str, Any]]
    rollout: Rollout
    rewards: Future
    details: Future
    failed: bool = False


@dataclass
class EpochSamples:
    epoch: int
    batches: list[BatchSamples]
    seconds: float


@dataclass
class EpochScores:
    """R [B_local, W+1] per batch, and which rows have finite rewards."""

    R: list[Tensor]
    valid: list[Tensor]
    metrics: dict[str, float]


@dataclass
class EpochCredit:
    """Advantages [B_local, W] and kept rows [B_local] per batch; ``active[b]`` says whether any
    process kept a row of batch b (the same on every process)."""

    advantages: list[Tensor]
    keep: list[Tensor]
    active: list[bool]
    metrics: dict[str, float]


@dataclass
class UpdateStats:
    metrics: dict[str, float]


@dataclass(frozen=True)
class EpochEval:
    """One evaluation of the run's (EMA) weights.

    Attributes:
        reward: mean evaluation reward on the test prompts.
        details: everything else logged as ``eval/<name>``: the reward's per-constraint means,
            ``train_reward`` (the training reward of the same images, when the evaluation's
            differs) and ``heldin_reward`` (the evaluation reward on ``eval.heldin_prompts``
            train prompts, when > 0).
    """

    reward: float
    details: dict[str, float]


@dataclass
class TrainResult:
    run_dir: Path
    epochs: int
    eval_reward_initial: float | None
    eval_reward_final: float
    eval_details: dict[str, float]
    minutes: float
    history: list[dict[str, float]] = field(repr=False)
    eval_details_initial: dict[str, float] = field(default_factory=dict)

    @property
    def summary(self) -> dict[str, float | None]:
        """The run's six summary numbers (:func:`tpgrpo.summary.run_summary`)."""
        return run_summary(
            self.eval_reward_final,
            self.eval_reward_initial,
            [row.get("turning/rate") for row in self.history],
            round(self.minutes, 3),
            self.eval_details.get("heldin_reward"),
        )


StepRunner = Callable[[str, int, Callable[[], Any]], Any]


def run_directly(name: str, epoch: int, fn: Callable[[], Any]) -> Any:
    """The default :data:`StepRunner`: just run the step."""
    return fn()


class Trainer:
    """GRPO fine-tuning of one variant.

    Args:
        cfg: the experiment (a variant's overrides already applied).
        variant: name of the variant; the run is written to ``<runs_dir>/<variant>``.
        tracker: where metrics go (main process only; others get a ``NullTracker``).
        accelerator: an ``accelerate.Accelerator``; one is created when None.
        resume: continue from the newest checkpoint of the run directory when there is one.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        *,
        variant: str,
        tracker: Tracker | None = None,
        accelerator: Accelerator | None = None,
        resume: bool = True,
    ) -> None:
        self.cfg = cfg
        self.variant = variant
        self.acc = accelerator or Accelerator(mixed_precision=cfg.train.mixed_precision)
        self.is_main = self.acc.is_main_process
        self.tracker: Tracker = tracker if (tracker is not None and self.is_main) else NullTracker()
        self.run_dir = Path(cfg.runs_dir) / variant
        self.plan = GroupPlan(
            batch_size=cfg.sample.batch_size,
            group_size=cfg.sample.group_size,
            batches_per_epoch=cfg.sample.batches_per_epoch,
            num_processes=self.acc.num_processes,
        )
        self._check_run_dir()
        self.train_set: PromptSet = load_prompt_set(Path(cfg.data.dir) / "train.jsonl")
        self.test_set: PromptSet = load_prompt_set(Path(cfg.data.dir) / "test.jsonl")
        epoch_batches(self.plan, len(self.train_set), seed=cfg.seed, epoch=0)  # fails early if too few prompts
        self.reward_fn = cfg.reward.build()
        self.eval_reward_fn = cfg.eval.build_reward(cfg.reward) if cfg.eval.reward else self.reward_fn

        torch.manual_seed(cfg.seed)  # the LoRA initialisation, identical on every process
        self.adapter = load_model(cfg, self.acc.device)
        pipe = self.adapter.pipe
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False)
        self.transformer = pipe.transformer
        self.reference: torch.nn.Module | None = None
        if cfg.train.lora_rank is None:
            self.transformer.requires_grad_(True)
            if cfg.train.kl_beta > 0:
                self.reference = copy.deepcopy(self.transformer).requires_grad_(False).eval()
        else:
            from peft import LoraConfig

            self.transformer.add_adapter(
                LoraConfig(
                    r=cfg.train.lora_rank,
                    lora_alpha=cfg.train.lora_alpha,
                    init_lora_weights="gaussian",
                    target_modules=list(cfg.train.lora_targets),
                )
            )
        self.trainable = {n: p for n, p in self.transformer.named_parameters() if p.requires_grad}
        if not self.trainable:
            raise UserError(f"train.lora_targets: no module of the transformer matches {cfg.train.lora_targets}")
        if self.acc.mixed_precision != "no":
            from diffusers.training_utils import cast_training_params

            # Autocast computes in low precision; the weights it updates stay float32, or small
            # AdamW steps would round away in a bfloat16 model.
            cast_training_params(self.transformer, torch.float32)
        if cfg.train.gradient_checkpointing:
            # Only forwards with autograd on recompute; rollouts and evaluation run as before.
            self.transformer.enable_gradient_checkpointing()
        optimizer = torch.optim.AdamW(
            list(self.trainable.values()),
            lr=cfg.train.learning_rate,
            betas=(cfg.train.adam_beta1, cfg.train.adam_beta2),
            weight_decay=cfg.train.weight_decay,
        )
        self.ddp_transformer, self.optimizer = self.acc.prepare(self.transformer, optimizer)
        self.ema = (
            WeightEMA(self.trainable, decay=cfg.train.ema_decay, every=cfg.train.ema_every)
            if cfg.train.ema_decay is not None
            else None
        )
        self.optimizer_steps = 0
        self.nonfinite_streak = 0
        self.run_config = run_config(cfg)

        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")
        self.epoch = 0
        self.history: list[dict[str, float]] = []
        self.eval_initial: float | None = None
        self.eval_initial_details: dict[str, float] = {}
        self.minutes_before = 0.0
        if resume:
            self._resume()

    # ------------------------------------------------------------------ the epoch, step by step

    def rollout_config(self) -> RolloutConfig:
        s = self.cfg.sample
        return RolloutConfig(
            num_steps=s.num_steps,
            window_start=s.window_start,
            window_size=s.window_size,
            noise_level=s.noise_level,
            sampler=s.sampler,
            log_prob=s.log_prob,
            guidance_scale=s.guidance_scale,
            completions=self.cfg.credit.mode != "outcome",
            completion=s.completion,
            completion_steps=s.completion_steps,
            baseline_noise=s.baseline_noise,
            micro_batch_size=s.micro_batch_size,
            height=self.cfg.model.resolution,
            width=self.cfg.model.resolution,
            progress=self.is_main,
        )

    def rollout(self, epoch: int) -> EpochSamples:
        """Sample this process's rows of every batch of ``epoch``; scoring starts in the background
        as soon as a batch is sampled, overlapping the next batch's sampling."""
        start = time.perf_counter()
        rcfg = self.rollout_config()
        rows = local_rows(self.plan.batch_size, self.acc.process_index, self.acc.num_processes)
        batches = []
        self.transformer.eval()
        plan = epoch_batches(self.plan, len(self.train_set), seed=self.cfg.seed, epoch=epoch)
        # disable=None: no bar when stderr is not a terminal, where redraws would only bury the
        # one-line messages (logs, captured output).
        for b, indices in enumerate(tqdm(plan, desc=f"epoch {epoch + 1} rollouts", disable=None if self.is_main else True, leave=False)):
            chosen = self.train_set.take(indices[rows].tolist())
            # Noise depends on (seed, epoch, batch, process) only: a resumed run draws the same.
            key = np.random.SeedSequence([self.cfg.seed, epoch, b, self.acc.process_index])
            generator = torch.Generator(self.acc.device).manual_seed(int(key.generate_state(1)[0]))
            ro = rollout(self.adapter, chosen.prompts, rcfg, generator=generator)
            batch = BatchSamples(chosen.prompts, chosen.metadata, ro, Future(), Future())
            job = self.executor.submit(self.score_batch, ro, chosen.prompts, chosen.metadata)
            job.add_done_callback(lambda j, b=batch: _split_result(j, b.rewards, b.details))
            batches.append(batch)
        return EpochSamples(epoch, batches, time.perf_counter() - start)

    def score_batch(
        self, ro: Rollout, prompts: list[str], metadata: list[dict]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """R [B, W+1] of one rollout batch, and the final images' reward components [B] each."""
        if ro.completion_images is not None:
            seq = reward_sequence(ro, prompts, metadata, self.reward_fn)
            return seq.R, {k: v[:, -1] for k, v in seq.details.items()}
        out = self.reward_fn(ro.images, prompts, metadata)
        R = out.scores.to(torch.float32)[:, None].expand(-1, ro.log_probs.shape[1] + 1)
        return R.contiguous(), out.details

    def score(self, samples: EpochSamples) -> EpochScores:
        """Wait for the rewards; rows with a non-finite reward anywhere are marked invalid.

        A batch whose scoring raised makes this call raise :class:`~tpgrpo.errors.RewardError`;
        calling again scores that batch anew (an orchestrator's retry), keeping the rollouts.
        """
        for b, batch in enumerate(samples.batches):
            if batch.failed:
                batch.rewards, batch.details = Future(), Future()
                _split_result(_run_now(self.score_batch, batch.rollout, batch.prompts, batch.metadata), batch.rewards, batch.details)
            exc = batch.rewards.exception()
            if exc is not None:
                batch.failed = True
                # One line for the command line (the scorer's own exception stays chained), saying
                # where a new start continues: checkpoints are only ever replaced whole.
                latest = latest_checkpoint(self.run_dir / "checkpoints")
                resume = f"resumes from {latest}" if latest else "starts over (no checkpoint yet)"
                raise RewardError(
                    f"reward.name: {self.cfg.reward.name!r} raised while scoring epoch {samples.epoch + 1}, "
                    f"batch {b + 1}: {type(exc).__name__}: {' '.join(str(exc).split())}; started again, the run {resume}"
                ) from exc
        R, valid, finals, invalid, detail_sums = [], [], [], 0, {}
        for batch in samples.batches:
            r = batch.rewards.result().to(self.acc.device)
            ok = torch.isfinite(r).all(dim=1)
            R.append(torch.where(ok[:, None], r, torch.zeros_like(r)))
            valid.append(ok)
            finals.append(self.acc.gather(r[:, -1]))
            invalid += int(self.acc.gather((~ok).to(torch.uint8)).sum())
            for name, value in batch.details.result().items():
                detail_sums.setdefault(name, []).append(self.acc.gather(value.to(self.acc.device, torch.float32)))
        final = torch.cat(finals)
        finite = final[torch.isfinite(final)]
        metrics = {
            "reward/mean": _mean(finite),
            "reward/std": float(finite.std(unbiased=False)) if finite.numel() else math.nan,
            "skipped/nonfinite": float(invalid),
        }
        for name, values in detail_sums.items():
            v = torch.cat(values)
            metrics[f"reward/{name}"] = _mean(v[torch.isfinite(v)])
        return EpochScores(R, valid, metrics)

    def credit(self, samples: EpochSamples, scores: EpochScores) -> EpochCredit:
        """Credit and advantages on the gathered batches; each process keeps its own rows."""
        ccfg = self.cfg.credit.to_credit_config()
        rows = local_rows(self.plan.batch_size, self.acc.process_index, self.acc.num_processes)
        advantages, keep, active = [], [], []
        W = self.cfg.sample.window_size
        turning = torch.zeros(W)
        detected = torch.zeros(W)
        n_valid = n_pos = n_neg = skipped = zero_groups = 0
        adv_values = []
        per_process = self.cfg.credit.balance_scope == "process"
        for batch, R, ok in zip(samples.batches, scores.R, scores.valid):
            R_all = self.acc.gather(R).cpu()
            ok_all = self.acc.gather(ok.to(torch.uint8)).cpu().bool()  # gloo cannot reduce bools
            prompts_all = _gather_strings(self.acc, batch.prompts)
            idx = ok_all.nonzero().flatten()
            adv_all = torch.zeros(R_all.shape[0], W)
            keep_all = torch.zeros(R_all.shape[0], dtype=torch.bool)
            if idx.numel():
                # balance_scope "process": each process's slice of the batch is its own pool.
                pools = (idx // (R_all.shape[0] // self.acc.num_processes)) if per_process else None
                cr = assign_credit(R_all[idx].double(), ccfg, pools=pools)
                adv = group_advantages(
                    cr.rewards,
                    [prompts_all[i] for i in idx.tolist()],
                    global_std=self.cfg.advantage.global_std,
                    clip_max=self.cfg.advantage.clip_max,
                )
                adv_all[idx] = adv.advantages.float()
                keep_all[idx] = adv.keep
                turning += cr.turning.sum(0)
                detected += cr.detected.sum(0)
                agg = cr.aggregated[cr.turning]
                n_pos += int((agg > 0).sum())
                n_neg += int((agg < 0).sum())
                n_valid += idx.numel()
                skipped += int((~adv.keep).sum())
                groups = adv.group_ids
                zero_groups += int(
                    sum(1 for g in groups.unique() if not adv.keep[groups == g].any())
                )
                adv_values.append(adv.advantages[adv.keep].flatten())
            advantages.append(adv_all[rows].to(self.acc.device))
            keep.append(keep_all[rows].to(self.acc.device))
            active.append(bool(keep_all.any()))
        metrics: dict[str, float] = {
            "skipped/trajectories": float(skipped),
            "skipped/zero_variance_groups": float(zero_groups),
        }
        denom = max(n_valid, 1)
        for k in range(W):
            metrics[f"turning/rate_step_{k + 1}"] = float(turning[k]) / denom
        metrics["turning/rate"] = float(turning.sum()) / (denom * W)
        metrics["turning/detected_rate"] = float(detected.sum()) / (denom * W)
        n_tp = max(n_pos + n_neg, 1)
        metrics["turning/positive_share"] = n_pos / n_tp
        metrics["turning/negative_share"] = n_neg / n_tp
        values = torch.cat(adv_values) if adv_values else torch.zeros(0)
        metrics["advantage/mean"] = _mean(values)
        metrics["advantage/abs_mean"] = _mean(values.abs())
        metrics["advantage/std"] = float(values.std(unbiased=False)) if values.numel() else math.nan
        return EpochCredit(advantages, keep, active, metrics)

    def update(self, samples: EpochSamples, credit: EpochCredit) -> UpdateStats:
        """Clipped-surrogate updates on the stored transitions.

        Gradients accumulate over the W steps of the window and over ``train.gradient_accumulation``
        rollout batches per optimizer step, each kept row weighted equally within a step (so one
        step over A accumulated batches is one step over a batch holding their rows), in forwards
        of at most ``train.micro_batch_size`` rows. The EMA is offered an update after every batch
        (the published cadence, see :mod:`tpgrpo.ema`). A step with a non-finite gradient norm is
        skipped; ``train.max_nonfinite_updates`` of them in a row stop the run.
        """
        start = time.perf_counter()
        t = self.cfg.train
        A = t.gradient_accumulation
        sums: dict[str, float] = {}
        grad_norms: list[float] = []
        batches_trained = nonfinite = 0
        self.ddp_transformer.train()
        batches = list(zip(samples.batches, credit.advantages, credit.keep, credit.active))
        for _ in range(t.inner_epochs):
            for first in range(0, len(batches), A):
                group = batches[first : first + A]
                # Rows kept on this process over the whole step: the denominator of its mean.
                rows_in_step = sum(int(keep.sum()) for _, _, keep, active in group if active)
                last_active = max((i for i, (*_, active) in enumerate(group) if active), default=None)
                losses_finite = True
                for i, (batch, adv, keep, active) in enumerate(group):
                    if active:
                        losses_finite &= self._accumulate(batch, adv, keep, rows_in_step, sums, sync=i == last_active)
                        batches_trained += 1
                    if i == len(group) - 1:
                        nonfinite += not self._optimizer_step(
                            grad_norms, has_gradients=last_active is not None, losses_finite=losses_finite
                        )
                    if self.ema is not None:
                        self.ema.update(self.optimizer_steps)
        metrics = {name: value / max(batches_trained, 1) for name, value in sums.items()}
        if grad_norms:
            metrics["grad_norm"] = sum(grad_norms) / len(grad_norms)
        metrics["optimizer/steps"] = float(self.optimizer_steps)
        metrics["skipped/nonfinite_updates"] = float(nonfinite)
        metrics["time/update_s"] = time.perf_counter() - start
        return UpdateStats(metrics)

    def _accumulate(
        self, batch: BatchSamples, adv: Tensor, keep: Tensor, rows_in_step: int, sums: dict[str, float], *, sync: bool
    ) -> bool:
        """Backward passes of one rollout batch's kept rows: every window step, in micro-batches;
        gradients reduce across processes only in the last backward of the optimizer step.
        Returns whether every loss was finite."""
        ro = batch.rollout
        W = self.cfg.sample.window_size
        rows = keep.nonzero().flatten()
        scale = 1.0 / max(rows_in_step, 1)
        if rows.numel() == 0:
            # Nothing to learn here, but every process must run the same synced backward (DDP
            # all-reduces inside it): one row with zero weight.
            rows, scale = torch.zeros(1, dtype=torch.long, device=keep.device), 0.0
        chunks = rows.split(self.cfg.train.micro_batch_size or rows.numel())
        batch_terms: dict[str, float] = {}
        finite = True
        for c, chunk in enumerate(chunks):
            embeds = ro.embeds.select(chunk)
            for k in range(W):
                last = sync and c == len(chunks) - 1 and k == W - 1
                with nullcontext() if last else self.acc.no_sync(self.ddp_transformer):
                    out = self._step_loss(ro, chunk, k, embeds, adv[chunk, k])
                    # The loss is a mean over the chunk's rows; weighting it by their share of the
                    # step's rows (and 1/W per window step) makes the sum the step's mean.
                    self.acc.backward(out.loss * (scale * chunk.numel() / W))
                finite &= bool(torch.isfinite(out.loss))
                share = chunk.numel() / (rows.numel() * W)
                for name, value in (
                    ("loss/total", out.loss.detach()),
                    ("loss/policy", out.policy_loss),
                    ("loss/kl", out.kl_loss),
                    ("approx_kl", out.approx_kl),
                    ("clip_fraction", out.clip_fraction),
                    ("ratio_mean", out.ratio_mean),
                ):
                    batch_terms[name] = batch_terms.get(name, 0.0) + float(value) * share
        for name, value in batch_terms.items():
            sums[name] = sums.get(name, 0.0) + value
        return finite

    def _optimizer_step(self, grad_norms: list[float], *, has_gradients: bool, losses_finite: bool) -> bool:
        """End an optimizer step; False when its gradient norm was not finite (the step skipped).

        ``grad_norms``: the step's gradient norm is appended; ``losses_finite``: this process's
        losses of the step were all finite. The step counts in ``optimizer_steps`` whether or not
        it changed the weights (no signal, a skipped non-finite update), as the published
        ``global_step`` does: the count and the EMA cadence follow the schedule."""
        self.optimizer_steps += 1
        if not has_gradients:
            return True
        grad_norm = self.acc.clip_grad_norm_(list(self.trainable.values()), self.cfg.train.max_grad_norm)
        grad_norms.append(float(grad_norm))
        # The norm is of the all-reduced gradients: every process takes the same branch.
        if torch.isfinite(grad_norm):
            self.optimizer.step()
            self.nonfinite_streak = 0
            self.optimizer.zero_grad(set_to_none=True)
            return True
        nan_loss = bool(self.acc.gather(torch.tensor([not losses_finite], device=self.acc.device)).any())
        if self.acc.scaler is not None:
            # fp16: the loss scaler skips the step itself and lowers its scale. With finite losses
            # that is an overflow of the scaled gradients, routine early in fp16 training, and no
            # sign of a broken run.
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.acc.scaler is None or nan_loss:
            self._count_nonfinite()
        return False

    def _count_nonfinite(self) -> None:
        """One more non-finite update in a row; too many stop the run."""
        self.nonfinite_streak += 1
        limit = self.cfg.train.max_nonfinite_updates
        if self.nonfinite_streak >= limit:
            latest = latest_checkpoint(self.run_dir / "checkpoints")
            where = f"its last checkpoint {latest} is intact" if latest else "no checkpoint was written yet"
            raise TrainingError(
                f"train.max_nonfinite_updates: {self.nonfinite_streak} non-finite updates in a row (NaN/Inf loss or "
                f"gradient norm) at epoch {self.epoch + 1}; the run stops, {where}; try a lower train.learning_rate "
                f"or train.mixed_precision=bf16"
            )

    def _step_loss(self, ro: Rollout, rows: Tensor, k: int, embeds, advantages: Tensor):
        s, t = self.cfg.sample, self.cfg.train
        z, z_next = ro.latents[rows, k], ro.latents[rows, k + 1]
        step_index = int(ro.step_indices[k])
        common = dict(noise_level=s.noise_level, sampler=s.sampler, log_prob_form=s.log_prob, prev_sample=z_next)
        v = self.adapter.velocity(z, ro.timesteps[k], embeds, s.guidance_scale, transformer=self.ddp_transformer)
        step = sde_step(v, z, ro.sigmas, step_index, **common)
        ref_mean = None
        if t.kl_beta > 0:
            with torch.no_grad(), self._reference() as reference:
                v_ref = self.adapter.velocity(z, ro.timesteps[k], embeds, s.guidance_scale, transformer=reference)
                ref_mean = sde_step(v_ref, z, ro.sigmas, step_index, **common).mean
        return grpo_loss(
            step.log_prob,
            ro.log_probs[rows, k],
            advantages,
            clip_range=t.clip_range,
            beta=t.kl_beta,
            mean=step.mean,
            ref_mean=ref_mean,
            std=step.std,
        )

    @contextmanager
    def _reference(self) -> Iterator[torch.nn.Module]:
        """The base model: LoRA switched off, or the frozen copy under full fine-tuning."""
        if self.reference is not None:
            yield self.reference
            return
        self.transformer.disable_adapters()
        try:
            yield self.transformer
        finally:
            self.transformer.enable_adapters()

    @contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Swap the EMA weights in (evaluation, export), and restore the trained ones bit for bit."""
        with self.ema.swapped_in() if self.ema is not None else nullcontext():
            yield

    def evaluate(self, epoch: int) -> EpochEval:
        """ODE samples of the test prompts (and ``eval.heldin_prompts`` train prompts) with the
        EMA weights: mean reward, per-constraint means, the training reward of the same images.
        The test prompts' per-prompt scores go to ``eval_scores/epoch_<N>.csv`` (the study's
        bootstrap over prompts reads them)."""
        e = self.cfg.eval
        test = self.test_set if e.num_prompts is None else self.test_set.take(list(range(min(e.num_prompts, len(self.test_set)))))
        extra = {} if self.eval_reward_fn is self.reward_fn else {"train_reward": self.reward_fn}
        self.transformer.eval()
        with self.ema_weights():
            result = self._evaluate_set(test, extra)
            heldin = None
            if e.heldin_prompts:
                heldin = self._evaluate_set(self.train_set.take(list(range(min(e.heldin_prompts, len(self.train_set))))), {})
        details = {**result.details, **result.extra}
        if heldin is not None:
            details["heldin_reward"] = heldin.reward
        if self.is_main:
            grid = save_grid(result, self.run_dir / "samples" / f"epoch_{epoch:04d}.png")
            self.tracker.log_artifact(grid, "samples")
            _atomic_write(self.run_dir / "eval_scores" / f"epoch_{epoch:04d}.csv", _scores_csv(test, result))
        return EpochEval(result.reward, details)

    def _evaluate_set(self, prompts: PromptSet, extra: dict[str, Any]) -> EvalResult:
        e = self.cfg.eval
        return evaluate_prompts(
            self.adapter,
            prompts,
            self.eval_reward_fn,
            num_steps=e.num_steps,
            guidance_scale=e.guidance_scale,
            batch_size=e.batch_size,
            seed=self.cfg.seed,
            resolution=self.cfg.model.resolution,
            accelerator=self.acc,
            extra_rewards=extra,
        )

    # ------------------------------------------------------------------ the loop

    def fit(self, run_step: StepRunner = run_directly) -> TrainResult:
        """Train until ``train.epochs`` (or the time budget), evaluating every ``eval.every`` epochs.

        ``run_step(name, epoch, fn)`` runs each step (``fn()``) and returns its result; the
        default calls it, an orchestrator runs it as a task (see ``flows/training.py``). Steps:
        ``rollout``, ``score``, ``credit``, ``update``, ``evaluate``, ``checkpoint``, ``finalize``;
        ``epoch`` counts from 1 (0: the base model's evaluation).
        """
        t, e = self.cfg.train, self.cfg.eval
        started = time.perf_counter()
        if self.is_main:
            write_run_config(self.run_dir, self.run_config)
        params = {**self.cfg.flat(), "variant": self.variant}
        self.tracker.log_params(params)
        self.tracker.set_tags(describe_run(params))
        if self.is_main:
            log.info(self._start_line())
        if self.epoch == 0 and self.eval_initial is None:
            first = run_step("evaluate", 0, lambda: self.evaluate(0))
            self.eval_initial, self.eval_initial_details = first.reward, dict(first.details)
            self.tracker.log_metrics({"eval/reward": first.reward, **{f"eval/{k}": v for k, v in first.details.items()}}, step=0)
            if self.is_main:
                log.info(epoch_line(self.variant, 0, t.epochs, {"eval/reward": first.reward}, None) + " (the base model)")
        last_eval: EpochEval | None = None
        while self.epoch < t.epochs:
            epoch = self.epoch + 1
            samples = run_step("rollout", epoch, lambda: self.rollout(epoch - 1))
            scores = run_step("score", epoch, lambda: self.score(samples))
            credit = run_step("credit", epoch, lambda: self.credit(samples, scores))
            update = run_step("update", epoch, lambda: self.update(samples, credit))
            row = {"epoch": float(epoch), "time/rollout_s": samples.seconds}
            row |= scores.metrics | credit.metrics | update.metrics
            del samples, scores, credit  # release the epoch's rollouts before evaluating
            self.epoch = epoch
            minutes = self.minutes_before + (time.perf_counter() - started) / 60
            out_of_time = t.time_budget_minutes is not None and minutes >= t.time_budget_minutes
            if epoch % e.every == 0 or epoch == t.epochs or out_of_time:
                last_eval = run_step("evaluate", epoch, lambda: self.evaluate(epoch))
                row["eval/reward"] = last_eval.reward
                row |= {f"eval/{k}": v for k, v in last_eval.details.items()}
            row["time/minutes"] = minutes
            self.history.append(row)
            self.tracker.log_metrics(row, step=epoch)
            if self.is_main:
                # Turning points exist only under turning-point credit; other modes log them as 0.
                shown = row if self.cfg.credit.mode == "turning_point" else {k: v for k, v in row.items() if not k.startswith("turning/")}
                log.info(epoch_line(self.variant, epoch, t.epochs, shown, self.eval_initial))
            if epoch % t.checkpoint_every == 0 or epoch == t.epochs or out_of_time:
                run_step("checkpoint", epoch, lambda: self.save_checkpoint(minutes))
            if out_of_time:
                break
        if last_eval is None:
            last_eval = run_step("evaluate", self.epoch, lambda: self.evaluate(self.epoch))
        minutes = self.minutes_before + (time.perf_counter() - started) / 60
        result = TrainResult(
            run_dir=self.run_dir,
            epochs=self.epoch,
            eval_reward_initial=self.eval_initial,
            eval_reward_final=last_eval.reward,
            eval_details=last_eval.details,
            minutes=minutes,
            history=self.history,
            eval_details_initial=self.eval_initial_details,
        )
        summary = key_metrics(result.summary)
        self.tracker.log_metrics(summary, step=self.epoch)
        self.tracker.set_tags(describe_run(params, summary))
        run_step("finalize", self.epoch, lambda: self.write_outputs(result))
        self.executor.shutdown()
        return result

    def _start_line(self) -> str:
        c, s, e = self.cfg, self.cfg.sample, self.cfg.eval
        where = f"resuming after epoch {self.epoch}" if self.epoch else "from the base model"
        evaluated = len(self.test_set) if e.num_prompts is None else min(e.num_prompts, len(self.test_set))
        eval_reward = c.reward.name if e.reward is None else e.reward.name
        return (
            f"{self.variant}: {plural(c.train.epochs, 'epoch')} of {plural(s.batches_per_epoch, 'batch', 'batches')} x "
            f"{s.batch_size} trajectories, {where}; credit {c.credit.mode}, train reward {c.reward.name}; "
            f"eval reward {eval_reward} on {evaluated} test prompts every {plural(e.every, 'epoch')} -> {self.run_dir}"
        )

    # ------------------------------------------------------------------ files

    def _check_run_dir(self) -> None:
        if not self.is_main:
            return
        # Directories made for the probe are removed again: a run refused later (a bad model
        # path, a bad prompt file) leaves no trace.
        created = [d for d in (self.run_dir, *self.run_dir.parents) if not d.exists()]
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise UserError(f"{self.run_dir}: run directory is not writable ({exc.strerror})") from None
        for directory in created:
            directory.rmdir()

    def trainable_state(self, ema: bool = False) -> dict[str, Tensor]:
        source = self.ema.state() if (ema and self.ema is not None) else {n: p.detach() for n, p in self.trainable.items()}
        return {n: t.detach().to("cpu", copy=True).contiguous() for n, t in source.items()}

    def save_checkpoint(self, minutes: float) -> None:
        directory = self.run_dir / "checkpoints"
        tmp = begin_checkpoint(directory, self.epoch) if self.is_main else None
        self.acc.wait_for_everyone()
        tmp = Path(_broadcast_string(self.acc, str(tmp) if tmp else ""))
        write_rank_state(tmp, self.acc.process_index, capture_rng_state())
        if self.is_main:
            write_main_state(
                tmp,
                epoch=self.epoch,
                weights=self.trainable_state(),
                ema=self.trainable_state(ema=True) if self.ema is not None else None,
                optimizer_state_dict=self._inner_optimizer().state_dict(),
                meta={
                    "epoch": self.epoch,
                    "variant": self.variant,
                    "num_processes": self.acc.num_processes,
                    "minutes": minutes,
                    "eval_initial": self.eval_initial,
                    "eval_initial_details": self.eval_initial_details,
                    "optimizer_steps": self.optimizer_steps,
                    "config": self.run_config.fields,
                    "config_hash": self.run_config.hash,
                    "nonfinite_streak": self.nonfinite_streak,
                    "run_id": getattr(self.tracker, "run_id", None),
                    "history": self.history,
                },
            )
        self.acc.wait_for_everyone()
        if self.is_main:
            commit_checkpoint(tmp, world_size=self.acc.num_processes)
            _atomic_write(self.run_dir / "history.csv", _history_csv(self.history))
        self.acc.wait_for_everyone()

    def _inner_optimizer(self) -> torch.optim.Optimizer:
        # accelerate wraps the optimizer; its state dict is the wrapped one's.
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def _resume(self) -> None:
        path = latest_checkpoint(self.run_dir / "checkpoints")
        if path is None:
            return
        ckpt = load_checkpoint(path, rank=self.acc.process_index, world_size=self.acc.num_processes)
        if "config" in ckpt.meta:
            check_resume(ckpt.meta["config"], self.run_config.fields, self.run_dir)
        missing = set(self.trainable) - set(ckpt.weights)
        if missing:
            raise UserError(f"{path}: checkpoint lacks {len(missing)} trainable tensors (e.g. {sorted(missing)[0]}); different train.lora_* settings?")
        with torch.no_grad():
            for n, p in self.trainable.items():
                p.copy_(ckpt.weights[n])
            if self.ema is not None and ckpt.ema is not None:
                self.ema.load(ckpt.ema)
        if ckpt.optimizer is not None:
            self._inner_optimizer().load_state_dict(ckpt.optimizer)
        if ckpt.rng is not None:
            restore_rng_state(ckpt.rng)
        self.epoch = ckpt.epoch
        self.history = list(ckpt.meta.get("history", []))
        self.eval_initial = ckpt.meta.get("eval_initial")
        self.eval_initial_details = dict(ckpt.meta.get("eval_initial_details", {}))
        self.minutes_before = float(ckpt.meta.get("minutes", 0.0))
        self.optimizer_steps = int(ckpt.meta.get("optimizer_steps", 0))
        self.nonfinite_streak = int(ckpt.meta.get("nonfinite_streak", 0))

    def write_outputs(self, result: TrainResult) -> None:
        """history.csv, metrics.json, summary.json and the final EMA weights (main process); then
        a barrier."""
        if self.is_main:
            self._write_outputs(result)
        self.acc.wait_for_everyone()

    def _write_outputs(self, result: TrainResult) -> None:
        _atomic_write(self.run_dir / "history.csv", _history_csv(result.history))
        metrics = {
            "eval_reward": result.eval_reward_final,
            "eval_reward_initial": result.eval_reward_initial,
            "epochs": result.epochs,
            "minutes": round(result.minutes, 3),
            **{f"eval_{k}": v for k, v in result.eval_details.items()},
            **{f"eval_{k}_initial": v for k, v in result.eval_details_initial.items()},
        }
        _atomic_write(self.run_dir / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        # The train stage's DVC metric: the same six keys for every run, so `dvc metrics show`
        # prints one short row per run; the per-constraint rewards stay in metrics.json.
        _atomic_write(self.run_dir / "summary.json", json.dumps(result.summary, indent=2) + "\n")
        final = self.save_final_weights(self.run_dir / "final")
        self.tracker.log_artifact(final, None)
        self.tracker.log_artifact(self.run_dir / "metrics.json")
        self.tracker.log_artifact(self.run_dir / "summary.json")
        self.tracker.log_artifact(self.run_dir / "history.csv")
        self.tracker.log_artifact(self.run_dir / "eval_scores")

    def save_final_weights(self, path: Path) -> Path:
        """The EMA weights in the format diffusers loads: LoRA layers for ``pipe.load_lora_weights``,
        or a whole ``transformer/`` under full fine-tuning. Written to a temp dir, then renamed."""
        tmp = path.with_name(f".{path.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        with self.ema_weights():
            if self.cfg.train.lora_rank is None:
                self.transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
            else:
                from peft.utils import get_peft_model_state_dict

                type(self.adapter.pipe).save_lora_weights(
                    tmp,
                    transformer_lora_layers=get_peft_model_state_dict(self.transformer),
                    # The LoRA config (alpha above all) travels in the file: without it diffusers
                    # assumes alpha = rank and applies the update at rank / alpha of its strength.
                    transformer_lora_adapter_metadata=lora_metadata(self.transformer.peft_config["default"].to_dict()),
                )
                canonical_safetensors_header(tmp / "pytorch_lora_weights.safetensors")
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
        return path


def lora_metadata(config: dict[str, Any]) -> dict[str, Any]:
    """A LoRA config as the exported file's metadata, with its sets (peft keeps
    ``target_modules`` as one) as sorted lists: a set's order changes with each process's string
    hashing, which would give identical weights a new file, and a new DVC hash, on every run."""
    return {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in config.items()}


def _run_now(fn: Callable[..., Any], *args: Any) -> Future:
    future: Future = Future()
    try:
        future.set_result(fn(*args))
    except Exception as exc:  # delivered like a background failure
        future.set_exception(exc)
    return future


@dataclass(frozen=True)
class RunOutcome:
    """A finished run: the trainer's result, the tracker run and whether this is the main process."""

    result: TrainResult
    run_id: str | None
    is_main: bool


def train_variant_run(
    cfg: ExperimentConfig,
    *,
    name: str,
    variant: str | None = None,
    restart: bool = False,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    run_step: StepRunner = run_directly,
) -> RunOutcome:
    """Train one run end to end: clear it on ``restart``, open (or resume) its MLflow run, fit,
    and close the run FINISHED (FAILED on an exception). The body of ``tpgrpo train`` and of the
    Prefect training flow.

    Args:
        cfg: the experiment, overrides applied.
        name: run name and directory under ``runs_dir``.
        variant: the variant it trains (tag); default ``name``.
        restart: discard ``<runs_dir>/<name>`` first instead of resuming.
        parent_run_id: MLflow run to nest under (an ablation).
        tags: extra MLflow tags.
        run_step: how each step runs (see :meth:`Trainer.fit`).

    ``train.num_threads`` (when not 0) sets torch's CPU threads for the run, restored after.
    """
    acc = Accelerator(mixed_precision=cfg.train.mixed_precision)
    run_dir = Path(cfg.runs_dir) / name
    # One process trains a run at a time; the lock sits beside the run directory, so a restart
    # can clear the directory while holding it.
    with RunLock(cfg.runs_dir, name) if acc.is_main_process else nullcontext():
        if restart and acc.is_main_process and run_dir.exists():
            shutil.rmtree(run_dir)
        acc.wait_for_everyone()
        # Refused before the tracker reopens (and would mark FAILED) the run it belongs to.
        check_resumable(cfg, run_dir)
        return _train_locked(cfg, acc, run_dir, name, variant, parent_run_id, tags, run_step)


def _train_locked(
    cfg: ExperimentConfig,
    acc: Accelerator,
    run_dir: Path,
    name: str,
    variant: str | None,
    parent_run_id: str | None,
    tags: dict[str, str] | None,
    run_step: StepRunner,
) -> RunOutcome:
    from tpgrpo.tracking import MissingRunError, finishing, open_tracker, run_tags

    try:
        tracker = open_tracker(
            cfg.tracking.uri,
            cfg.tracking.experiment,
            is_main_process=acc.is_main_process,
            run_name=name,
            run_id=previous_run_id(run_dir),
            parent_run_id=parent_run_id,
            tags={**run_tags(variant or name), **(tags or {})},
        )
    except MissingRunError as exc:
        raise TrackingError(
            f"{run_dir}: its MLflow run {exc.run_id} is not in {exc.uri} (another tracking.uri, or a deleted "
            "store); set tracking.uri to the store it was logged to, or pass --restart to train it again"
        ) from None
    threads = torch.get_num_threads()
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    try:
        with finishing(tracker):
            trainer = Trainer(cfg, variant=name, tracker=tracker, accelerator=acc)
            try:
                result = trainer.fit(run_step)
            finally:
                trainer.executor.shutdown(wait=False, cancel_futures=True)
    finally:
        torch.set_num_threads(threads)  # an ablation's in-process runs share this process
    return RunOutcome(result, tracker.run_id, acc.is_main_process)


def load_model(cfg: ExperimentConfig, device: str | torch.device) -> ManagedAdapter:
    """The base model of ``cfg.model`` on ``device``, in ``model.dtype``, behind a
    :class:`ManagedAdapter`: prompts encoded one distinct prompt at a time, with the memory options
    (``model.offload_*``, ``sample.cache_text_embeddings``) applied.

    Raises:
        ModelLoadError: naming ``model.family`` (checked before any weights load) or
            ``model.path`` (missing, not a pipeline directory, unreadable).
    """
    m, s = cfg.model, cfg.sample
    check_family(m.path, m.family)
    offload = m.offload_text_encoders or m.offload_vae
    try:
        # Loaded into CPU memory when offloading, so the offloaded modules never occupy the
        # accelerator, not even while loading.
        adapter = load_adapter(
            m.path, dtype=_DTYPES[m.dtype], device="cpu" if offload else device, max_sequence_length=m.max_sequence_length
        )
    except ModelLoadError as exc:
        raise ModelLoadError(f"model.path: {exc}") from None
    return ManagedAdapter(
        adapter,
        device,
        cache_size=s.text_embedding_cache_size if s.cache_text_embeddings else None,
        offload_text_encoders=m.offload_text_encoders,
        offload_vae=m.offload_vae,
    )


def check_resumable(cfg: ExperimentConfig, run_dir: str | Path) -> None:
    """Refuse (:class:`~tpgrpo.runguard.ConfigMismatchError`, one line) to continue the newest
    checkpoint of ``run_dir`` with a configuration that changes its result."""
    path = latest_checkpoint(Path(run_dir) / "checkpoints")
    if path is None:
        return
    recorded = load_checkpoint(path, rng=False, verify=False).meta.get("config")
    if recorded is not None:
        check_resume(recorded, run_config(cfg).fields, run_dir)


def previous_run_id(run_dir: str | Path) -> str | None:
    """The tracker run of the newest checkpoint in ``run_dir`` (to continue it on resume)."""
    path = latest_checkpoint(Path(run_dir) / "checkpoints")
    if path is None:
        return None
    return load_checkpoint(path, rng=False, verify=False).meta.get("run_id")


def _split_result(job: Future, rewards: Future, details: Future) -> None:
    exc = job.exception()
    if exc is not None:
        rewards.set_exception(exc)
        details.set_exception(exc)
    else:
        R, d = job.result()
        rewards.set_result(R)
        details.set_result(d)


def _mean(values: Tensor) -> float:
    return float(values.mean()) if values.numel() else math.nan


def _gather_strings(acc: Accelerator, items: list[str]) -> list[str]:
    if acc.num_processes == 1:
        return list(items)
    from accelerate.utils import gather_object

    return list(gather_object(list(items)))


def _broadcast_string(acc: Accelerator, value: str) -> str:
    if acc.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def _history_csv(history: list[dict[str, float]]) -> str:
    columns: list[str] = []
    for row in history:
        columns += [c for c in row if c not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(history)
    return buffer.getvalue()


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _scores_csv(prompts: PromptSet, result: EvalResult) -> str:
    """One row per evaluated prompt: its index in the prompt file, the prompt, its score (and
    the extra rewards' scores), in prompt order."""
    names = list(result.extra_scores)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["index", "prompt", "reward", *names])
    for i, prompt in enumerate(prompts.prompts):
        extra = [f"{float(result.extra_scores[n][i]):.9g}" for n in names]
        writer.writerow([i, prompt, f"{float(result.scores[i]):.9g}", *extra])
    return buffer.getvalue()

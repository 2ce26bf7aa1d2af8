"""One readable TP-GRPO / Flow-GRPO epoch: rollout -> score -> credit -> update -> evaluate.

The :class:`Trainer` takes a validated :class:`~tpgrpo.config.ExperimentConfig` and a tracker; it
never parses YAML or command lines and never imports Prefect. Each step of an epoch is a method
with plain inputs and outputs, so an orchestrator can run them as separate tasks;
:meth:`Trainer.fit` runs them in a loop. The policy (model, LoRA, optimizer, EMA) is
:mod:`tpgrpo.policy`; the figures each step logs are :mod:`tpgrpo.epoch_metrics`; the run
directory's files and the run's lifecycle are :mod:`tpgrpo.rundir`.

Data parallelism (``accelerate launch``): every process samples its slice of each global batch;
reward sequences are gathered so credit, balancing and group normalisation see whole groups (every
process knows the batch's prompt indices, the group keys, from the sampling plan); each process
then updates on its own rows and DDP averages the gradients. Only the main process writes files
and talks to the tracker.

Failures: a reward that raises stops the run with one line; it resumes from its last checkpoint.
The one retry layer is the remote reward client's (transient HTTP failures, with backoff).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from tpgrpo import rundir
from tpgrpo.advantages import group_advantages, local_rows
from tpgrpo.checkpoint import begin_checkpoint, commit_checkpoint, latest_checkpoint, load_checkpoint, write_main_state
from tpgrpo.config import ExperimentConfig
from tpgrpo.console import epoch_line, log, plural
from tpgrpo.credit import assign_credit
from tpgrpo.data import GroupPlan, PromptSet, epoch_batches, load_prompt_set
from tpgrpo.epoch_metrics import credit_metrics, reward_metrics
from tpgrpo.errors import RewardError, UserError
from tpgrpo.evaluate import EvalResult, evaluate_prompts, save_grid
from tpgrpo.models import ManagedAdapter
from tpgrpo.policy import Policy, build_policy
from tpgrpo.rewards import metadata_check, reward_from_section
from tpgrpo.rollout import Rollout, rollout, rollout_config
from tpgrpo.runguard import check_resume, result_fields, run_config, write_run_config
from tpgrpo.scoring import reward_sequence
from tpgrpo.steps import BatchSamples, BatchScores, EpochCredit, EpochEval, EpochSamples, EpochScores, RunOutcome, TrainResult, UpdateStats
from tpgrpo.tracking import NullTracker, Tracker, describe_run, key_metrics
from tpgrpo.update import PolicyUpdate


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
        adapter: the model to train instead of loading ``model.path`` (e.g. a benchmark's
            in-memory pipeline, see :func:`tpgrpo.policy.managed_adapter`).
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        *,
        variant: str,
        tracker: Tracker | None = None,
        accelerator: Accelerator | None = None,
        resume: bool = True,
        adapter: ManagedAdapter | None = None,
    ) -> None:
        self.cfg = cfg
        self.variant = variant
        self.acc = accelerator or Accelerator(mixed_precision=cfg.train.mixed_precision)
        self.is_main = self.acc.is_main_process
        self.tracker: Tracker = tracker if (tracker is not None and self.is_main) else NullTracker()
        self.run_dir = Path(cfg.runs_dir) / variant
        s = cfg.sample
        self.plan = GroupPlan(s.batch_size, s.group_size, s.batches_per_epoch, num_processes=self.acc.num_processes)
        if self.is_main:
            rundir.check_writable(self.run_dir)
        self.reward_fn = reward_from_section(cfg.reward)
        self.eval_reward_fn = reward_from_section(cfg.eval.reward) if cfg.eval.reward else self.reward_fn
        check = metadata_check(self.reward_fn, self.eval_reward_fn)
        self.train_set: PromptSet = load_prompt_set(Path(cfg.data.dir) / "train.jsonl", check)
        self.test_set: PromptSet = load_prompt_set(Path(cfg.data.dir) / "test.jsonl", check)
        epoch_batches(self.plan, len(self.train_set), seed=cfg.seed, epoch=0)  # fails early if too few prompts
        self.policy: Policy = build_policy(cfg, self.acc, adapter)
        self.updater = PolicyUpdate(self.policy, self.acc, cfg.train, self.run_dir / rundir.CHECKPOINTS)
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

    def rollout(self, epoch: int) -> EpochSamples:
        """Sample this process's rows of every batch of ``epoch``; scoring starts in the background
        as soon as a batch is sampled, overlapping the next batch's sampling."""
        start = time.perf_counter()
        rcfg = rollout_config(self.cfg, progress=self.is_main)
        rows = local_rows(self.plan.batch_size, self.acc.process_index, self.acc.num_processes)
        batches = []
        self.policy.transformer.eval()
        plan = epoch_batches(self.plan, len(self.train_set), seed=self.cfg.seed, epoch=epoch)
        # disable=None: no bar when stderr is not a terminal, where redraws would only bury the
        # one-line messages (logs, captured output).
        for b, indices in enumerate(tqdm(plan, desc=f"epoch {epoch + 1} rollouts", disable=None if self.is_main else True, leave=False)):
            chosen = self.train_set.take(indices[rows].tolist())
            # Noise depends on (seed, epoch, batch, process) only: a resumed run draws the same.
            key = np.random.SeedSequence([self.cfg.seed, epoch, b, self.acc.process_index])
            generator = torch.Generator(self.acc.device).manual_seed(int(key.generate_state(1)[0]))
            ro = rollout(self.policy.adapter, chosen.prompts, rcfg, generator=generator)
            scores = self.executor.submit(self.score_batch, ro, chosen.prompts, chosen.metadata)
            batches.append(BatchSamples(chosen.prompts, chosen.metadata, indices, ro, scores))
        return EpochSamples(epoch, batches, time.perf_counter() - start)

    def score_batch(self, ro: Rollout, prompts: list[str], metadata: list[dict]) -> BatchScores:
        """The :class:`BatchScores` of one rollout batch."""
        if ro.completion_images is not None:
            seq = reward_sequence(ro, prompts, metadata, self.reward_fn)
            return BatchScores(seq.R, {k: v[:, -1] for k, v in seq.details.items()})
        out = self.reward_fn(ro.images, prompts, metadata)
        R = out.scores.to(torch.float32)[:, None].expand(-1, ro.log_probs.shape[1] + 1)
        return BatchScores(R.contiguous(), out.details)

    def score(self, samples: EpochSamples) -> EpochScores:
        """Wait for the rewards; rows with a non-finite reward anywhere are marked invalid. A batch
        whose scoring raised stops the run (:class:`~tpgrpo.errors.RewardError`, one line)."""
        for b, batch in enumerate(samples.batches):
            exc = batch.scores.exception()
            if exc is not None:
                # One line for the command line (the scorer's own exception stays chained), saying
                # where a new start continues: checkpoints are only ever replaced whole.
                latest = latest_checkpoint(self.run_dir / rundir.CHECKPOINTS)
                resume = f"resumes from {latest}" if latest else "starts over (no checkpoint yet)"
                raise RewardError(
                    f"reward.name: {self.cfg.reward.name!r} raised while scoring epoch {samples.epoch + 1}, "
                    f"batch {b + 1}: {type(exc).__name__}: {' '.join(str(exc).split())}; started again, the run {resume}"
                ) from exc
        R, valid, finals, invalid, details = [], [], [], 0, {}
        for batch in samples.batches:
            scores: BatchScores = batch.scores.result()
            r = scores.R.to(self.acc.device)
            ok = torch.isfinite(r).all(dim=1)
            R.append(torch.where(ok[:, None], r, torch.zeros_like(r)))
            valid.append(ok)
            finals.append(self.acc.gather(r[:, -1]))
            invalid += int(self.acc.gather((~ok).to(torch.uint8)).sum())
            for name, value in scores.details.items():
                details.setdefault(name, []).append(self.acc.gather(value.to(self.acc.device, torch.float32)))
        metrics = reward_metrics(torch.cat(finals), invalid, {name: torch.cat(v) for name, v in details.items()})
        return EpochScores(R, valid, metrics)

    def credit(self, samples: EpochSamples, scores: EpochScores) -> EpochCredit:
        """Credit and advantages on the gathered batches (groups keyed by prompt index); each
        process keeps its own rows."""
        ccfg = self.cfg.credit.to_credit_config()
        rows = local_rows(self.plan.batch_size, self.acc.process_index, self.acc.num_processes)
        W = self.cfg.sample.window_size
        per_process = self.cfg.credit.balance_scope == "process"
        advantages, keep, active, credited = [], [], [], []
        for batch, R, ok in zip(samples.batches, scores.R, scores.valid):
            R_all = self.acc.gather(R).cpu()
            ok_all = self.acc.gather(ok.to(torch.uint8)).cpu().bool()  # gloo cannot reduce bools
            idx = ok_all.nonzero().flatten()
            adv_all = torch.zeros(R_all.shape[0], W)
            keep_all = torch.zeros(R_all.shape[0], dtype=torch.bool)
            if idx.numel():
                # balance_scope "process": each process's slice of the batch is its own pool.
                pools = (idx // (R_all.shape[0] // self.acc.num_processes)) if per_process else None
                cr = assign_credit(R_all[idx].double(), ccfg, pools=pools)
                adv = group_advantages(
                    cr.rewards, batch.indices[idx], global_std=self.cfg.advantage.global_std, clip_max=self.cfg.advantage.clip_max
                )
                adv_all[idx] = adv.advantages.float()
                keep_all[idx] = adv.keep
                credited.append((cr, adv))
            advantages.append(adv_all[rows].to(self.acc.device))
            keep.append(keep_all[rows].to(self.acc.device))
            active.append(bool(keep_all.any()))
        return EpochCredit(advantages, keep, active, credit_metrics(credited, W))

    def update(self, samples: EpochSamples, credit: EpochCredit) -> UpdateStats:
        """Clipped-surrogate updates on the stored transitions (:class:`~tpgrpo.update.PolicyUpdate`)."""
        rollouts = [batch.rollout for batch in samples.batches]
        return UpdateStats(self.updater(rollouts, credit.advantages, credit.keep, credit.active, epoch=self.epoch))

    def evaluate(self, epoch: int) -> EpochEval:
        """ODE samples of the test prompts (and ``eval.heldin_prompts`` train prompts) with the
        EMA weights: mean reward, per-constraint means, the training reward of the same images.
        The test prompts' per-prompt scores go to ``eval_scores/epoch_<N>.csv``."""
        e = self.cfg.eval
        test = self.test_set if e.num_prompts is None else self.test_set.take(list(range(min(e.num_prompts, len(self.test_set)))))
        extra = {} if self.eval_reward_fn is self.reward_fn else {"train_reward": self.reward_fn}
        self.policy.transformer.eval()
        with self.policy.ema_weights():
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
            rundir.write_eval_scores(self.run_dir, epoch, test.prompts, result.scores, result.extra_scores)
        return EpochEval(result.reward, details)

    def _evaluate_set(self, prompts: PromptSet, extra: dict[str, Any]) -> EvalResult:
        e = self.cfg.eval
        return evaluate_prompts(
            self.policy.adapter,
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
                run_step("checkpoint", epoch, self.save_checkpoint)
            if out_of_time:
                break
        if last_eval is None:
            last_eval = run_step("evaluate", self.epoch, lambda: self.evaluate(self.epoch))
        result = TrainResult(
            run_dir=self.run_dir,
            epochs=self.epoch,
            eval_reward_initial=self.eval_initial,
            eval_reward_final=last_eval.reward,
            eval_details=last_eval.details,
            minutes=self.minutes_before + (time.perf_counter() - started) / 60,
            history=self.history,
            eval_details_initial=self.eval_initial_details,
        )
        summary = key_metrics(result.summary, round(result.minutes, 3))
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

    # ------------------------------------------------------------------ checkpoints and outputs

    def save_checkpoint(self) -> None:
        """A checkpoint of the epoch (main process): weights, EMA, optimizer and the history without
        its wall-clock figures, so identical runs give identical checkpoints; then
        ``history.csv``/``timing.csv`` and the tracker run a resume continues. No RNG state: every
        draw of the training comes from a generator seeded by (seed, epoch, batch, process)."""
        self.acc.wait_for_everyone()
        if self.is_main:
            p = self.policy
            meta = {
                "epoch": self.epoch,
                "variant": self.variant,
                "num_processes": self.acc.num_processes,
                "eval_initial": self.eval_initial,
                "eval_initial_details": self.eval_initial_details,
                "optimizer_steps": self.updater.optimizer_steps,
                "config": result_fields(self.run_config.fields),
                "nonfinite_streak": self.updater.nonfinite_streak,
                "history": [rundir.without_timing(row) for row in self.history],
            }
            tmp = begin_checkpoint(self.run_dir / rundir.CHECKPOINTS, self.epoch)
            ema = p.trainable_state(ema=True) if p.ema is not None else None
            write_main_state(tmp, epoch=self.epoch, weights=p.trainable_state(), ema=ema, optimizer_state_dict=p.inner_optimizer.state_dict(), meta=meta)
            commit_checkpoint(tmp, world_size=self.acc.num_processes)
            rundir.write_history(self.run_dir, self.history)
            rundir.write_run_id(self.run_dir, self.tracker.run_id)
        self.acc.wait_for_everyone()

    def _resume(self) -> None:
        path = latest_checkpoint(self.run_dir / rundir.CHECKPOINTS)
        if path is None:
            return
        ckpt = load_checkpoint(path, world_size=self.acc.num_processes)
        if "config" in ckpt.meta:
            check_resume(ckpt.meta["config"], self.run_config.fields, self.run_dir)
        p = self.policy
        missing = set(p.trainable) - set(ckpt.weights)
        if missing:
            raise UserError(f"{path}: checkpoint lacks {len(missing)} trainable tensors (e.g. {sorted(missing)[0]}); different train.lora_* settings?")
        with torch.no_grad():
            for n, param in p.trainable.items():
                param.copy_(ckpt.weights[n])
            if p.ema is not None and ckpt.ema is not None:
                p.ema.load(ckpt.ema)
        if ckpt.optimizer is not None:
            p.inner_optimizer.load_state_dict(ckpt.optimizer)
        self.epoch = ckpt.epoch
        self.history = rundir.restore_timing(self.run_dir, ckpt.meta.get("history", []))
        self.eval_initial = ckpt.meta.get("eval_initial")
        self.eval_initial_details = dict(ckpt.meta.get("eval_initial_details", {}))
        # Wall-clock minutes so far (the time budget's clock), from timing.csv; 0 when it is gone.
        self.minutes_before = float(self.history[-1].get("time/minutes", 0.0)) if self.history else 0.0
        self.updater.optimizer_steps = int(ckpt.meta.get("optimizer_steps", 0))
        self.updater.nonfinite_streak = int(ckpt.meta.get("nonfinite_streak", 0))

    def write_outputs(self, result: TrainResult) -> None:
        """history.csv, timing.csv, metrics.json, summary.json and the final EMA weights (main
        process), logged to the tracker; then a barrier."""
        if self.is_main:
            rundir.write_history(self.run_dir, result.history)
            rundir.write_metrics(self.run_dir, result.metrics, result.summary)
            final = self.policy.save_final_weights(self.run_dir / "final")
            self.tracker.log_artifact(final, None)
            for name in (rundir.METRICS, rundir.SUMMARY, rundir.HISTORY, rundir.TIMING, rundir.EVAL_SCORES):
                self.tracker.log_artifact(self.run_dir / name)
        self.acc.wait_for_everyone()


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
    """Train one run end to end inside its lifecycle (:func:`tpgrpo.rundir.tracked_run`: lock,
    ``restart``, resume check, MLflow run opened and closed); the body of ``tpgrpo train`` and of
    the Prefect training flow. ``name``: run name and directory under ``runs_dir``; ``variant``:
    the variant it trains (tag), default ``name``; ``parent_run_id``: MLflow run to nest under (an
    ablation); ``run_step``: how each step runs (see :meth:`Trainer.fit`).

    ``train.num_threads`` (when not 0) sets torch's CPU threads for the run, restored after: an
    ablation's in-process runs share this process.
    """
    acc = Accelerator(mixed_precision=cfg.train.mixed_precision)
    is_main, barrier = acc.is_main_process, acc.wait_for_everyone
    threads = torch.get_num_threads()
    with rundir.tracked_run(cfg, name=name, variant=variant or name, is_main=is_main, restart=restart,
                            parent_run_id=parent_run_id, tags=tags, barrier=barrier) as tracker:
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        try:
            trainer = Trainer(cfg, variant=name, tracker=tracker, accelerator=acc)
            try:
                result = trainer.fit(run_step)
            finally:
                trainer.executor.shutdown(wait=False, cancel_futures=True)
        finally:
            torch.set_num_threads(threads)
    return RunOutcome(result, tracker.run_id, acc.is_main_process)

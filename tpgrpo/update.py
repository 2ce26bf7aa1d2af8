"""The policy update: clipped-surrogate steps on the stored transitions of an epoch's rollouts.

:class:`PolicyUpdate` owns the optimizer-step bookkeeping (steps taken, non-finite steps in a row),
which a checkpoint saves and a resume restores.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Sequence

import torch
from accelerate import Accelerator
from torch import Tensor

from tpgrpo.checkpoint import latest_checkpoint
from tpgrpo.config import TrainSection
from tpgrpo.errors import TrainingError
from tpgrpo.loss import LossOutput, grpo_loss
from tpgrpo.policy import Policy
from tpgrpo.rollout import Rollout
from tpgrpo.sde import sde_step


class PolicyUpdate:
    """Updates of ``policy`` under ``train`` settings; ``checkpoints``: the run's checkpoint
    directory, named when too many non-finite updates stop the run."""

    def __init__(self, policy: Policy, acc: Accelerator, train: TrainSection, checkpoints: Path) -> None:
        self.policy, self.acc, self.train, self.checkpoints = policy, acc, train, checkpoints
        self.optimizer_steps = 0
        self.nonfinite_streak = 0
        self.epoch = 0

    def __call__(self, rollouts: Sequence[Rollout], advantages: Sequence[Tensor], keep: Sequence[Tensor], active: Sequence[bool], *, epoch: int) -> dict[str, float]:
        """Clipped-surrogate updates on the stored transitions.

        Gradients accumulate over the W steps of the window and over ``train.gradient_accumulation``
        rollout batches per optimizer step, each kept row weighted equally within a step (so one
        step over A accumulated batches is one step over a batch holding their rows), in forwards
        of at most ``train.micro_batch_size`` rows. The EMA is offered an update after every batch
        (the published cadence, see :mod:`tpgrpo.ema`). A step with a non-finite gradient norm is
        skipped; ``train.max_nonfinite_updates`` of them in a row stop the run.
        """
        start = time.perf_counter()
        t = self.train
        A = t.gradient_accumulation
        sums: dict[str, float] = {}
        grad_norms: list[float] = []
        batches_trained = nonfinite = 0
        self.policy.ddp_transformer.train()
        self.epoch = epoch
        batches = list(zip(rollouts, advantages, keep, active))
        for _ in range(t.inner_epochs):
            for first in range(0, len(batches), A):
                group = batches[first : first + A]
                # Rows kept on this process over the whole step: the denominator of its mean.
                rows_in_step = sum(int(keep.sum()) for _, _, keep, active in group if active)
                last_active = max((i for i, (*_, active) in enumerate(group) if active), default=None)
                losses_finite = True
                for i, (batch, adv, keep, active) in enumerate(group):
                    if active:
                        losses_finite &= self.accumulate(batch, adv, keep, rows_in_step, sums, sync=i == last_active)
                        batches_trained += 1
                    if i == len(group) - 1:
                        nonfinite += not self._optimizer_step(
                            grad_norms, has_gradients=last_active is not None, losses_finite=losses_finite
                        )
                    if self.policy.ema is not None:
                        self.policy.ema.update(self.optimizer_steps)
        metrics = {name: value / max(batches_trained, 1) for name, value in sums.items()}
        if grad_norms:
            metrics["grad_norm"] = sum(grad_norms) / len(grad_norms)
        metrics["optimizer/steps"] = float(self.optimizer_steps)
        metrics["skipped/nonfinite_updates"] = float(nonfinite)
        metrics["time/update_s"] = time.perf_counter() - start
        return metrics

    def accumulate(
        self, ro: Rollout, adv: Tensor, keep: Tensor, rows_in_step: int, sums: dict[str, float], *, sync: bool
    ) -> bool:
        """Backward passes of one rollout batch's kept rows: every window step, in micro-batches;
        gradients reduce across processes only in the last backward of the optimizer step.
        Returns whether every loss was finite."""
        W = adv.shape[1]
        rows = keep.nonzero().flatten()
        scale = 1.0 / max(rows_in_step, 1)
        if rows.numel() == 0:
            # Nothing to learn here, but every process must run the same synced backward (DDP
            # all-reduces inside it): one row with zero weight.
            rows, scale = torch.zeros(1, dtype=torch.long, device=keep.device), 0.0
        chunks = rows.split(self.train.micro_batch_size or rows.numel())
        batch_terms: dict[str, float] = {}
        finite = True
        for c, chunk in enumerate(chunks):
            embeds = ro.embeds.select(chunk)
            for k in range(W):
                last = sync and c == len(chunks) - 1 and k == W - 1
                with nullcontext() if last else self.acc.no_sync(self.policy.ddp_transformer):
                    out = self.step_loss(ro, chunk, k, embeds, adv[chunk, k])
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
        grad_norm = self.acc.clip_grad_norm_(list(self.policy.trainable.values()), self.train.max_grad_norm)
        grad_norms.append(float(grad_norm))
        # The norm is of the all-reduced gradients: every process takes the same branch.
        if torch.isfinite(grad_norm):
            self.policy.optimizer.step()
            self.nonfinite_streak = 0
            self.policy.optimizer.zero_grad(set_to_none=True)
            return True
        nan_loss = bool(self.acc.gather(torch.tensor([not losses_finite], device=self.acc.device)).any())
        if self.acc.scaler is not None:
            # fp16: the loss scaler skips the step itself and lowers its scale. With finite losses
            # that is an overflow of the scaled gradients, routine early in fp16 training, and no
            # sign of a broken run.
            self.policy.optimizer.step()
        self.policy.optimizer.zero_grad(set_to_none=True)
        if self.acc.scaler is None or nan_loss:
            self._count_nonfinite()
        return False

    def _count_nonfinite(self) -> None:
        """One more non-finite update in a row; too many stop the run."""
        self.nonfinite_streak += 1
        limit = self.train.max_nonfinite_updates
        if self.nonfinite_streak >= limit:
            latest = latest_checkpoint(self.checkpoints)
            where = f"its last checkpoint {latest} is intact" if latest else "no checkpoint was written yet"
            raise TrainingError(
                f"train.max_nonfinite_updates: {self.nonfinite_streak} non-finite updates in a row (NaN/Inf loss or "
                f"gradient norm) at epoch {self.epoch + 1}; the run stops, {where}; try a lower train.learning_rate "
                f"or train.mixed_precision=bf16"
            )

    def step_loss(self, ro: Rollout, rows: Tensor, k: int, embeds, advantages: Tensor) -> LossOutput:
        """The loss of window step k for ``rows`` of ``ro``, recomputing their log-probs [rows]."""
        s, t = ro.config, self.train  # the update recomputes log-probs as the rollout sampled
        z, z_next = ro.latents[rows, k], ro.latents[rows, k + 1]
        step_index = int(ro.step_indices[k])
        common = dict(noise_level=s.noise_level, sampler=s.sampler, log_prob_form=s.log_prob, prev_sample=z_next)
        v = self.policy.adapter.velocity(z, ro.timesteps[k], embeds, s.guidance_scale, transformer=self.policy.ddp_transformer)
        step = sde_step(v, z, ro.sigmas, step_index, **common)
        ref_mean = None
        if t.kl_beta > 0:
            with torch.no_grad(), self.policy.reference_model() as reference:
                v_ref = self.policy.adapter.velocity(z, ro.timesteps[k], embeds, s.guidance_scale, transformer=reference)
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


"""The policy update: accumulation and micro-batches against a plain per-row loop, the optimizer
step count, the update's direction, the EMA worked by hand, and non-finite updates."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tpgrpo.ema import WeightEMA
from tpgrpo.errors import ConfigError, TrainingError
from tpgrpo.loss import grpo_loss
from tpgrpo.sde import sde_step
from tpgrpo.steps import EpochCredit
from tpgrpo.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import trainer_config  # noqa: E402


def _cfg(root: Path, runs: str, **overrides):
    """Three steps, a window of 2, incremental credit, two batches accumulated into one step."""
    sections = {
        "seed": 5,
        "sample": {"num_steps": 3, "window_size": 2},
        "credit": {"mode": "incremental"},
        "train": {"epochs": 1, "gradient_accumulation": 2, "max_grad_norm": 1e6},
        "eval": {"num_steps": 3, "num_prompts": 2},
    }
    return trainer_config(root, runs, sections, **overrides)


def _reference_gradients(trainer: Trainer, samples, credit) -> dict[str, torch.Tensor]:
    """The step's gradient, one row and one window step at a time: each kept row of every batch
    weighs 1 / (rows * W), the loss built from the adapter, the SDE step and the surrogate."""
    s, t = trainer.cfg.sample, trainer.cfg.train
    kept = [(b, int(r)) for b, keep in enumerate(credit.keep) for r in keep.nonzero().flatten()]
    grads = {n: torch.zeros_like(p) for n, p in trainer.policy.trainable.items()}
    for b, r in kept:
        ro = samples.batches[b].rollout
        row = torch.tensor([r])
        for k in range(s.window_size):
            z, z_next = ro.latents[row, k], ro.latents[row, k + 1]
            i = int(ro.step_indices[k])
            common = dict(noise_level=s.noise_level, sampler=s.sampler, log_prob_form=s.log_prob, prev_sample=z_next)
            v = trainer.policy.adapter.velocity(z, ro.timesteps[k], ro.embeds.select(row), s.guidance_scale)
            step = sde_step(v, z, ro.sigmas, i, **common)
            with torch.no_grad(), trainer.policy.reference_model() as reference:
                v_ref = trainer.policy.adapter.velocity(z, ro.timesteps[k], ro.embeds.select(row), s.guidance_scale, transformer=reference)
                ref_mean = sde_step(v_ref, z, ro.sigmas, i, **common).mean
            out = grpo_loss(
                step.log_prob, ro.log_probs[row, k], credit.advantages[b][row, k],
                clip_range=t.clip_range, beta=t.kl_beta, mean=step.mean, ref_mean=ref_mean, std=step.std,
            )
            parts = torch.autograd.grad(out.loss / (len(kept) * s.window_size), list(trainer.policy.trainable.values()))
            for (name, _), g in zip(trainer.policy.trainable.items(), parts):
                grads[name] += g
    return grads


def _epoch(trainer: Trainer):
    samples = trainer.rollout(0)
    credit = trainer.credit(samples, trainer.score(samples))
    return samples, credit


@pytest.mark.parametrize("micro", [None, 1, 3])
def test_accumulated_micro_batched_step_is_one_step_over_all_rows(trainer_workspace: Path, micro) -> None:
    """Two accumulated rollout batches, in micro-batches of any size, take the step that one batch
    holding all their rows takes: the gradient of the mean loss over every kept row (plain loop),
    then one AdamW step."""
    trainer = Trainer(_cfg(trainer_workspace, f"runs-acc-{micro}", **{"train.micro_batch_size": micro or "null"}), variant="v")
    samples, credit = _epoch(trainer)
    # Drop a row, so the two batches hold different numbers of rows and a per-batch mean
    # (instead of the per-row mean of the step) would show.
    credit.keep[0][0] = False
    assert int(credit.keep[0].sum()) != int(credit.keep[1].sum()) and all(credit.active)
    before = {n: p.detach().clone() for n, p in trainer.policy.trainable.items()}
    grads = _reference_gradients(trainer, samples, credit)

    names = list(before)
    params = [torch.nn.Parameter(before[n].clone()) for n in names]
    for p, n in zip(params, names):
        p.grad = grads[n].clone()
    t = trainer.cfg.train
    torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
    torch.optim.AdamW(params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay).step()

    seen: dict[str, torch.Tensor] = {}
    step = trainer.policy.optimizer.step

    def record_then_step(*args, **kwargs):
        seen.update({n: p.grad.detach().clone() for n, p in trainer.policy.trainable.items()})
        return step(*args, **kwargs)

    trainer.policy.optimizer.step = record_then_step
    stats = trainer.update(samples, credit)
    assert stats.metrics["optimizer/steps"] == 1.0
    scale = max(float(g.abs().max()) for g in grads.values())
    assert scale > 1e-3  # a gradient large enough for the comparison to mean something
    for n in names:
        torch.testing.assert_close(seen[n], grads[n], atol=1e-6 * scale, rtol=0)
    # Adam's first step is nearly lr * sign(g), so float noise in a gradient near 0 shows at lr.
    for p, n in zip(params, names):
        torch.testing.assert_close(trainer.policy.trainable[n].detach(), p.detach(), atol=1e-5, rtol=0)


def test_optimizer_steps_follow_the_accumulation(trainer_workspace: Path) -> None:
    """history.csv counts optimizer steps: batches_per_epoch / gradient_accumulation per epoch."""
    import csv

    for accumulation, expected in ((2, [1.0, 2.0]), (1, [2.0, 4.0])):
        cfg = _cfg(trainer_workspace, f"runs-steps-{accumulation}", **{"train.epochs": 2, "train.gradient_accumulation": accumulation, "eval.every": 2})
        trainer = Trainer(cfg, variant="v")
        trainer.fit()
        with open(Path(cfg.runs_dir) / "v" / "history.csv") as f:
            assert [float(row["optimizer/steps"]) for row in csv.DictReader(f)] == expected


def test_accumulation_must_divide_the_epoch(trainer_workspace: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.gradient_accumulation: expected a divisor of sample\.batches_per_epoch \(2\), got 3"):
        _cfg(trainer_workspace, "runs-bad", **{"train.gradient_accumulation": 3})
    with pytest.raises(ConfigError, match=r"train\.micro_batch_size"):
        _cfg(trainer_workspace, "runs-bad", **{"train.micro_batch_size": 0})


def test_update_raises_the_log_prob_of_a_positive_advantage(trainer_workspace: Path) -> None:
    """At ratio 1 the step moves the policy towards a transition with a positive advantage and away
    from one with a negative advantage."""
    for sign in (1.0, -1.0):
        trainer = Trainer(_cfg(trainer_workspace, f"runs-dir-{sign}", **{"train.kl_beta": 0.0, "train.ema_decay": "null"}), variant="v")
        samples, credit = _epoch(trainer)
        advantages = [torch.zeros_like(a) for a in credit.advantages]
        keep = [torch.zeros_like(k) for k in credit.keep]
        advantages[0][0] = sign
        keep[0][0] = True
        trainer.update(samples, EpochCredit(advantages, keep, [True, False], {}))
        ro = samples.batches[0].rollout
        s = trainer.cfg.sample
        row = torch.tensor([0])
        change = 0.0
        with torch.no_grad():
            for k in range(s.window_size):
                v = trainer.policy.adapter.velocity(ro.latents[row, k], ro.timesteps[k], ro.embeds.select(row), s.guidance_scale)
                step = sde_step(v, ro.latents[row, k], ro.sigmas, int(ro.step_indices[k]), noise_level=s.noise_level,
                                sampler=s.sampler, log_prob_form=s.log_prob, prev_sample=ro.latents[row, k + 1])
                change += float(step.log_prob - ro.log_probs[row, k])
        assert change * sign > 0, (sign, change)


def test_ema_by_hand() -> None:
    """decay min((1+s)/(10+s), max) at optimizer step s, applied when (s+1) % every == 0; 0 at s=0."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    ema = WeightEMA({"w": p}, decay=0.9, every=8)
    with torch.no_grad():
        p.copy_(torch.tensor([3.0, 2.0]))
    assert not ema.update(3)
    assert torch.equal(ema.state()["w"], torch.tensor([1.0, -2.0]))
    assert ema.update(7)
    d = 8 / 17  # s = 7
    torch.testing.assert_close(ema.state()["w"], torch.tensor([d * 1 + (1 - d) * 3, d * -2 + (1 - d) * 2]))
    assert ema.decay_at(1000) == 0.9 and ema.decay_at(0) == 0.0 and ema.decay_at(1) == pytest.approx(2 / 11)
    with ema.swapped_in():
        torch.testing.assert_close(p.detach(), ema.state()["w"])
    assert torch.equal(p.detach(), torch.tensor([3.0, 2.0]))


def test_nonfinite_updates_are_skipped_then_stop_the_run(trainer_workspace: Path, monkeypatch) -> None:
    """A NaN loss skips the optimizer step (weights unchanged, counted); max_nonfinite_updates in a
    row stop the run with a one-line error and leave the last checkpoint as it was."""
    import tpgrpo.update as update_module
    from tpgrpo.checkpoint import latest_checkpoint, load_checkpoint

    cfg = _cfg(trainer_workspace, "runs-nan", **{"train.epochs": 3, "train.max_nonfinite_updates": 2, "eval.every": 5})
    trainer = Trainer(cfg, variant="v")
    real = update_module.grpo_loss
    state = {"poison": False}

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        if state["poison"]:
            return type(out)(**{**out.__dict__, "loss": out.loss * float("nan")})
        return out

    monkeypatch.setattr(update_module, "grpo_loss", poisoned)
    samples, credit = _epoch(trainer)
    state["poison"] = True
    before = trainer.policy.trainable_state()
    stats = trainer.update(samples, credit)
    # The step is skipped but keeps its place in the schedule (the published global_step).
    assert stats.metrics["skipped/nonfinite_updates"] == 1.0 and stats.metrics["optimizer/steps"] == 1.0
    after = trainer.policy.trainable_state()
    assert all(torch.equal(before[n], after[n]) for n in before)

    state["poison"] = False
    # Two steps an epoch, so the second epoch's two NaN steps stop the run before its checkpoint.
    cfg = _cfg(trainer_workspace, "runs-nan", **{"train.epochs": 3, "train.max_nonfinite_updates": 2, "eval.every": 5, "train.gradient_accumulation": 1})
    trainer = Trainer(cfg, variant="v2")
    original_update = trainer.update

    def update_then_poison(samples, credit):
        out = original_update(samples, credit)
        state["poison"] = True  # epoch 1 trains; every step after it is NaN
        return out

    trainer.update = update_then_poison
    with pytest.raises(TrainingError, match=r"^train\.max_nonfinite_updates: 2 non-finite updates in a row .*epoch-000001 is intact") as err:
        trainer.fit()
    assert "\n" not in str(err.value)
    latest = latest_checkpoint(Path(cfg.runs_dir) / "v2" / "checkpoints")
    assert latest is not None and latest.name == "epoch-000001"
    assert load_checkpoint(latest).meta["optimizer_steps"] == 2


@pytest.mark.slow
def test_crash_between_accumulated_batches_resumes_bitwise(trainer_workspace: Path, monkeypatch) -> None:
    """A run that dies in epoch 2's update, after the first of the two batches of an optimizer step
    (gradients half accumulated), resumes from epoch 1's checkpoint and ends bitwise equal to a run
    never interrupted: weights, EMA (updated every other step) and step count."""
    overrides = {"train.epochs": 3, "train.ema_every": 2, "eval.every": 3}
    straight = Trainer(_cfg(trainer_workspace, "runs-crash-straight", **overrides), variant="v")
    straight.fit()

    crashing = Trainer(_cfg(trainer_workspace, "runs-crash", **overrides), variant="v")
    accumulate = crashing.updater.accumulate
    calls = {"n": 0}

    def die_in_epoch_2(*args, **kwargs):
        calls["n"] += 1
        finite = accumulate(*args, **kwargs)
        if calls["n"] == 3:  # epoch 2, first batch of its only optimizer step
            raise KeyboardInterrupt
        return finite

    crashing.updater.accumulate = die_in_epoch_2
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()
    crashing.executor.shutdown(wait=False, cancel_futures=True)
    del crashing

    resumed = Trainer(_cfg(trainer_workspace, "runs-crash", **overrides), variant="v")
    assert resumed.epoch == 1 and resumed.updater.optimizer_steps == 1
    resumed.fit()
    for ema in (False, True):
        a, b = straight.policy.trainable_state(ema=ema), resumed.policy.trainable_state(ema=ema)
        assert all(torch.equal(a[n], b[n]) for n in a), f"ema={ema}"
    assert resumed.updater.optimizer_steps == straight.updater.optimizer_steps == 3
    assert [row["optimizer/steps"] for row in resumed.history] == [1.0, 2.0, 3.0]

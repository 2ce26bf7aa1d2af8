"""The trainer end to end on a tiny SD3 pipeline: updates, MLflow, exact resume, bad rewards."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tpgrpo.errors import ConfigError, ModelLoadError, UserError
from tpgrpo.rewards import RewardOutput, register_reward
from tpgrpo.tracking import MLflowTracker
from tpgrpo.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import trainer_config  # noqa: E402


def _lora(trainer: Trainer) -> dict[str, torch.Tensor]:
    return trainer.policy.trainable_state()


def test_two_epochs_update_lora_and_log_to_mlflow(trainer_workspace: Path) -> None:
    import mlflow

    cfg = trainer_config(trainer_workspace, "runs-log")
    tracker = MLflowTracker(cfg.tracking.uri, cfg.tracking.experiment, run_name="tp_grpo")
    trainer = Trainer(cfg, variant="tp_grpo", tracker=tracker)
    before = _lora(trainer)
    result = trainer.fit()
    tracker.finish()
    after = _lora(trainer)
    assert result.epochs == 2
    assert any(not torch.equal(before[n], after[n]) for n in before), "LoRA weights did not change"
    run = mlflow.MlflowClient(cfg.tracking.uri).get_run(tracker.run_id)
    assert run.data.params["credit.mode"] == "turning_point"
    assert run.data.params["variant"] == "tp_grpo"
    for key in ("reward/mean", "eval/reward", "loss/policy", "approx_kl", "clip_fraction",
                "turning/rate_step_1", "turning/positive_share", "advantage/std", "time/update_s"):
        assert key in run.data.metrics, key
    history = mlflow.MlflowClient(cfg.tracking.uri).get_metric_history(tracker.run_id, "eval/reward")
    assert [m.step for m in history] == [0, 1, 2]
    out = trainer_workspace / "runs-log" / "tp_grpo"
    assert (out / "metrics.json").is_file() and (out / "history.csv").read_text().count("\n") == 3
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "samples" / "epoch_0002.png").is_file()

    # The exported LoRA, loaded as a user loads it, is the trained EMA model (alpha included).
    from tpgrpo.models import load_pipeline

    loaded = load_pipeline(trainer_workspace / "base")
    loaded.load_lora_weights(out / "final")
    config = trainer.policy.transformer.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, config.in_channels, 8, 8, generator=g)
    text = torch.randn(2, 5, config.joint_attention_dim, generator=g)
    pooled = torch.randn(2, config.pooled_projection_dim, generator=g)
    t = torch.tensor([700.0, 300.0])
    with torch.no_grad(), trainer.policy.ema_weights():
        trained = trainer.policy.transformer(x, text, pooled, t).sample
        with trainer.policy.reference_model() as base:
            untrained = base(x, text, pooled, t).sample
        exported = loaded.transformer(x, text, pooled, t).sample
    assert (trained - untrained).abs().max() > 1e-4  # the LoRA matters, so the check below can fail
    torch.testing.assert_close(exported, trained, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_resume_is_bitwise_exact(trainer_workspace: Path) -> None:
    straight = Trainer(trainer_config(trainer_workspace, "runs-straight"), variant="v")
    straight.fit()
    first = Trainer(trainer_config(trainer_workspace, "runs-resumed", **{"train.epochs": 1}), variant="v")
    first.fit()
    del first  # the "killed" process
    resumed = Trainer(trainer_config(trainer_workspace, "runs-resumed"), variant="v")
    assert resumed.epoch == 1
    resumed.fit()
    a, b = _lora(straight), _lora(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)
    ema_a, ema_b = straight.policy.trainable_state(ema=True), resumed.policy.trainable_state(ema=True)
    assert all(torch.equal(ema_a[n], ema_b[n]) for n in ema_a)
    assert len(resumed.history) == 2


def test_outcome_mode_skips_completions(trainer_workspace: Path) -> None:
    trainer = Trainer(trainer_config(trainer_workspace, "runs-outcome", **{"credit.mode": "outcome"}), variant="flow_grpo")
    samples = trainer.rollout(0)
    assert all(b.rollout.completion_images is None for b in samples.batches)
    scores = trainer.score(samples)
    assert all(torch.equal(R, R[:, -1:].expand_as(R)) for R in scores.R)


def _register(name: str, fn) -> None:
    register_reward(name, lambda: fn, overwrite=True)


def test_nonfinite_rewards_and_zero_variance_groups_are_counted(trainer_workspace: Path) -> None:
    def half_nan(images, prompts, metadata):
        scores = images.mean(dim=(1, 2, 3))
        scores[::2] = float("nan")
        return RewardOutput(scores=scores)

    _register("half_nan", half_nan)
    trainer = Trainer(trainer_config(trainer_workspace, "runs-nan", **{"reward.name": "half_nan", "train.epochs": 1}), variant="v")
    samples = trainer.rollout(0)
    scores = trainer.score(samples)
    assert scores.metrics["skipped/nonfinite"] > 0
    credit = trainer.credit(samples, scores)
    for keep, valid in zip(credit.keep, scores.valid):
        assert not keep[~valid].any()
    trainer.update(samples, credit)
    assert all(torch.isfinite(p).all() for p in trainer.policy.trainable.values())

    _register("constant", lambda images, prompts, metadata: RewardOutput(scores=torch.ones(len(prompts))))
    trainer = Trainer(trainer_config(trainer_workspace, "runs-const", **{"reward.name": "constant", "train.epochs": 1}), variant="v")
    before = _lora(trainer)
    samples = trainer.rollout(0)
    credit = trainer.credit(samples, trainer.score(samples))
    assert credit.metrics["skipped/trajectories"] == 8
    assert credit.metrics["skipped/zero_variance_groups"] == 4
    trainer.update(samples, credit)
    after = _lora(trainer)
    assert all(torch.equal(before[n], after[n]) for n in before)  # no signal, no step


def test_bad_input_is_one_line(trainer_workspace: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such pipeline directory"):
        Trainer(trainer_config(trainer_workspace, "runs-bad", **{"model.path": str(tmp_path / "nope")}), variant="v")
    with pytest.raises(ConfigError, match="distinct prompts"):
        Trainer(trainer_config(trainer_workspace, "runs-bad", **{"sample.batches_per_epoch": 40}), variant="v")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="not writable"):
        Trainer(trainer_config(trainer_workspace, "runs-bad", runs_dir=str(blocker)), variant="v")


def test_resume_with_a_changed_method_is_refused(trainer_workspace: Path) -> None:
    """A run trained as tp_grpo does not continue as outcome credit: one line naming the field, the
    run directory and its MLflow run untouched; an extended train.epochs resumes."""
    import hashlib

    import mlflow

    from tpgrpo.runguard import ConfigMismatchError
    from tpgrpo.trainer import train_variant_run

    cfg = trainer_config(trainer_workspace, "runs-guard", **{"train.epochs": 1})
    first = train_variant_run(cfg, name="tp_grpo")
    run_dir = first.result.run_dir

    def snapshot() -> dict[str, str]:
        return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run_dir.rglob("*")) if p.is_file()}

    before = snapshot()
    changed = trainer_config(trainer_workspace, "runs-guard", **{"train.epochs": 2, "credit.mode": "outcome"})
    with pytest.raises(ConfigMismatchError) as err:
        train_variant_run(changed, name="tp_grpo")
    message = str(err.value)
    assert "\n" not in message and "credit.mode: 'turning_point' -> 'outcome'" in message
    assert "train.epochs" not in message and "--restart" in message and "--run-name" in message
    assert snapshot() == before
    assert mlflow.MlflowClient(cfg.tracking.uri).get_run(first.run_id).info.status == "FINISHED"

    resumed = train_variant_run(trainer_config(trainer_workspace, "runs-guard", **{"train.epochs": 2}), name="tp_grpo")
    assert resumed.result.epochs == 2 and resumed.run_id == first.run_id


def test_evaluation_reports_held_in_prompts_training_reward_and_per_prompt_scores(trainer_workspace: Path) -> None:
    """Beside the test prompts: the first eval.heldin_prompts train prompts, the training reward
    of the same images, per-prompt scores per evaluation, and the base model's values, which
    survive a resume."""
    import csv
    import json

    from tpgrpo.data import load_prompt_set
    from tpgrpo.evaluate import evaluate_prompts
    from tpgrpo.rewards import build_reward
    from tpgrpo.policy import load_model

    sections = {"train": {"epochs": 1}, "eval": {"heldin_prompts": 6, "reward": {"name": "verifiable"}}}
    cfg = trainer_config(trainer_workspace, "runs-heldin", sections)
    Trainer(cfg, variant="tp_grpo").fit()
    out = trainer_workspace / "runs-heldin" / "tp_grpo"
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("heldin_reward", "train_reward", "color"):
        assert f"eval_{key}" in metrics and f"eval_{key}_initial" in metrics, key

    # The base model's held-in value is the strict reward of the first 6 train prompts, same noise.
    base = load_model(cfg, "cpu")
    heldin = load_prompt_set(trainer_workspace / "prompts" / "train.jsonl").take(list(range(6)))
    expected = evaluate_prompts(
        base, heldin, build_reward("verifiable"), num_steps=4, guidance_scale=2.0, batch_size=4, seed=cfg.seed, resolution=32
    )
    assert metrics["eval_heldin_reward_initial"] == pytest.approx(expected.reward, abs=1e-6)

    # Per-prompt scores: one row per test prompt; their means are the reported rewards.
    for epoch, suffix in ((0, "_initial"), (1, "")):
        with (out / "eval_scores" / f"epoch_{epoch:04d}.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert [r["index"] for r in rows] == ["0", "1", "2", "3"]
        assert sum(float(r["reward"]) for r in rows) / 4 == pytest.approx(metrics[f"eval_reward{suffix}"], abs=1e-6)
        assert sum(float(r["train_reward"]) for r in rows) / 4 == pytest.approx(metrics[f"eval_train_reward{suffix}"], abs=1e-6)

    # Extending the run resumes it: the base model's values are carried over, not re-measured.
    extended = trainer_config(trainer_workspace, "runs-heldin", {**sections, "train": {"epochs": 2}})
    Trainer(extended, variant="tp_grpo").fit()
    again = json.loads((out / "metrics.json").read_text())
    assert again["epochs"] == 2
    assert {k: v for k, v in again.items() if k.endswith("_initial")} == {k: v for k, v in metrics.items() if k.endswith("_initial")}

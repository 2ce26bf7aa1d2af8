"""Rollouts on a tiny SD3 pipeline: lockstep equals the sequential reference, ODE equals the pipeline."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tpgrpo.models import load_adapter
from tpgrpo.rewards import RewardOutput
from tpgrpo.rollout import RolloutConfig, rollout, rollout_sequential
from tpgrpo.scoring import reward_sequence

PROMPTS = ["a red circle", "two blue squares", "a red circle"]


def _x_T(pipe, n: int, seed: int = 0) -> torch.Tensor:
    return load_adapter(pipe).prepare_latents(n, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "cfg",
    [
        RolloutConfig(num_steps=6, window_start=0, window_size=5, sampler="cps", guidance_scale=2.0),
        RolloutConfig(num_steps=6, window_start=1, window_size=3, sampler="sde", guidance_scale=1.0),
        RolloutConfig(num_steps=5, window_start=2, window_size=3, sampler="cps", guidance_scale=3.0, micro_batch_size=4),
    ],
    ids=["cps-cfg-s0", "sde-nocfg-s1", "cps-microbatch-to-end"],
)
def test_lockstep_equals_sequential(tiny_pipe, cfg: RolloutConfig) -> None:
    x_T = _x_T(tiny_pipe, len(PROMPTS))
    a = rollout(tiny_pipe, PROMPTS, cfg, latents=x_T, generator=torch.Generator().manual_seed(1))
    b = rollout_sequential(tiny_pipe, PROMPTS, cfg, latents=x_T, generator=torch.Generator().manual_seed(1))
    B, W = len(PROMPTS), cfg.window_size
    assert a.completion_images.shape == (B, W + 1, 3, 32, 32)
    assert a.latents.shape == (B, W + 1, 4, 8, 8)
    assert a.log_probs.shape == (B, W)
    torch.testing.assert_close(a.completion_images, b.completion_images, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.log_probs, b.log_probs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.images, a.completion_images[:, W])
    # Lockstep: one forward per step (times micro-batches), fewer rows than one per completion
    # step, since each completion's first velocity is reused.
    N, s = cfg.num_steps, cfg.window_start
    cfg_rows = 2 if cfg.guidance_scale > 1 else 1
    completion_rows = sum(N - s - k - 1 for k in range(W)) * B
    assert a.stats.rows == (N * B + completion_rows) * cfg_rows
    assert b.stats.rows == (N * B + completion_rows + W * B) * cfg_rows
    if cfg.micro_batch_size is None:
        assert a.stats.passes == N


def test_pure_ode_completion_is_the_ode_image_from_the_same_noise(tiny_pipe) -> None:
    cfg = RolloutConfig(num_steps=5, window_start=1, window_size=3, guidance_scale=2.0)
    x_T = _x_T(tiny_pipe, 2, seed=3)
    ro = rollout(tiny_pipe, PROMPTS[:2], cfg, latents=x_T)
    ode = rollout(tiny_pipe, PROMPTS[:2], dataclasses.replace(cfg, noise_level=0.0, completions=False), latents=x_T)
    torch.testing.assert_close(ro.completion_images[:, 0], ode.images, rtol=0, atol=1e-5)
    # The SDE actually moved the trajectory away from the ODE path.
    assert (ro.images - ode.images).abs().max() > 1e-3


@pytest.mark.parametrize("guidance_scale", [1.0, 2.5])
def test_noise_level_zero_equals_the_diffusers_pipeline(tiny_pipe, guidance_scale: float) -> None:
    x_T = _x_T(tiny_pipe, 2, seed=4)
    cfg = RolloutConfig(num_steps=6, window_start=0, window_size=5, noise_level=0.0, guidance_scale=guidance_scale, completions=False)
    ro = rollout(tiny_pipe, PROMPTS[:2], cfg, latents=x_T)
    expected = tiny_pipe(
        PROMPTS[:2],
        latents=x_T.clone(),
        num_inference_steps=6,
        guidance_scale=guidance_scale,
        output_type="pt",
        max_sequence_length=load_adapter(tiny_pipe).max_sequence_length,
    ).images
    torch.testing.assert_close(ro.images, expected, rtol=0, atol=1e-6)
    assert torch.equal(ro.log_probs, torch.zeros(2, 5))


def test_same_generator_same_rollout_and_completions_off(tiny_pipe) -> None:
    cfg = RolloutConfig(num_steps=4, window_start=0, window_size=3, completions=False, guidance_scale=1.0)
    a = rollout(tiny_pipe, PROMPTS, cfg, generator=torch.Generator().manual_seed(9))
    b = rollout(tiny_pipe, PROMPTS, cfg, generator=torch.Generator().manual_seed(9))
    assert a.completion_images is None
    assert torch.equal(a.images, b.images) and torch.equal(a.log_probs, b.log_probs)
    assert a.stats.rows == 4 * len(PROMPTS)


def test_stored_transitions_replay_to_the_same_log_probs(tiny_pipe) -> None:
    from tpgrpo.sde import sde_step

    cfg = RolloutConfig(num_steps=5, window_start=1, window_size=3, guidance_scale=2.0, sampler="sde")
    ro = rollout(tiny_pipe, PROMPTS, cfg, generator=torch.Generator().manual_seed(5))
    adapter = load_adapter(tiny_pipe)
    for k in range(cfg.window_size):
        with torch.no_grad():
            v = adapter.velocity(ro.latents[:, k], ro.timesteps[k], ro.embeds, cfg.guidance_scale)
        step = sde_step(v, ro.latents[:, k], ro.sigmas, int(ro.step_indices[k]), noise_level=0.7, sampler="sde", prev_sample=ro.latents[:, k + 1])
        torch.testing.assert_close(step.log_prob, ro.log_probs[:, k], rtol=1e-4, atol=1e-4)


def test_reward_sequence_scores_each_completion_once(tiny_pipe) -> None:
    calls = []

    def brightness(images, prompts, metadata):
        calls.append(len(prompts))
        return RewardOutput(scores=images.mean(dim=(1, 2, 3)), details={"red": images[:, 0].mean(dim=(1, 2))})

    cfg = RolloutConfig(num_steps=4, window_start=0, window_size=3, guidance_scale=1.0)
    ro = rollout(tiny_pipe, PROMPTS, cfg, generator=torch.Generator().manual_seed(2))
    seq = reward_sequence(ro, PROMPTS, [{}] * 3, brightness)
    assert calls == [3 * 4]
    assert seq.R.shape == (3, 4) and seq.details["red"].shape == (3, 4)
    torch.testing.assert_close(seq.R[1, 2], ro.completion_images[1, 2].mean())
    torch.testing.assert_close(seq.final, ro.images.mean(dim=(1, 2, 3)))


def test_bad_input(tiny_pipe) -> None:
    with pytest.raises(ValueError, match="window"):
        RolloutConfig(num_steps=4, window_size=5)
    with pytest.raises(ValueError, match="prompts"):
        rollout(tiny_pipe, [], RolloutConfig(num_steps=2, window_size=1))
    with pytest.raises(ValueError, match="latents"):
        rollout(tiny_pipe, PROMPTS, RolloutConfig(num_steps=2, window_size=1), latents=_x_T(tiny_pipe, 2))
    no_completions = rollout(tiny_pipe, PROMPTS[:1], RolloutConfig(num_steps=2, window_size=1, completions=False))
    with pytest.raises(ValueError, match="completions=True"):
        reward_sequence(no_completions, PROMPTS[:1], [{}], lambda *a: None)

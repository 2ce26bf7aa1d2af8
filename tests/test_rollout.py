"""Rollouts on a tiny SD3 pipeline: lockstep equals the sequential reference, ODE equals the pipeline."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tpgrpo.models import load_adapter
from tpgrpo.rewards import RewardOutput
from tpgrpo.rollout import RolloutConfig, completion_grid, rollout, rollout_sequential
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


# --- completion estimators (one_step, coarse) ------------------------------------------------

WINDOW_1_4 = RolloutConfig(num_steps=6, window_start=1, window_size=4, sampler="cps", guidance_scale=2.0)


def _estimator(cfg: RolloutConfig, completion: str, steps: int = 2) -> RolloutConfig:
    return dataclasses.replace(cfg, completion=completion, completion_steps=steps)


def _pair(tiny_pipe, a: RolloutConfig, b: RolloutConfig, seed: int, fn_b=rollout):
    """Rollouts under two configs from the same x_T and SDE noise."""
    x_T = _x_T(tiny_pipe, len(PROMPTS), seed=seed)
    return (
        rollout(tiny_pipe, PROMPTS, a, latents=x_T, generator=torch.Generator().manual_seed(seed)),
        fn_b(tiny_pipe, PROMPTS, b, latents=x_T, generator=torch.Generator().manual_seed(seed)),
    )


def test_completion_grid_by_hand() -> None:
    cfg = RolloutConfig(num_steps=10, window_size=9, completion="coarse", completion_steps=4)
    assert completion_grid(cfg, 0) == [0, 2, 5, 7, 10]  # 10 steps left: l * 10 // 4
    assert completion_grid(cfg, 1) == [1, 3, 5, 7, 10]  # 9 left: steps of 2, 2, 2, 3
    assert completion_grid(cfg, 8) == [8, 9, 10]  # fewer left than completion_steps: all of them
    assert completion_grid(_estimator(cfg, "one_step"), 3) == [3, 10]
    assert completion_grid(_estimator(cfg, "ode"), 7) == [7, 8, 9, 10]


def test_one_step_completion_is_z_minus_sigma_v(tiny_pipe) -> None:
    cfg = _estimator(WINDOW_1_4, "one_step")
    ro, ode = _pair(tiny_pipe, cfg, WINDOW_1_4, seed=6)
    adapter = load_adapter(tiny_pipe)
    B, W = len(PROMPTS), cfg.window_size
    for k in range(W):
        z = ro.latents[:, k]
        with torch.no_grad():
            v = adapter.velocity(z, ro.timesteps[k], ro.embeds, cfg.guidance_scale)
            expected = adapter.decode(z - ro.sigmas[ro.step_indices[k]] * v)
        torch.testing.assert_close(ro.completion_images[:, k], expected, rtol=0, atol=1e-5)
    assert torch.equal(ro.completion_images[:, W], ro.images)
    # Free: the trajectories' N forwards and nothing else.
    assert ro.stats.completion_rows == 0
    assert ro.stats.passes == cfg.num_steps and ro.stats.rows == cfg.num_steps * B * 2
    # The same trajectories as with ODE completions, whose images it only estimates.
    torch.testing.assert_close(ro.latents, ode.latents, rtol=0, atol=1e-5)
    torch.testing.assert_close(ro.log_probs, ode.log_probs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ro.images, ode.images, rtol=0, atol=1e-5)
    assert (ro.completion_images[:, 0] - ode.completion_images[:, 0]).abs().max() > 1e-3


@pytest.mark.parametrize("steps", [5, 100], ids=["steps-left-of-z0", "more"])
def test_coarse_with_every_remaining_step_is_the_ode_completion(tiny_pipe, steps: int) -> None:
    coarse, ode = _pair(tiny_pipe, _estimator(WINDOW_1_4, "coarse", steps), WINDOW_1_4, seed=7)
    assert torch.equal(coarse.completion_images, ode.completion_images)
    assert coarse.stats == ode.stats


def test_coarse_with_one_step_is_one_step(tiny_pipe) -> None:
    coarse, one = _pair(tiny_pipe, _estimator(WINDOW_1_4, "coarse", 1), _estimator(WINDOW_1_4, "one_step"), seed=8)
    assert torch.equal(coarse.completion_images, one.completion_images)
    assert coarse.stats == one.stats


@pytest.mark.parametrize(
    "cfg",
    [
        RolloutConfig(num_steps=7, window_start=0, window_size=5, sampler="cps", guidance_scale=2.0,
                      completion="coarse", completion_steps=3),
        RolloutConfig(num_steps=6, window_start=1, window_size=3, sampler="sde", guidance_scale=1.0,
                      completion="coarse", completion_steps=2, micro_batch_size=4),
        RolloutConfig(num_steps=5, window_start=0, window_size=4, sampler="cps", guidance_scale=2.0,
                      completion="one_step"),
    ],
    ids=["coarse3-cfg-s0", "coarse2-nocfg-s1-microbatch", "one-step"],
)
def test_estimators_lockstep_equal_sequential(tiny_pipe, cfg: RolloutConfig) -> None:
    a, b = _pair(tiny_pipe, cfg, cfg, seed=1, fn_b=rollout_sequential)
    torch.testing.assert_close(a.completion_images, b.completion_images, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.log_probs, b.log_probs, rtol=1e-4, atol=1e-5)
    assert torch.equal(a.images, a.completion_images[:, cfg.window_size])
    B, N, s = len(PROMPTS), cfg.num_steps, cfg.window_start
    cfg_rows = 2 if cfg.guidance_scale > 1 else 1
    steps = [len(completion_grid(cfg, s + k)) - 1 for k in range(cfg.window_size)]
    # Lockstep reuses each first velocity and rides on the trajectory's forwards; the
    # sequential reference pays every step of every completion.
    assert a.stats.completion_rows == sum(n - 1 for n in steps) * B * cfg_rows
    assert b.stats.completion_rows == sum(steps) * B * cfg_rows
    assert a.stats.rows == N * B * cfg_rows + a.stats.completion_rows
    if cfg.micro_batch_size is None:
        assert a.stats.passes == N


@pytest.mark.parametrize("completion,steps", [("one_step", 1), ("coarse", 2), ("coarse", 5)])
def test_noise_level_zero_invariants_hold_for_every_estimator(tiny_pipe, completion: str, steps: int) -> None:
    # The window runs to the end, so z_{W-1} has one step left and every estimator is exact there.
    cfg = RolloutConfig(num_steps=6, window_start=1, window_size=5, noise_level=0.0, guidance_scale=2.5,
                        completion=completion, completion_steps=steps)
    ro, ode = _pair(tiny_pipe, cfg, _estimator(cfg, "ode"), seed=4)
    expected = tiny_pipe(
        PROMPTS,
        latents=_x_T(tiny_pipe, len(PROMPTS), seed=4),
        num_inference_steps=6,
        guidance_scale=2.5,
        output_type="pt",
        max_sequence_length=load_adapter(tiny_pipe).max_sequence_length,
    ).images
    torch.testing.assert_close(ro.images, expected, rtol=0, atol=1e-5)
    assert torch.equal(ro.log_probs, torch.zeros(len(PROMPTS), 5))
    assert torch.equal(ro.completion_images[:, -1], ro.images)
    torch.testing.assert_close(ro.latents, ode.latents, rtol=0, atol=1e-5)
    # Without noise the ODE completion of every z_k is the final image; an estimator that takes
    # all the steps left (here: at least the last state's) is that completion.
    exact = [k for k in range(cfg.window_size) if len(completion_grid(cfg, 1 + k)) - 1 == cfg.num_steps - 1 - k]
    assert exact and exact[-1] == cfg.window_size - 1
    for k in exact:
        torch.testing.assert_close(ro.completion_images[:, k], expected, rtol=0, atol=1e-5)


def test_bad_estimator_options() -> None:
    with pytest.raises(ValueError, match="completion: expected one of"):
        RolloutConfig(completion="two_step")
    with pytest.raises(ValueError, match="completion_steps"):
        RolloutConfig(completion="coarse", completion_steps=0)
    with pytest.raises(ValueError, match="start"):
        completion_grid(RolloutConfig(num_steps=4, window_size=2), 4)


def test_sample_section_sets_the_estimator_of_the_trainers_rollouts() -> None:
    from tpgrpo.config import ConfigError, config_from_dict
    from tpgrpo.rollout import rollout_config

    cfg = config_from_dict({"sample": {"completion": "coarse", "completion_steps": 3}})
    # rollout_config reads only the config: no model needed.
    rcfg = rollout_config(cfg)
    assert (rcfg.completion, rcfg.completion_steps, rcfg.completions) == ("coarse", 3, True)
    default = rollout_config(config_from_dict({}))
    assert (default.completion, default.completion_steps) == ("ode", 2)
    with pytest.raises(ConfigError, match="sample.completion_steps: input should be greater than or equal to 1"):
        config_from_dict({"sample": {"completion": "coarse", "completion_steps": 0}})
    with pytest.raises(ConfigError, match="sample.completion: input should be 'ode', 'one_step' or 'coarse'"):
        config_from_dict({"sample": {"completion": "two_step"}})


# --- baseline noise (R_0 from x_T or from fresh x_T') -----------------------------------------

BASELINE_CFG = RolloutConfig(num_steps=5, window_start=1, window_size=3, sampler="cps", guidance_scale=2.0)


def _ode_images(tiny_pipe, prompts, latents: torch.Tensor, cfg: RolloutConfig) -> torch.Tensor:
    """What the diffusers pipeline returns for these latents (the pure-ODE image)."""
    return tiny_pipe(
        list(prompts),
        latents=latents.clone(),
        num_inference_steps=cfg.num_steps,
        guidance_scale=cfg.guidance_scale,
        output_type="pt",
        max_sequence_length=load_adapter(tiny_pipe).max_sequence_length,
    ).images


def test_default_baseline_noise_is_shared(tiny_pipe) -> None:
    assert RolloutConfig().baseline_noise == "shared"
    a = rollout(tiny_pipe, PROMPTS, BASELINE_CFG, generator=torch.Generator().manual_seed(11))
    b = rollout(tiny_pipe, PROMPTS, dataclasses.replace(BASELINE_CFG, baseline_noise="shared"),
                generator=torch.Generator().manual_seed(11))
    for name in ("images", "completion_images", "latents", "log_probs", "initial_noise"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.baseline_latents is None and b.baseline_latents is None
    assert a.stats == b.stats


def _same_seed(tiny_pipe, fn, cfg: RolloutConfig, seed: int):
    """Shared and independent rollouts drawn from the same generator seed."""
    return (
        fn(tiny_pipe, PROMPTS, cfg, generator=torch.Generator().manual_seed(seed)),
        fn(tiny_pipe, PROMPTS, dataclasses.replace(cfg, baseline_noise="independent"),
           generator=torch.Generator().manual_seed(seed)),
    )


@pytest.mark.parametrize(
    "cfg",
    [
        RolloutConfig(num_steps=5, window_start=0, window_size=4, sampler="sde", guidance_scale=1.0),
        dataclasses.replace(BASELINE_CFG, completion="coarse", completion_steps=2),
    ],
    ids=["ode-nocfg-s0", "coarse2-cfg-s1"],
)
def test_independent_baseline_is_the_ode_image_from_fresh_noise(tiny_pipe, cfg: RolloutConfig) -> None:
    seed, B, W = 12, len(PROMPTS), cfg.window_size
    shared, ind = _same_seed(tiny_pipe, rollout, cfg, seed)
    # x_T' is the next draw of the generator after x_T and the SDE noise.
    g = torch.Generator().manual_seed(seed)
    adapter = load_adapter(tiny_pipe)
    x_T = adapter.prepare_latents(B, g)
    torch.randn((B, W, *x_T.shape[1:]), generator=g)
    assert torch.equal(ind.baseline_latents, adapter.prepare_latents(B, g))
    assert torch.equal(ind.initial_noise, x_T) and torch.equal(shared.initial_noise, x_T)
    assert (ind.baseline_latents - ind.initial_noise).abs().max() > 1.0
    # Completion 0: the pipeline's own (noise-free, full-schedule) image from x_T', whatever the
    # completion estimator, and not the shared run's completion 0.
    torch.testing.assert_close(ind.completion_images[:, 0], _ode_images(tiny_pipe, PROMPTS, ind.baseline_latents, cfg),
                               rtol=0, atol=1e-5)
    assert (ind.completion_images[:, 0] - shared.completion_images[:, 0]).abs().max() > 1e-3
    # Everything else is the shared run. The baseline's rows change the row count of some
    # forwards (all indices <= s), and the transformer is not batch-invariant on CPU (~1e-6), so
    # lockstep agrees to the lockstep-vs-sequential tolerance ...
    torch.testing.assert_close(ind.completion_images[:, 1:], shared.completion_images[:, 1:], rtol=0, atol=1e-5)
    torch.testing.assert_close(ind.latents, shared.latents, rtol=0, atol=1e-5)
    torch.testing.assert_close(ind.log_probs, shared.log_probs, rtol=1e-4, atol=1e-5)
    # ... and bit for bit wherever every forward has the same shape in both runs: the sequential
    # reference, and lockstep in micro-batches of B (each branch a forward of its own).
    for fn, micro in [(rollout_sequential, None), (rollout, B)]:
        a, b = _same_seed(tiny_pipe, fn, dataclasses.replace(cfg, micro_batch_size=micro), seed)
        assert torch.equal(b.baseline_latents, ind.baseline_latents)
        assert torch.equal(b.completion_images[:, 1:], a.completion_images[:, 1:]), fn.__name__
        assert torch.equal(b.images, a.images) and torch.equal(b.latents, a.latents), fn.__name__
        assert torch.equal(b.log_probs, a.log_probs), fn.__name__
    # Cost: the baseline joins all N forwards (N steps of B rows, no reused first velocity) and
    # z_0's completion (its grid's steps but the first) is gone; still N transformer calls.
    N, s = cfg.num_steps, cfg.window_start
    cfg_rows = 2 if cfg.guidance_scale > 1 else 1
    z0_rows = (len(completion_grid(cfg, s)) - 2) * B * cfg_rows
    assert ind.stats.completion_rows == shared.stats.completion_rows - z0_rows + N * B * cfg_rows
    assert ind.stats.rows == N * B * cfg_rows + ind.stats.completion_rows
    assert ind.stats.passes == shared.stats.passes == N


@pytest.mark.parametrize(
    "cfg",
    [
        BASELINE_CFG,
        RolloutConfig(num_steps=5, window_start=0, window_size=4, sampler="sde", guidance_scale=1.0),
        RolloutConfig(num_steps=5, window_start=2, window_size=3, sampler="cps", guidance_scale=3.0,
                      micro_batch_size=4, completion="coarse", completion_steps=2),
        RolloutConfig(num_steps=4, window_start=1, window_size=1, sampler="cps", guidance_scale=2.0,
                      completion="one_step"),
    ],
    ids=["ode-cfg-s1", "ode-nocfg-s0", "coarse-microbatch-to-end", "one-step-w1"],
)
def test_independent_baseline_lockstep_equals_sequential(tiny_pipe, cfg: RolloutConfig) -> None:
    cfg = dataclasses.replace(cfg, baseline_noise="independent")
    a = rollout(tiny_pipe, PROMPTS, cfg, generator=torch.Generator().manual_seed(13))
    b = rollout_sequential(tiny_pipe, PROMPTS, cfg, generator=torch.Generator().manual_seed(13))
    B, N, s, W = len(PROMPTS), cfg.num_steps, cfg.window_start, cfg.window_size
    assert a.completion_images.shape == (B, W + 1, 3, 32, 32)
    assert torch.equal(a.baseline_latents, b.baseline_latents)
    torch.testing.assert_close(a.completion_images, b.completion_images, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.log_probs, b.log_probs, rtol=1e-4, atol=1e-5)
    assert torch.equal(a.images, a.completion_images[:, W])
    cfg_rows = 2 if cfg.guidance_scale > 1 else 1
    steps = [len(completion_grid(cfg, s + k)) - 1 for k in range(1, W)]  # completions 1..W-1
    # Lockstep: the baseline's N steps plus each other completion's steps but its reused first.
    assert a.stats.completion_rows == (N + sum(n - 1 for n in steps)) * B * cfg_rows
    assert b.stats.completion_rows == (N + sum(steps)) * B * cfg_rows
    assert a.stats.rows == N * B * cfg_rows + a.stats.completion_rows
    assert b.stats.rows == N * B * cfg_rows + b.stats.completion_rows
    if cfg.micro_batch_size is None:
        assert a.stats.passes == N


def test_independent_baseline_without_completions_draws_nothing(tiny_pipe) -> None:
    cfg = dataclasses.replace(BASELINE_CFG, completions=False)
    a = rollout(tiny_pipe, PROMPTS, cfg, generator=torch.Generator().manual_seed(14))
    b = rollout(tiny_pipe, PROMPTS, dataclasses.replace(cfg, baseline_noise="independent"),
                generator=torch.Generator().manual_seed(14))
    assert b.baseline_latents is None and b.completion_images is None
    assert torch.equal(a.images, b.images) and a.stats == b.stats


def test_bad_baseline_noise() -> None:
    with pytest.raises(ValueError, match=r"baseline_noise: expected one of \('shared', 'independent'\)"):
        RolloutConfig(baseline_noise="fresh")

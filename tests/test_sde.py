"""SDE transitions: the formulas of DESIGN.md §1, the Euler limit, and the log-prob forms."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from tpgrpo.sde import default_log_prob_form, sde_step

SHAPE = (3, 4, 8, 8)


@pytest.fixture(scope="module")
def sigmas() -> torch.Tensor:
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    return scheduler.sigmas.clone()


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)


@pytest.mark.parametrize("sampler", ["sde", "cps"])
@pytest.mark.parametrize("step", range(10))
def test_noise_level_zero_is_the_scheduler_euler_step(sigmas: torch.Tensor, sampler: str, step: int) -> None:
    x, v, eps = _inputs(step)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    scheduler._step_index = step
    expected = scheduler.step(v, scheduler.timesteps[step], x).prev_sample
    out = sde_step(v, x, sigmas, step, noise_level=0.0, sampler=sampler, noise=eps)
    torch.testing.assert_close(out.sample, expected, rtol=0, atol=1e-6)
    assert torch.equal(out.log_prob, torch.zeros(SHAPE[0]))


def test_sde_matches_hand_computed_formula(sigmas: torch.Tensor) -> None:
    x, v, eps = _inputs(1)
    a, step = 0.7, 3
    s, s1 = float(sigmas[step]), float(sigmas[step + 1])
    dt = s1 - s
    std_t = a * math.sqrt(s / (1 - s))
    mean = x * (1 + std_t**2 / (2 * s) * dt) + v * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
    out = sde_step(v, x, sigmas, step, noise_level=a, sampler="sde", noise=eps)
    torch.testing.assert_close(out.mean, mean)
    torch.testing.assert_close(out.std, torch.full((3, 1, 1, 1), std_t * math.sqrt(-dt)))
    torch.testing.assert_close(out.sample, mean + std_t * math.sqrt(-dt) * eps)


def test_sde_first_step_uses_second_sigma(sigmas: torch.Tensor) -> None:
    # sigma_0 = 1 would make sqrt(sigma / (1 - sigma)) infinite; the published code divides by
    # 1 - sigmas[1] there instead.
    assert float(sigmas[0]) == 1.0
    x, v, eps = _inputs(2)
    a = 0.7
    s1 = float(sigmas[1])
    std_t = a * math.sqrt(1.0 / (1 - s1))
    out = sde_step(v, x, sigmas, 0, noise_level=a, sampler="sde", noise=eps)
    assert torch.isfinite(out.sample).all() and torch.isfinite(out.log_prob).all()
    torch.testing.assert_close(out.std, torch.full((3, 1, 1, 1), std_t * math.sqrt(1.0 - s1)))


def test_cps_matches_hand_computed_formula(sigmas: torch.Tensor) -> None:
    x, v, eps = _inputs(3)
    a, step = 0.7, 4
    s, s1 = float(sigmas[step]), float(sigmas[step + 1])
    std = s1 * math.sin(a * math.pi / 2)
    x0, x1 = x - s * v, x + (1 - s) * v
    mean = (1 - s1) * x0 + math.sqrt(s1**2 - std**2) * x1
    out = sde_step(v, x, sigmas, step, noise_level=a, sampler="cps", noise=eps)
    torch.testing.assert_close(out.mean, mean)
    torch.testing.assert_close(out.sample, mean + std * eps)
    torch.testing.assert_close(out.std, torch.full((3, 1, 1, 1), std))


@pytest.mark.parametrize("sampler", ["sde", "cps"])
@pytest.mark.parametrize("step", [0, 3, 8])
def test_gaussian_log_prob_equals_torch_normal(sigmas: torch.Tensor, sampler: str, step: int) -> None:
    x, v, eps = _inputs(4)
    out = sde_step(v, x, sigmas, step, noise_level=0.7, sampler=sampler, log_prob_form="gaussian", noise=eps)
    expected = torch.distributions.Normal(out.mean, out.std).log_prob(out.sample).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.log_prob, expected)


def test_cps_unnormalized_log_prob_is_minus_squared_error(sigmas: torch.Tensor) -> None:
    x, v, eps = _inputs(5)
    out = sde_step(v, x, sigmas, 2, noise_level=0.7, sampler="cps", noise=eps)
    expected = -((out.sample - out.mean) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.log_prob, expected)
    # = -std^2 * mean(eps^2): the scale the published clip range (1e-5) is tuned to.
    torch.testing.assert_close(out.log_prob, -(out.std.flatten() ** 2) * (eps**2).mean(dim=(1, 2, 3)))


def test_default_log_prob_forms() -> None:
    assert default_log_prob_form("sde") == "gaussian"
    assert default_log_prob_form("cps") == "unnormalized"


@pytest.mark.parametrize("sampler", ["sde", "cps"])
def test_log_prob_of_a_stored_transition_and_its_gradient(sigmas: torch.Tensor, sampler: str) -> None:
    x, v, eps = _inputs(6)
    taken = sde_step(v, x, sigmas, 5, noise_level=0.7, sampler=sampler, noise=eps)
    v2 = v.clone().requires_grad_(True)
    again = sde_step(v2, x, sigmas, 5, noise_level=0.7, sampler=sampler, prev_sample=taken.sample)
    torch.testing.assert_close(again.log_prob, taken.log_prob)
    torch.testing.assert_close(again.sample, taken.sample)
    again.log_prob.sum().backward()
    assert v2.grad is not None and v2.grad.abs().sum() > 0


def test_the_true_velocity_maximises_the_log_prob(sigmas: torch.Tensor) -> None:
    x, v, eps = _inputs(7)
    taken = sde_step(v, x, sigmas, 5, noise_level=0.7, sampler="sde", noise=torch.zeros_like(eps))
    perturbed = sde_step(v + 0.1, x, sigmas, 5, noise_level=0.7, sampler="sde", prev_sample=taken.sample)
    assert (perturbed.log_prob < taken.log_prob).all()


@pytest.mark.parametrize("sampler, tolerance", [("cps", 0.01), ("sde", 0.05)])
def test_marginal_std_matches_the_flow(sigmas: torch.Tensor, sampler: str, tolerance: float) -> None:
    # With x = sigma * noise (the image is 0), the exact velocity is noise; the step must keep
    # x' distributed as sigma' * N(0, 1), like the ODE's marginal. cps preserves it by
    # construction; the sde discretisation is first order, so only up to a few percent.
    g = torch.Generator().manual_seed(8)
    noise = torch.randn(20000, 1, generator=g)
    step = 4
    x = sigmas[step] * noise
    out = sde_step(noise, x, sigmas, step, noise_level=0.8, sampler=sampler, generator=g)
    assert abs(out.sample.std().item() / sigmas[step + 1].item() - 1) < tolerance


def test_last_step_cps_is_deterministic(sigmas: torch.Tensor) -> None:
    x, v, eps = _inputs(9)
    out = sde_step(v, x, sigmas, 9, noise_level=0.7, sampler="cps", log_prob_form="gaussian", noise=eps)
    torch.testing.assert_close(out.sample, x - sigmas[9] * v)
    assert torch.equal(out.log_prob, torch.zeros(3))


def test_bfloat16_velocity_is_upcast_and_cast_back(sigmas: torch.Tensor) -> None:
    x, v, eps = _inputs(10)
    out = sde_step(v.bfloat16(), x.bfloat16(), sigmas, 3, noise_level=0.7, noise=eps)
    assert out.sample.dtype == torch.bfloat16
    assert out.log_prob.dtype == out.mean.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sampler": "ddim"}, "sampler"),
        ({"log_prob_form": "exact"}, "log_prob_form"),
        ({"noise_level": -0.1}, "noise_level"),
        ({"step": 10}, "step"),
    ],
)
def test_bad_arguments(sigmas: torch.Tensor, kwargs: dict, match: str) -> None:
    x, v, _ = _inputs(11)
    args = {"noise_level": 0.7, "step": 0} | kwargs
    step = args.pop("step")
    with pytest.raises(ValueError, match=match):
        sde_step(v, x, sigmas, step, **args)

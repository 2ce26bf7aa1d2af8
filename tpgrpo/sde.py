"""One stochastic transition of the flow-matching ODE, with its Gaussian log-probability.

The sampler integrates the rectified-flow ODE ``dx/dsigma = v(x, sigma)`` on the
``FlowMatchEulerDiscreteScheduler`` sigma schedule (``sigmas[0] = 1`` is pure noise,
``sigmas[N] = 0`` is the image). Inside the SDE window each Euler step is replaced by a
Gaussian transition ``x' ~ N(mean, std^2)`` whose mean and std depend on the discretisation:

``sde`` (Flow-GRPO, reverse-time SDE with the same marginals as the ODE)::

    dt   = sigma' - sigma                                 (< 0)
    std_t = a * sqrt(sigma / (1 - sigma))                 (sigma = 1 -> 1 - sigmas[1] below)
    mean = x (1 + std_t^2 dt / (2 sigma)) + v (1 + std_t^2 (1 - sigma) / (2 sigma)) dt
    x'   = mean + std_t sqrt(-dt) eps                     transition std = std_t sqrt(-dt)

``cps`` (coefficient-preserving: the noise and signal coefficients of x' stay those of the
flow at sigma')::

    std  = sigma' sin(a pi / 2)
    x0   = x - sigma v,  x1 = x + (1 - sigma) v
    mean = (1 - sigma') x0 + sqrt(sigma'^2 - std^2) x1
    x'   = mean + std eps

``a`` is the noise level; ``a = 0`` gives ``mean = x + (sigma' - sigma) v``, the Euler step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Sampler = Literal["sde", "cps"]
LogProbForm = Literal["gaussian", "unnormalized"]

SAMPLERS: tuple[str, ...] = ("sde", "cps")
LOG_PROB_FORMS: tuple[str, ...] = ("gaussian", "unnormalized")

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass(frozen=True)
class SDEStep:
    """Result of one transition.

    Attributes:
        sample: ``x'`` [B, *], in the dtype of the velocity (as the diffusers scheduler does).
        log_prob: [B] float32, log-density of ``sample`` averaged over the non-batch dimensions.
            A row whose transition std is 0 (a deterministic step) has log-prob 0: a point mass
            has no density, and 0 keeps importance ratios exactly 1 there.
        mean: [B, *] float32 transition mean; it carries the gradient of the velocity.
        std: [B, 1, ..., 1] float32 transition std (already including ``sqrt(-dt)`` for ``sde``),
            the scale of the KL term ``(mean - mean_ref)^2 / (2 std^2)``.
    """

    sample: Tensor
    log_prob: Tensor
    mean: Tensor
    std: Tensor


def default_log_prob_form(sampler: Sampler) -> LogProbForm:
    """The published codes use the Gaussian density for ``sde`` and ``-(x' - mean)^2`` for ``cps``."""
    return "unnormalized" if sampler == "cps" else "gaussian"


def sde_step(
    velocity: Tensor,
    sample: Tensor,
    sigmas: Tensor,
    step: int,
    *,
    noise_level: float,
    sampler: Sampler = "sde",
    log_prob_form: LogProbForm | None = None,
    prev_sample: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> SDEStep:
    """Advance ``sample`` from ``sigmas[step]`` to ``sigmas[step + 1]``.

    Args:
        velocity: [B, *] predicted flow velocity at ``sample`` (classifier-free guided if CFG is on).
        sample: [B, *] current state ``x``.
        sigmas: [N + 1] the scheduler's sigma schedule (``scheduler.sigmas`` after ``set_timesteps``).
        step: time index ``i`` in ``0..N-1``.
        noise_level: ``a >= 0``; 0 is the deterministic Euler step.
        sampler: ``"sde"`` or ``"cps"``.
        log_prob_form: ``"gaussian"`` (exact log-density) or ``"unnormalized"`` (``-(x' - mean)^2``,
            the published cps form); ``None`` picks :func:`default_log_prob_form`.
        prev_sample: [B, *] an already taken ``x'`` whose log-prob is wanted (policy update);
            when given, no noise is drawn.
        noise: [B, *] standard normal noise to use instead of drawing it (for exact replays).
        generator: RNG for drawing the noise.

    Returns:
        :class:`SDEStep`.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {SAMPLERS}, got {sampler!r}")
    if log_prob_form is None:
        log_prob_form = default_log_prob_form(sampler)
    if log_prob_form not in LOG_PROB_FORMS:
        raise ValueError(f"log_prob_form: expected one of {LOG_PROB_FORMS}, got {log_prob_form!r}")
    if noise_level < 0:
        raise ValueError(f"noise_level: expected >= 0, got {noise_level}")
    if not 0 <= step < len(sigmas) - 1:
        raise ValueError(f"step: expected 0 <= step < {len(sigmas) - 1}, got {step}")
    if velocity.shape != sample.shape:
        raise ValueError(f"velocity {tuple(velocity.shape)} and sample {tuple(sample.shape)} differ in shape")

    out_dtype = velocity.dtype
    # The scheduler upcasts to float32 before stepping; doing the same keeps a = 0 bit-identical.
    x = sample.to(torch.float32)
    v = velocity.to(torch.float32)
    sigma = sigmas[step].to(device=x.device, dtype=torch.float32)
    sigma_next = sigmas[step + 1].to(device=x.device, dtype=torch.float32)
    dt = sigma_next - sigma
    view = (-1,) + (1,) * (x.ndim - 1)

    if noise_level == 0:
        mean = x + dt * v
        std = torch.zeros((), device=x.device)
    elif sampler == "sde":
        # sqrt(sigma / (1 - sigma)) is infinite at sigma = 1; the published code divides by
        # 1 - sigmas[1] there instead (numerator kept), so the first step stays finite.
        denom_sigma = torch.where(sigma == 1, sigmas[1].to(sigma), sigma)
        std_t = noise_level * torch.sqrt(sigma / (1 - denom_sigma))
        mean = x * (1 + std_t**2 / (2 * sigma) * dt) + v * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
        std = std_t * torch.sqrt(-dt)
    else:
        std = sigma_next * math.sin(noise_level * math.pi / 2)
        x0 = x - sigma * v
        x1 = x + (1 - sigma) * v
        mean = (1 - sigma_next) * x0 + torch.sqrt(sigma_next**2 - std**2) * x1

    std = std.expand(x.shape[0]).reshape(view)
    if prev_sample is None:
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        new = mean + std * noise.to(torch.float32)
    else:
        new = prev_sample.to(torch.float32)

    log_prob = _log_prob(new.detach(), mean, std, log_prob_form)
    return SDEStep(sample=new.to(out_dtype), log_prob=log_prob, mean=mean, std=std)


def _log_prob(x: Tensor, mean: Tensor, std: Tensor, form: LogProbForm) -> Tensor:
    """[B] log-density of ``x`` under ``N(mean, std^2)`` (or its unnormalised form), averaged over dims."""
    dims = tuple(range(1, x.ndim))
    sq = (x - mean) ** 2
    deterministic = (std == 0).reshape(-1)
    if form == "unnormalized":
        lp = (-sq).mean(dim=dims)
    else:
        safe_std = torch.where(std == 0, torch.ones_like(std), std)
        lp = (-sq / (2 * safe_std**2) - torch.log(safe_std) - _LOG_SQRT_2PI).mean(dim=dims)
    return torch.where(deterministic, torch.zeros_like(lp), lp)

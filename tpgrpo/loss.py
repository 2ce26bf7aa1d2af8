"""The clipped GRPO surrogate with a KL penalty towards the reference (base) policy.

For one SDE step of a batch of trajectories::

    ratio  = exp(logp_new - logp_old)
    policy = mean(max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)))
    kl     = mean_b( mean_dims((mean_new - mean_ref)^2) / (2 std^2) )
    loss   = policy + beta kl

Both transitions are Gaussians with the same std, so the KL of the step is exactly
``|mean_new - mean_ref|^2 / (2 std^2)`` per dimension.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class LossOutput:
    """Loss of one step and its statistics (statistics are detached).

    Attributes:
        loss: scalar, ``policy_loss + beta * kl_loss`` (differentiable).
        policy_loss: scalar, the clipped surrogate.
        kl_loss: scalar, KL to the reference (0 when no reference is given).
        approx_kl: scalar, ``0.5 * mean((logp_new - logp_old)^2)``, drift from the sampling policy.
        clip_fraction: scalar, share of rows with ``|ratio - 1| > clip_range``.
        ratio_mean: scalar, mean importance ratio.
    """

    loss: Tensor
    policy_loss: Tensor
    kl_loss: Tensor
    approx_kl: Tensor
    clip_fraction: Tensor
    ratio_mean: Tensor


def kl_to_reference(mean: Tensor, ref_mean: Tensor, std: Tensor) -> Tensor:
    """[B] KL between ``N(mean, std^2)`` and ``N(ref_mean, std^2)``, averaged over non-batch dims.

    Args:
        mean: [B, *] transition mean of the trained policy.
        ref_mean: [B, *] transition mean of the reference policy.
        std: broadcastable to [B, *] (e.g. [B, 1, 1, 1]), shared transition std; must be > 0.
    """
    dims = tuple(range(1, mean.ndim))
    return ((mean - ref_mean) ** 2 / (2 * std**2)).mean(dim=dims)


def grpo_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    *,
    clip_range: float,
    beta: float = 0.0,
    mean: Tensor | None = None,
    ref_mean: Tensor | None = None,
    std: Tensor | None = None,
) -> LossOutput:
    """Clipped surrogate plus ``beta`` times the KL to the reference.

    Args:
        log_prob: [B] log-prob of the stored transitions under the current policy.
        old_log_prob: [B] log-prob recorded at sampling time.
        advantages: [B] advantages of this step.
        clip_range: eps of the ratio clip.
        beta: KL weight; when > 0, ``mean``, ``ref_mean`` and ``std`` are required.
        mean: [B, *] transition mean under the current policy.
        ref_mean: [B, *] transition mean under the reference policy.
        std: [B, 1, ..., 1] transition std.

    Returns:
        :class:`LossOutput`.
    """
    if not (log_prob.shape == old_log_prob.shape == advantages.shape) or log_prob.ndim != 1:
        raise ValueError(
            "log_prob, old_log_prob and advantages must all be [B]; got "
            f"{tuple(log_prob.shape)}, {tuple(old_log_prob.shape)}, {tuple(advantages.shape)}"
        )
    if clip_range <= 0:
        raise ValueError(f"clip_range: expected > 0, got {clip_range}")
    if beta < 0:
        raise ValueError(f"beta: expected >= 0, got {beta}")

    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy_loss = torch.maximum(unclipped, clipped).mean()

    if beta > 0:
        if mean is None or ref_mean is None or std is None:
            raise ValueError("beta > 0 needs mean, ref_mean and std for the KL term")
        kl_loss = kl_to_reference(mean, ref_mean, std).mean()
    else:
        kl_loss = torch.zeros((), dtype=policy_loss.dtype, device=policy_loss.device)

    with torch.no_grad():
        approx_kl = 0.5 * (log_ratio**2).mean()
        clip_fraction = ((ratio - 1.0).abs() > clip_range).float().mean()
        ratio_mean = ratio.mean()
    return LossOutput(
        loss=policy_loss + beta * kl_loss,
        policy_loss=policy_loss.detach(),
        kl_loss=kl_loss.detach(),
        approx_kl=approx_kl,
        clip_fraction=clip_fraction,
        ratio_mean=ratio_mean,
    )

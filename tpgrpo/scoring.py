"""Turning rollouts into reward sequences ``R = [R_0, ..., R_W]`` for :func:`tpgrpo.credit.assign_credit`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from tpgrpo.rewards import RewardFunction
from tpgrpo.rollout import Rollout


@dataclass(frozen=True)
class RewardSequence:
    """Rewards of every ODE completion of a batch of trajectories.

    Attributes:
        R: [B, W+1] float32; ``R[:, 0]`` scores the pure-ODE image, ``R[:, W]`` the final image.
        details: per-component rewards, each [B, W+1] (NaN where a component does not apply).
    """

    R: Tensor
    details: dict[str, Tensor]

    @property
    def final(self) -> Tensor:
        """[B] reward of the final images."""
        return self.R[:, -1]


def reward_sequence(
    ro: Rollout,
    prompts: Sequence[str],
    metadata: Sequence[dict[str, Any]],
    reward_fn: RewardFunction,
) -> RewardSequence:
    """Score each completion image exactly once, in one call of the reward.

    Args:
        ro: a rollout sampled with ``completions=True``.
        prompts: the B prompts of the rollout.
        metadata: B metadata dicts (what the reward needs to check a prompt).
        reward_fn: a registry reward.

    Returns:
        :class:`RewardSequence` with R of shape [B, W+1].
    """
    if ro.completion_images is None:
        raise ValueError("reward_sequence needs a rollout sampled with completions=True")
    B, K = ro.completion_images.shape[:2]
    if len(prompts) != B or len(metadata) != B:
        raise ValueError(f"expected {B} prompts and metadata entries, got {len(prompts)} and {len(metadata)}")
    flat = ro.completion_images.reshape(B * K, *ro.completion_images.shape[2:])
    out = reward_fn(flat, [p for p in prompts for _ in range(K)], [m for m in metadata for _ in range(K)])
    return RewardSequence(
        R=out.scores.reshape(B, K).to(torch.float32),
        details={name: value.reshape(B, K) for name, value in out.details.items()},
    )

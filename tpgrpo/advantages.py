"""Group-relative advantages: per-prompt, per-step normalisation of step rewards.

For each SDE step k separately, the trajectories that share a prompt form a group and
``A = (r - mean_group) / (std_group + eps)`` (population std). With ``global_std`` the std is
taken over the whole batch at that step instead (the mean stays per prompt), which keeps
groups whose members all scored alike from being blown up to +-1.

A group is one prompt's ``group_size`` trajectories: the trainer passes each row's global prompt
index (every process knows the whole batch's indices from the sampling plan), so two prompts
with the same text still form two groups. Under data parallelism every process gathers the
rewards of all processes (groups are split across processes by the sampler), calls
:func:`group_advantages` on the gathered tensors, and keeps its own rows with :func:`local_rows`.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch
from torch import Tensor

EPS = 1e-4


@dataclass(frozen=True)
class Advantages:
    """Normalised advantages.

    Attributes:
        advantages: [B, W] float, clipped to ``[-clip_max, clip_max]``.
        keep: [B] bool, trajectories with at least one non-zero advantage (the rest carry no
            learning signal and are skipped in the update).
        group_ids: [B] long, index of each row's group (groups numbered in the order of their keys).
    """

    advantages: Tensor
    keep: Tensor
    group_ids: Tensor


def group_advantages(
    rewards: Tensor,
    groups: Tensor,
    *,
    global_std: bool = False,
    clip_max: float = 5.0,
    eps: float = EPS,
) -> Advantages:
    """Per-prompt, per-step normalised advantages.

    Args:
        rewards: [B, W] step rewards r_k (gathered over all processes).
        groups: [B] long, each row's group key (its prompt's index), gathered in the same order.
        global_std: divide by the std over the whole batch at each step instead of the group's.
        clip_max: advantages are clipped to ``[-clip_max, clip_max]``.
        eps: added to the std.

    Returns:
        :class:`Advantages`.
    """
    if rewards.ndim != 2:
        raise ValueError(f"rewards: expected [B, W], got shape {tuple(rewards.shape)}")
    if tuple(groups.shape) != (rewards.shape[0],):
        raise ValueError(f"groups: expected shape [{rewards.shape[0]}] (one key per row), got {tuple(groups.shape)}")
    if clip_max <= 0:
        raise ValueError(f"clip_max: expected > 0, got {clip_max}")

    r = rewards.to(torch.float64)
    keys, groups = torch.unique(groups.to(r.device), return_inverse=True)
    n_groups = keys.numel()
    counts = torch.zeros(n_groups, dtype=r.dtype, device=r.device).index_add_(0, groups, torch.ones_like(groups, dtype=r.dtype))
    sums = torch.zeros(n_groups, r.shape[1], dtype=r.dtype, device=r.device).index_add_(0, groups, r)
    mean = (sums / counts[:, None])[groups]
    centred = r - mean
    if global_std:
        std = r.std(dim=0, unbiased=False, keepdim=True) if r.shape[0] else r.new_zeros(1, r.shape[1])
    else:
        # Two passes (mean, then squared deviations) avoid the cancellation of E[x^2] - E[x]^2.
        sq = torch.zeros(n_groups, r.shape[1], dtype=r.dtype, device=r.device).index_add_(0, groups, centred**2)
        std = torch.sqrt(sq / counts[:, None])[groups]
    adv = (centred / (std + eps)).clamp(-clip_max, clip_max).to(rewards.dtype)
    return Advantages(advantages=adv, keep=(adv != 0).any(dim=1), group_ids=groups)


def local_rows(total: int, rank: int, world_size: int) -> slice:
    """Rows of a gathered batch that belong to ``rank`` (gather concatenates in rank order)."""
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank}")
    if total % world_size:
        raise ValueError(f"gathered batch of {total} rows does not split evenly over {world_size} processes")
    per = total // world_size
    return slice(rank * per, (rank + 1) * per)

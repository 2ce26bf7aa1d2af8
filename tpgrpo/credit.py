"""Step-level credit assignment: outcome (Flow-GRPO), incremental, and turning-point (TP-GRPO).

Input is the reward sequence of each trajectory, ``R = [R_0, ..., R_W]`` ([B, W+1]), where
``R_k`` scores the image obtained by completing the state after the k-th SDE step with the
deterministic ODE sampler (``R_0``: the pure-ODE image from the same noise; ``R_W``: the
trajectory's final image). Step k (1-based, k = 1..W) maps to column ``k - 1`` of the outputs.

Definitions (all vectorised over the batch and the steps):

- incremental reward ``d_k = R_k - R_{k-1}``; global trend ``delta = R_W - R_0``;
- local agreement ``s_k = sign(d_k) * sign(delta)``;
- turning point at ``k >= 2``: ``s_{k-1} < 0 and s_k > 0``; at ``k = 1`` (``first_step``): ``s_1 > 0``;
  with ``consistent``, additionally ``sign(d_k) * sign(R_W - R_k) > 0``;
- aggregated long-term reward ``r_agg_k = R_W - R_{k-1}``;
- ``balance``: when the batch's turning points have both signs of ``r_agg``, only the
  ``min(n+, n-)`` largest ``|r_agg|`` of each sign stay turning points (ties at the cut-off go
  to the earlier trajectory, then the earlier step); the others, and any with ``r_agg = 0``,
  become normal steps. With turning points of one sign only, nothing is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

CreditMode = Literal["outcome", "incremental", "turning_point"]
CREDIT_MODES: tuple[str, ...] = ("outcome", "incremental", "turning_point")
BalanceKey = Literal["aggregated", "trajectory"]


@dataclass(frozen=True)
class CreditConfig:
    """How per-step rewards are built from the reward sequence.

    Attributes:
        mode: ``outcome`` (r_k = R_W, Flow-GRPO), ``incremental`` (r_k = d_k) or
            ``turning_point`` (TP-GRPO).
        consistent: a turning point also needs the reward to keep moving its way afterwards.
        first_step: the first SDE step may be a turning point (its long-term effect).
        balance: equalise the number of positive and negative turning points in the batch.
        replace: at turning points r_k = eta * r_agg_k; otherwise r_k = d_k + eta * r_agg_k.
        eta: weight of the aggregated long-term reward.
    """

    mode: CreditMode = "turning_point"
    consistent: bool = True
    first_step: bool = True
    balance: bool = True
    balance_key: BalanceKey = "aggregated"
    replace: bool = True
    eta: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in CREDIT_MODES:
            raise ValueError(f"credit.mode: expected one of {CREDIT_MODES}, got {self.mode!r}")


@dataclass(frozen=True)
class CreditResult:
    """Per-step rewards and turning points.

    Attributes:
        rewards: [B, W] float, r_k.
        turning: [B, W] bool, the steps credited as turning points (after balancing); all False
            unless ``mode == "turning_point"``.
        detected: [B, W] bool, turning points before balancing, for every mode (diagnostics:
            how often a Flow-GRPO run *would* see turning points).
        increments: [B, W] float, d_k.
        aggregated: [B, W] float, r_agg_k = R_W - R_{k-1}.
    """

    rewards: Tensor
    turning: Tensor
    detected: Tensor
    increments: Tensor
    aggregated: Tensor


def detect_turning_points(R: Tensor, consistent: bool = True, first_step: bool = True) -> Tensor:
    """Turning points of each trajectory, before balancing.

    Args:
        R: [B, W+1] reward sequence.
        consistent: require ``sign(d_k) * sign(R_W - R_k) > 0``.
        first_step: allow ``k = 1`` (``s_1 > 0``).

    Returns:
        [B, W] bool.
    """
    _check_rewards(R)
    d = R[:, 1:] - R[:, :-1]
    delta = R[:, -1:] - R[:, :1]
    s = torch.sign(d) * torch.sign(delta)
    turning = torch.zeros_like(s, dtype=torch.bool)
    turning[:, 1:] = (s[:, :-1] < 0) & (s[:, 1:] > 0)
    if first_step:
        turning[:, 0] = s[:, 0] > 0
    if consistent:
        turning &= torch.sign(d) * torch.sign(R[:, -1:] - R[:, 1:]) > 0
    return turning


def balance_turning_points(turning: Tensor, aggregated: Tensor) -> Tensor:
    """Keep as many positive as negative turning points, preferring large ``|r_agg|``.

    Args:
        turning: [B, W] bool, detected turning points.
        aggregated: [B, W] float, r_agg at every step.

    Returns:
        [B, W] bool, the kept turning points.
    """
    flat_turn = turning.reshape(-1)
    flat_agg = aggregated.reshape(-1)
    pos = flat_turn & (flat_agg > 0)
    neg = flat_turn & (flat_agg < 0)
    n_keep = int(min(pos.sum().item(), neg.sum().item()))
    if n_keep == 0:
        return turning.clone()
    kept = torch.zeros_like(flat_turn)
    magnitude = flat_agg.abs()
    for side in (pos, neg):
        # Candidates of the other sign get -1 so they sort last; the stable sort breaks ties
        # in |r_agg| by position, which makes the choice deterministic.
        key = torch.where(side, magnitude, torch.full_like(magnitude, -1.0))
        order = torch.sort(key, descending=True, stable=True).indices
        kept[order[:n_keep]] = True
    return kept.reshape(turning.shape)


def assign_credit(R: Tensor, cfg: CreditConfig = CreditConfig()) -> CreditResult:
    """Per-step rewards r_k from reward sequences (DESIGN §1).

    Args:
        R: [B, W+1] float reward sequence ``[R_0, ..., R_W]``.
        cfg: credit options.

    Returns:
        :class:`CreditResult` with ``rewards`` and ``turning`` of shape [B, W].
    """
    _check_rewards(R)
    d = R[:, 1:] - R[:, :-1]
    aggregated = R[:, -1:] - R[:, :-1]
    detected = detect_turning_points(R, consistent=cfg.consistent, first_step=cfg.first_step)

    if cfg.mode == "outcome":
        rewards = R[:, -1:].expand_as(d).clone()
        turning = torch.zeros_like(detected)
    elif cfg.mode == "incremental":
        rewards = d.clone()
        turning = torch.zeros_like(detected)
    else:
        turning = balance_turning_points(detected, aggregated) if cfg.balance else detected
        credit = cfg.eta * aggregated if cfg.replace else d + cfg.eta * aggregated
        rewards = torch.where(turning, credit, d)
    return CreditResult(rewards=rewards, turning=turning, detected=detected, increments=d, aggregated=aggregated)


def _check_rewards(R: Tensor) -> None:
    if R.ndim != 2 or R.shape[1] < 2:
        raise ValueError(f"R: expected a [B, W+1] reward sequence with W >= 1, got shape {tuple(R.shape)}")
    if not torch.is_floating_point(R):
        raise ValueError(f"R: expected a floating-point tensor, got {R.dtype}")

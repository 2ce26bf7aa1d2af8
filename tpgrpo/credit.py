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
- ``balance``: within each pool of rows (the whole batch unless ``pools`` is given), when the
  turning points have both signs, only the ``min(n+, n-)`` largest of each sign stay turning
  points (ties at the cut-off go to the earlier trajectory, then the earlier step); the others,
  and any with no sign, become normal steps. With turning points of one sign only, nothing is
  dropped. ``balance_key`` says what "sign" and "largest" mean:

  - ``aggregated`` (default): the sign and ``|r_agg_k|`` of the turning point itself; a turning
    point with ``r_agg = 0`` has no sign.
  - ``trajectory`` (the published code): the sign and ``|delta|`` of its trajectory, shared by all
    turning points of that trajectory. ``sign(delta) = sign(d_k)`` at every turning point (each
    has ``s_k > 0``), so every turning point has a sign; with ``consistent`` it is also the sign
    of ``r_agg_k``, without it the two can differ. Ties (all turning points of one trajectory,
    trajectories with equal ``|delta|``) go by position as above, where the published code's
    ``topk`` leaves them unspecified.

- per-step reward in ``turning_point`` mode: ``d_k`` at normal steps; at turning points
  ``eta * r_agg_k`` (``replace``) or ``d_k + eta * r_agg_k``. Under ``trajectory`` a turning point
  with ``r_agg = 0`` keeps ``d_k`` (the published code replaces ``d_k`` only by a non-zero bonus);
  this can only happen without ``consistent``, and applies with or without ``balance``.

The published code (YunzeTong/TurningPoint-GRPO, ``scripts/my_train_sd3_fast_with_op3.py``, its
``use_balanced_bonus`` block) balances each process's sampling batch separately: pass that
grouping as ``pools``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

CreditMode = Literal["outcome", "incremental", "turning_point"]
CREDIT_MODES: tuple[str, ...] = ("outcome", "incremental", "turning_point")
BalanceKey = Literal["aggregated", "trajectory"]
BALANCE_KEYS: tuple[str, ...] = ("aggregated", "trajectory")


@dataclass(frozen=True)
class CreditConfig:
    """How per-step rewards are built from the reward sequence.

    Attributes:
        mode: ``outcome`` (r_k = R_W, Flow-GRPO), ``incremental`` (r_k = d_k) or
            ``turning_point`` (TP-GRPO).
        consistent: a turning point also needs the reward to keep moving its way afterwards.
        first_step: the first SDE step may be a turning point (its long-term effect).
        balance: equalise the number of positive and negative turning points in the batch
            (in each pool, see :func:`assign_credit`).
        balance_key: ``aggregated`` ranks turning points by their own ``|r_agg_k|``;
            ``trajectory`` (the published code) by their trajectory's ``|R_W - R_0|`` with the
            sign of ``d_k``, and leaves ``d_k`` at a turning point with ``r_agg_k = 0``.
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
        if self.balance_key not in BALANCE_KEYS:
            raise ValueError(f"credit.balance_key: expected one of {BALANCE_KEYS}, got {self.balance_key!r}")


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


def balance_turning_points(turning: Tensor, value: Tensor, pools: Tensor | None = None) -> Tensor:
    """Keep as many positive as negative turning points in each pool, preferring large ``|value|``.

    Args:
        turning: [B, W] bool, detected turning points.
        value: [B, W] float; its sign puts a turning point on the positive or the negative side
            (0: neither side) and its magnitude ranks it: ``r_agg`` for the ``aggregated`` key,
            ``R_W - R_0`` broadcast over the steps for ``trajectory``.
        pools: [B] integer pool id of each row; each pool is balanced on its own. None: one pool.

    Returns:
        [B, W] bool, the kept turning points: in a pool with turning points on both sides, the
        ``min(n+, n-)`` largest ``|value|`` of each side (ties: earlier row, then earlier step);
        in any other pool, all of its turning points.
    """
    B, W = turning.shape
    pool = _pool_index(pools, B, turning.device).repeat_interleave(W)  # [B*W], ids < B
    flat_turn = turning.reshape(-1)
    flat_value = value.reshape(-1)
    pos = flat_turn & (flat_value > 0)
    neg = flat_turn & (flat_value < 0)
    # Pool ids are < B, so B bins cover every pool without a device-to-host sync for the count.
    n_keep = torch.minimum(torch.bincount(pool[pos], minlength=B), torch.bincount(pool[neg], minlength=B))

    # Rank the candidates within their (pool, side) group: a stable sort by |value| (descending)
    # and then a stable sort by group keeps flat order (row, then step) among equal |value|.
    cand = (pos | neg).nonzero().flatten()
    group = 2 * pool[cand] + neg[cand].long()
    by_value = torch.sort(flat_value[cand].abs(), descending=True, stable=True).indices
    by_group = by_value[torch.sort(group[by_value], stable=True).indices]
    sizes = torch.bincount(group, minlength=2 * B)
    starts = torch.cumsum(sizes, 0) - sizes
    sorted_group = group[by_group]
    rank = torch.arange(cand.numel(), device=cand.device) - starts[sorted_group]
    chosen = torch.zeros_like(flat_turn)
    chosen[cand[by_group]] = rank < n_keep[sorted_group // 2]

    balanced = n_keep[pool] > 0
    return torch.where(balanced, chosen, flat_turn).reshape(turning.shape)


def assign_credit(R: Tensor, cfg: CreditConfig = CreditConfig(), pools: Tensor | None = None) -> CreditResult:
    """Per-step rewards r_k from reward sequences (DESIGN §1).

    Args:
        R: [B, W+1] float reward sequence ``[R_0, ..., R_W]``.
        cfg: credit options.
        pools: [B] integer pool id of each row: balancing runs within each pool separately (the
            published code balances each process's sampling batch). None: the whole batch.

    Returns:
        :class:`CreditResult` with ``rewards`` and ``turning`` of shape [B, W].
    """
    _check_rewards(R)
    _check_pools(pools, R.shape[0])
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
        trajectory_key = cfg.balance_key == "trajectory"
        if cfg.balance:
            value = (R[:, -1:] - R[:, :1]).expand_as(d) if trajectory_key else aggregated
            turning = balance_turning_points(detected, value, pools)
        else:
            turning = detected
        credit = cfg.eta * aggregated if cfg.replace else d + cfg.eta * aggregated
        if trajectory_key:
            # The published code drops d_k only where its bonus eta * r_agg is non-zero.
            credit = torch.where(aggregated == 0, d, credit)
        rewards = torch.where(turning, credit, d)
    return CreditResult(rewards=rewards, turning=turning, detected=detected, increments=d, aggregated=aggregated)


def _pool_index(pools: Tensor | None, B: int, device: torch.device) -> Tensor:
    """[B] long: the pool ids renumbered 0..P-1, all 0 when ``pools`` is None."""
    if pools is None:
        return torch.zeros(B, dtype=torch.long, device=device)
    _check_pools(pools, B)
    return torch.unique(pools.to(device), return_inverse=True)[1]


def _check_pools(pools: Tensor | None, B: int) -> None:
    if pools is None:
        return
    integer = not (pools.is_floating_point() or pools.is_complex() or pools.dtype == torch.bool)
    if pools.shape != (B,) or not integer:
        raise ValueError(f"pools: expected an integer tensor of shape ({B},), got {pools.dtype} {tuple(pools.shape)}")


def _check_rewards(R: Tensor) -> None:
    if R.ndim != 2 or R.shape[1] < 2:
        raise ValueError(f"R: expected a [B, W+1] reward sequence with W >= 1, got shape {tuple(R.shape)}")
    if not torch.is_floating_point(R):
        raise ValueError(f"R: expected a floating-point tensor, got {R.dtype}")

"""The figures an epoch logs about its rewards and its credit, as pure functions of the step's
tensors (the trainer gathers them over processes first)."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import Tensor

from tpgrpo.advantages import Advantages
from tpgrpo.credit import CreditResult


def mean_or_nan(values: Tensor) -> float:
    return float(values.mean()) if values.numel() else math.nan


def std_or_nan(values: Tensor) -> float:
    """Population std; NaN for no values."""
    return float(values.std(unbiased=False)) if values.numel() else math.nan


def reward_metrics(finals: Tensor, invalid: int, details: Mapping[str, Tensor]) -> dict[str, float]:
    """``reward/mean``, ``reward/std`` (population) of the finite final rewards [N],
    ``skipped/nonfinite`` (``invalid`` rows with a non-finite reward anywhere) and
    ``reward/<name>``: the mean of each reward component's finite values [N]."""
    finite = finals[torch.isfinite(finals)]
    metrics = {"reward/mean": mean_or_nan(finite), "reward/std": std_or_nan(finite), "skipped/nonfinite": float(invalid)}
    for name, values in details.items():
        metrics[f"reward/{name}"] = mean_or_nan(values[torch.isfinite(values)])
    return metrics


def credit_metrics(batches: Sequence[tuple[CreditResult, Advantages]], window: int) -> dict[str, float]:
    """Figures of an epoch's credit, from each batch's credit (over its valid rows, [n, W]) and
    the advantages of those rows:

    - ``skipped/trajectories``: rows without any non-zero advantage; ``skipped/zero_variance_groups``:
      groups none of whose rows is kept;
    - ``turning/rate_step_<k>``: the share of rows credited as a turning point at window step k
      (1-based), ``turning/rate`` the share over all steps, ``turning/detected_rate`` the share
      detected before balancing; ``turning/positive_share``/``negative_share``: the signs of the
      credited turning points' aggregated rewards;
    - ``advantage/mean``, ``abs_mean``, ``std``: over the kept rows' advantages.
    """
    turning = torch.zeros(window)
    detected = torch.zeros(window)
    n_valid = n_pos = n_neg = skipped = zero_groups = 0
    kept_values = []
    for cr, adv in batches:
        turning += cr.turning.sum(0)
        detected += cr.detected.sum(0)
        aggregated = cr.aggregated[cr.turning]
        n_pos += int((aggregated > 0).sum())
        n_neg += int((aggregated < 0).sum())
        n_valid += cr.turning.shape[0]
        skipped += int((~adv.keep).sum())
        groups = adv.group_ids
        zero_groups += sum(1 for g in groups.unique() if not adv.keep[groups == g].any())
        kept_values.append(adv.advantages[adv.keep].flatten())
    metrics = {"skipped/trajectories": float(skipped), "skipped/zero_variance_groups": float(zero_groups)}
    denom = max(n_valid, 1)
    for k in range(window):
        metrics[f"turning/rate_step_{k + 1}"] = float(turning[k]) / denom
    metrics["turning/rate"] = float(turning.sum()) / (denom * window)
    metrics["turning/detected_rate"] = float(detected.sum()) / (denom * window)
    n_tp = max(n_pos + n_neg, 1)
    metrics["turning/positive_share"] = n_pos / n_tp
    metrics["turning/negative_share"] = n_neg / n_tp
    values = torch.cat(kept_values) if kept_values else torch.zeros(0)
    metrics["advantage/mean"] = mean_or_nan(values)
    metrics["advantage/abs_mean"] = mean_or_nan(values.abs())
    metrics["advantage/std"] = std_or_nan(values)
    return metrics

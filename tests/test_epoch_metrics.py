"""The epoch's logged figures (tpgrpo/epoch_metrics.py): hand-worked values, and a plain-loop
reference on random credit results."""

from __future__ import annotations

import math

import pytest
import torch

from tpgrpo.advantages import Advantages
from tpgrpo.credit import CreditResult
from tpgrpo.epoch_metrics import credit_metrics, reward_metrics


def test_reward_metrics_by_hand() -> None:
    # Finite finals 0.2, 0.4, 0.6: mean 0.4, population std sqrt(((-.2)^2 + 0 + .2^2) / 3).
    finals = torch.tensor([0.2, float("nan"), 0.4, 0.6])
    details = {"color": torch.tensor([1.0, 0.0, float("inf"), 1.0])}
    m = reward_metrics(finals, invalid=1, details=details)
    assert m["reward/mean"] == pytest.approx(0.4)
    assert m["reward/std"] == pytest.approx(math.sqrt(0.08 / 3))
    assert m["skipped/nonfinite"] == 1.0
    assert m["reward/color"] == pytest.approx(2 / 3)


def test_reward_metrics_of_nothing_finite_are_nan() -> None:
    m = reward_metrics(torch.tensor([float("nan")]), invalid=1, details={})
    assert math.isnan(m["reward/mean"]) and math.isnan(m["reward/std"])


def _credit(turning: list[list[bool]], detected: list[list[bool]], aggregated: list[list[float]]) -> CreditResult:
    zeros = torch.zeros(len(turning), len(turning[0]), dtype=torch.float64)
    return CreditResult(zeros, torch.tensor(turning), torch.tensor(detected), zeros, torch.tensor(aggregated, dtype=torch.float64))


def test_credit_metrics_by_hand() -> None:
    # One batch of 4 rows, W = 2, two groups (rows 0-1 and 2-3); group 1 has no kept row.
    cr = _credit(
        turning=[[True, False], [False, False], [False, True], [False, False]],
        detected=[[True, True], [False, False], [False, True], [False, False]],
        aggregated=[[0.5, 0.0], [0.0, 0.0], [0.0, -0.25], [0.0, 0.0]],
    )
    adv = Advantages(
        advantages=torch.tensor([[1.0, -1.0], [-1.0, 1.0], [0.0, 0.0], [0.0, 0.0]], dtype=torch.float64),
        keep=torch.tensor([True, True, False, False]),
        group_ids=torch.tensor([0, 0, 1, 1]),
    )
    m = credit_metrics([(cr, adv)], window=2)
    assert m["skipped/trajectories"] == 2.0
    assert m["skipped/zero_variance_groups"] == 1.0
    assert m["turning/rate_step_1"] == 1 / 4 and m["turning/rate_step_2"] == 1 / 4
    assert m["turning/rate"] == 2 / 8
    assert m["turning/detected_rate"] == 3 / 8
    assert m["turning/positive_share"] == 1 / 2 and m["turning/negative_share"] == 1 / 2
    # Kept rows' advantages: 1, -1, -1, 1.
    assert m["advantage/mean"] == 0.0 and m["advantage/abs_mean"] == 1.0 and m["advantage/std"] == 1.0


def _reference(batches: list[tuple[CreditResult, Advantages]], window: int) -> dict[str, float]:
    """The same figures, one row and one step at a time."""
    rows = turning = detected = pos = neg = skipped = zero_groups = 0
    per_step = [0] * window
    values: list[float] = []
    for cr, adv in batches:
        for i in range(cr.turning.shape[0]):
            rows += 1
            skipped += not bool(adv.keep[i])
            if adv.keep[i]:
                values += [float(v) for v in adv.advantages[i]]
            for k in range(window):
                if cr.turning[i, k]:
                    turning += 1
                    per_step[k] += 1
                    a = float(cr.aggregated[i, k])
                    pos, neg = pos + (a > 0), neg + (a < 0)
                detected += bool(cr.detected[i, k])
        for g in set(adv.group_ids.tolist()):
            zero_groups += not any(bool(adv.keep[i]) for i in range(len(adv.keep)) if int(adv.group_ids[i]) == g)
    mean = sum(values) / len(values) if values else math.nan
    out = {
        "skipped/trajectories": skipped,
        "skipped/zero_variance_groups": zero_groups,
        "turning/rate": turning / (max(rows, 1) * window),
        "turning/detected_rate": detected / (max(rows, 1) * window),
        "turning/positive_share": pos / max(pos + neg, 1),
        "turning/negative_share": neg / max(pos + neg, 1),
        "advantage/mean": mean,
        "advantage/abs_mean": sum(abs(v) for v in values) / len(values) if values else math.nan,
        "advantage/std": math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)) if values else math.nan,
    }
    out |= {f"turning/rate_step_{k + 1}": per_step[k] / max(rows, 1) for k in range(window)}
    return out


def test_credit_metrics_match_a_plain_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        window = int(torch.randint(1, 5, (1,), generator=gen))
        batches = []
        for _ in range(int(torch.randint(0, 4, (1,), generator=gen))):
            n = int(torch.randint(1, 9, (1,), generator=gen))
            turning = torch.rand(n, window, generator=gen) < 0.3
            detected = turning | (torch.rand(n, window, generator=gen) < 0.2)
            aggregated = torch.randint(-2, 3, (n, window), generator=gen).double()
            keep = torch.rand(n, generator=gen) < 0.6
            advantages = torch.randn(n, window, generator=gen, dtype=torch.float64) * keep[:, None]
            groups = torch.randint(0, 3, (n,), generator=gen)
            zeros = torch.zeros(n, window, dtype=torch.float64)
            batches.append((CreditResult(zeros, turning, detected, zeros, aggregated), Advantages(advantages, keep, groups)))
        got, want = credit_metrics(batches, window), _reference(batches, window)
        assert set(got) == set(want)
        for key, value in want.items():
            assert got[key] == pytest.approx(value, abs=1e-12, nan_ok=True), key

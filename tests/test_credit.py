"""Credit assignment: hand-worked cases and a plain-loop reference on random cases."""

from __future__ import annotations

import itertools

import pytest
import torch

from tpgrpo.credit import CreditConfig, assign_credit, balance_turning_points, detect_turning_points


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def reference_credit(R: list[list[float]], cfg: CreditConfig) -> tuple[list[list[float]], list[list[bool]]]:
    """DESIGN.md §1, written as plainly as possible with Python loops (k is 1-based)."""
    B, W = len(R), len(R[0]) - 1
    turning = [[False] * W for _ in range(B)]
    for b in range(B):
        r = R[b]
        delta = r[W] - r[0]
        s = {k: _sign(r[k] - r[k - 1]) * _sign(delta) for k in range(1, W + 1)}
        for k in range(1, W + 1):
            if k == 1:
                tp = cfg.first_step and s[1] > 0
            else:
                tp = s[k - 1] < 0 and s[k] > 0
            if tp and cfg.consistent:
                tp = _sign(r[k] - r[k - 1]) * _sign(r[W] - r[k]) > 0
            turning[b][k - 1] = tp
    if cfg.mode != "turning_point":
        turning = [[False] * W for _ in range(B)]
    elif cfg.balance:
        pos, neg = [], []
        for b in range(B):
            for k in range(1, W + 1):
                if turning[b][k - 1]:
                    agg = R[b][W] - R[b][k - 1]
                    if agg > 0:
                        pos.append((abs(agg), b, k))
                    elif agg < 0:
                        neg.append((abs(agg), b, k))
        if pos and neg:
            m = min(len(pos), len(neg))
            # largest |r_agg| first; ties: earlier trajectory, then earlier step
            keep = sorted(pos, key=lambda t: (-t[0], t[1], t[2]))[:m] + sorted(neg, key=lambda t: (-t[0], t[1], t[2]))[:m]
            turning = [[False] * W for _ in range(B)]
            for _, b, k in keep:
                turning[b][k - 1] = True
    rewards = [[0.0] * W for _ in range(B)]
    for b in range(B):
        for k in range(1, W + 1):
            d = R[b][k] - R[b][k - 1]
            if cfg.mode == "outcome":
                rewards[b][k - 1] = R[b][W]
            elif cfg.mode == "incremental":
                rewards[b][k - 1] = d
            elif turning[b][k - 1]:
                agg = R[b][W] - R[b][k - 1]
                rewards[b][k - 1] = cfg.eta * agg if cfg.replace else d + cfg.eta * agg
            else:
                rewards[b][k - 1] = d
    return rewards, turning


ALL_CONFIGS = [
    CreditConfig(mode=mode, consistent=c, first_step=f, balance=bal, replace=rep, eta=eta)
    for mode in ("outcome", "incremental")
    for c, f, bal, rep, eta in [(True, True, True, True, 1.0)]
] + [
    CreditConfig(mode="turning_point", consistent=c, first_step=f, balance=bal, replace=rep, eta=eta)
    for c, f, bal, rep, eta in itertools.product([True, False], [True, False], [True, False], [True, False], [1.0, 0.5])
]


def _check(R: torch.Tensor, cfg: CreditConfig) -> None:
    out = assign_credit(R, cfg)
    ref_rewards, ref_turning = reference_credit(R.tolist(), cfg)
    assert out.turning.tolist() == ref_turning
    torch.testing.assert_close(out.rewards, torch.tensor(ref_rewards, dtype=R.dtype), rtol=0, atol=1e-12)


@pytest.mark.parametrize("cfg", ALL_CONFIGS, ids=repr)
def test_matches_plain_loop_reference_on_random_cases(cfg: CreditConfig) -> None:
    gen = torch.Generator().manual_seed(1234)
    for trial in range(150):
        B = int(torch.randint(1, 9, (1,), generator=gen))
        W = int(torch.randint(1, 8, (1,), generator=gen))
        if trial % 2:
            # Small integers: many ties, zero increments and zero global trends.
            R = torch.randint(-2, 3, (B, W + 1), generator=gen).double()
        else:
            R = torch.rand(B, W + 1, generator=gen, dtype=torch.float64)
        _check(R, cfg)


def test_many_random_cases_default_config() -> None:
    gen = torch.Generator().manual_seed(7)
    cfg = CreditConfig()
    for _ in range(2000):
        B = int(torch.randint(1, 17, (1,), generator=gen))
        W = int(torch.randint(1, 10, (1,), generator=gen))
        R = torch.randint(0, 4, (B, W + 1), generator=gen).double() / 3
        _check(R, cfg)


def test_defaults_follow_design() -> None:
    cfg = CreditConfig()
    assert (cfg.mode, cfg.consistent, cfg.first_step, cfg.balance, cfg.replace, cfg.eta) == (
        "turning_point", True, True, True, True, 1.0,
    )


def test_unknown_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="credit.mode"):
        CreditConfig(mode="per_step")  # type: ignore[arg-type]


# ---- hand-worked cases (W = 4 unless said otherwise; k is 1-based, columns are k - 1) ----

NO_BALANCE = CreditConfig(balance=False)


def test_good_turning_point_dip_then_rise() -> None:
    # R = [0.5, 0.3, 0.6, 0.7, 0.8]: d = [-0.2, 0.3, 0.1, 0.1], delta = +0.3 -> s = [-1, +1, +1, +1].
    # k=1: s_1 < 0, not a turning point. k=2: s_1 < 0 and s_2 > 0, and R_W - R_2 = 0.2 > 0 agrees
    # with d_2 > 0 -> turning point with r_agg = R_W - R_1 = 0.5. k=3, 4: s_{k-1} > 0, normal.
    R = torch.tensor([[0.5, 0.3, 0.6, 0.7, 0.8]], dtype=torch.float64)
    out = assign_credit(R, NO_BALANCE)
    assert out.turning.tolist() == [[False, True, False, False]]
    torch.testing.assert_close(out.rewards, torch.tensor([[-0.2, 0.5, 0.1, 0.1]], dtype=torch.float64))


def test_bad_turning_point_rise_then_fall() -> None:
    # R = [0.5, 0.7, 0.4, 0.3, 0.2]: d = [0.2, -0.3, -0.1, -0.1], delta = -0.3 -> s = [-1, +1, +1, +1].
    # k=2 is a turning point (its fall agrees with the overall fall, and R_W - R_2 = -0.2 < 0
    # keeps falling): r_agg = R_W - R_1 = -0.5, a large negative reward for the step.
    R = torch.tensor([[0.5, 0.7, 0.4, 0.3, 0.2]], dtype=torch.float64)
    out = assign_credit(R, NO_BALANCE)
    assert out.turning.tolist() == [[False, True, False, False]]
    torch.testing.assert_close(out.rewards, torch.tensor([[0.2, -0.5, -0.1, -0.1]], dtype=torch.float64))


def test_flip_against_the_global_trend_is_a_normal_step() -> None:
    # R = [0.5, 0.6, 0.4, 0.7, 0.9]: d = [0.1, -0.2, 0.3, 0.2], delta = +0.4 -> s = [+1, -1, +1, +1].
    # k=2 flips the trend but against the global rise (s_2 < 0): normal. k=3 flips back with it
    # (s_2 < 0, s_3 > 0; R_W - R_3 = 0.2 > 0): turning, r_agg = R_W - R_2 = 0.5. k=1: first-step
    # rule, s_1 > 0 and R_W - R_1 = 0.3 > 0 agrees with d_1 > 0: turning, r_agg = 0.4.
    R = torch.tensor([[0.5, 0.6, 0.4, 0.7, 0.9]], dtype=torch.float64)
    out = assign_credit(R, NO_BALANCE)
    assert out.turning.tolist() == [[True, False, True, False]]
    torch.testing.assert_close(out.rewards, torch.tensor([[0.4, -0.2, 0.5, 0.2]], dtype=torch.float64))


def test_first_step_rule() -> None:
    # R = [0.2, 0.5, 0.6, 0.7]: d = [0.3, 0.1, 0.1], delta = 0.5; only k=1 can qualify (s_1 > 0).
    R = torch.tensor([[0.2, 0.5, 0.6, 0.7]], dtype=torch.float64)
    on = assign_credit(R, CreditConfig(balance=False, first_step=True))
    off = assign_credit(R, CreditConfig(balance=False, first_step=False))
    assert on.turning.tolist() == [[True, False, False]]
    torch.testing.assert_close(on.rewards, torch.tensor([[0.5, 0.1, 0.1]], dtype=torch.float64))
    assert off.turning.tolist() == [[False, False, False]]
    torch.testing.assert_close(off.rewards, torch.tensor([[0.3, 0.1, 0.1]], dtype=torch.float64))


def test_consistency_rule() -> None:
    # R = [0.5, 0.3, 0.6, 0.55, 0.7]: k=2 flips (s_1 < 0, s_2 > 0). R_W - R_2 = 0.1 > 0 agrees: kept.
    # R = [0.5, 0.3, 0.8, 0.75, 0.7]: k=2 flips too, but then R_W - R_2 = -0.1 < 0: the reward moves
    # back afterwards, so only the inconsistent variant calls it a turning point (r_agg = 0.4).
    kept = torch.tensor([[0.5, 0.3, 0.6, 0.55, 0.7]], dtype=torch.float64)
    dropped = torch.tensor([[0.5, 0.3, 0.8, 0.75, 0.7]], dtype=torch.float64)
    assert assign_credit(kept, NO_BALANCE).turning[0, 1]
    assert not assign_credit(dropped, NO_BALANCE).turning[0, 1]
    loose = assign_credit(dropped, CreditConfig(balance=False, consistent=False))
    assert loose.turning[0, 1]
    torch.testing.assert_close(loose.rewards[0, 1], torch.tensor(0.4, dtype=torch.float64))


def test_last_step_is_never_consistent() -> None:
    # At k = W, R_W - R_W = 0: with the consistency rule the last step cannot be a turning point.
    R = torch.tensor([[0.5, 0.4, 0.6]], dtype=torch.float64)  # s = [-1, +1]
    assert assign_credit(R, NO_BALANCE).turning.tolist() == [[False, False]]
    assert assign_credit(R, CreditConfig(balance=False, consistent=False)).turning.tolist() == [[False, True]]


def test_balancing_keeps_largest_of_each_sign() -> None:
    # Three positive turning points (first-step rule, rising trajectories) with r_agg = R_3 - R_0
    # = 0.3, 0.6, 0.9, and one negative (falling trajectory) with r_agg = -0.2.
    # min(n+, n-) = 1: keep the +0.9 and the -0.2 ones; the others fall back to d_k.
    R = torch.tensor(
        [
            [0.0, 0.1, 0.2, 0.3],
            [0.0, 0.2, 0.4, 0.6],
            [0.0, 0.3, 0.6, 0.9],
            [0.2, 0.1, 0.05, 0.0],
        ],
        dtype=torch.float64,
    )
    detected = detect_turning_points(R)
    assert detected[:, 0].tolist() == [True, True, True, True]
    out = assign_credit(R)
    assert out.turning.tolist() == [
        [False, False, False],
        [False, False, False],
        [True, False, False],
        [True, False, False],
    ]
    torch.testing.assert_close(out.rewards[:, 0], torch.tensor([0.1, 0.2, 0.9, -0.2], dtype=torch.float64))


def test_balancing_with_one_sign_only_keeps_all() -> None:
    R = torch.tensor([[0.0, 0.1, 0.2, 0.3], [0.0, 0.2, 0.4, 0.6]], dtype=torch.float64)
    out = assign_credit(R)
    assert out.turning[:, 0].tolist() == [True, True]


def test_balancing_ties_break_by_position() -> None:
    # Two positive turning points with equal r_agg = 0.5, one negative: the earlier row wins.
    R = torch.tensor([[0.0, 0.25, 0.5], [0.0, 0.25, 0.5], [0.5, 0.25, 0.0]], dtype=torch.float64)
    out = assign_credit(R)
    assert out.turning[:, 0].tolist() == [True, False, True]


def test_sign_zero_is_never_a_turning_point() -> None:
    # Flat trajectory (delta = 0): every s_k = 0. Zero increment at k=2 between moves: s_2 = 0.
    flat = torch.tensor([[0.4, 0.6, 0.4]], dtype=torch.float64)
    plateau = torch.tensor([[0.5, 0.3, 0.3, 0.8]], dtype=torch.float64)  # s = [-1, 0, +1]
    for cfg in (CreditConfig(balance=False), CreditConfig(balance=False, consistent=False)):
        assert not assign_credit(flat, cfg).turning.any()
        # k=3 follows a zero step: s_2 = 0 is not < 0, so no flip.
        assert not assign_credit(plateau, cfg).turning.any()


def test_replace_versus_add_and_eta() -> None:
    R = torch.tensor([[0.5, 0.3, 0.6, 0.7, 0.8]], dtype=torch.float64)  # turning at k=2, d=0.3, r_agg=0.5
    add = assign_credit(R, CreditConfig(balance=False, replace=False, eta=0.5))
    torch.testing.assert_close(add.rewards[0, 1], torch.tensor(0.3 + 0.25, dtype=torch.float64))
    rep = assign_credit(R, CreditConfig(balance=False, eta=2.0))
    torch.testing.assert_close(rep.rewards[0, 1], torch.tensor(1.0, dtype=torch.float64))


def test_outcome_and_incremental_modes() -> None:
    R = torch.tensor([[0.5, 0.3, 0.6, 0.7, 0.8]], dtype=torch.float64)
    outcome = assign_credit(R, CreditConfig(mode="outcome"))
    torch.testing.assert_close(outcome.rewards, torch.full((1, 4), 0.8, dtype=torch.float64))
    assert not outcome.turning.any() and outcome.detected.any()
    inc = assign_credit(R, CreditConfig(mode="incremental"))
    torch.testing.assert_close(inc.rewards, torch.tensor([[-0.2, 0.3, 0.1, 0.1]], dtype=torch.float64))
    # Incremental rewards telescope: their sum is the global trend.
    torch.testing.assert_close(inc.rewards.sum(1), R[:, -1] - R[:, 0])


def test_balance_function_returns_input_when_no_turning_points() -> None:
    turning = torch.zeros(3, 4, dtype=torch.bool)
    assert not balance_turning_points(turning, torch.randn(3, 4)).any()


@pytest.mark.parametrize("bad", [torch.zeros(3), torch.zeros(2, 1), torch.zeros(2, 3, dtype=torch.long)])
def test_bad_shapes_are_rejected(bad: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="R: expected"):
        assign_credit(bad)

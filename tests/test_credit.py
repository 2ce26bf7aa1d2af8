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
    assert (cfg.mode, cfg.consistent, cfg.first_step, cfg.balance, cfg.balance_key, cfg.replace, cfg.eta) == (
        "turning_point", True, True, True, "aggregated", True, 1.0,
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


# ---- balance_key and pools ----


def published_credit(
    R: list[list[float]], cfg: CreditConfig, pools: list[int] | None
) -> tuple[list[list[float]], list[list[bool]]]:
    """The published TP-GRPO credit (YunzeTong/TurningPoint-GRPO, scripts/my_train_sd3_fast_with_op3.py,
    as its launch scripts run it: use_sde_minus_rt, drop_original_reward_when_having_bonus = replace,
    use_balanced_bonus = balance, select_*_only_from_consistent_trajectory = consistent), written as
    plain loops in that code's own terms (t is the 0-based step). ``balance_key="trajectory"`` is
    that code; ``"aggregated"`` swaps in DESIGN §1's ranking and reward. ``pools``: one balancing pool
    per id (the published per-process sampling batches); None is one pool.
    """
    B, W = len(R), len(R[0]) - 1
    pools = [0] * B if pools is None else pools
    indicator = [[False] * W for _ in range(B)]
    for b in range(B):
        r = R[b]
        delta_global = r[W] - r[0]
        d = [r[t + 1] - r[t] for t in range(W)]
        s = [_sign(d[t]) * _sign(delta_global) for t in range(W)]
        for t in range(W):
            if t == 0:
                if not cfg.first_step:
                    ind = False
                elif cfg.consistent:
                    # The published first-step rule with consistency checks consistency only.
                    ind = _sign(d[0]) * _sign(r[W] - r[1]) > 0
                else:
                    ind = s[0] > 0
            else:
                ind = s[t - 1] < 0 and s[t] > 0
                if cfg.consistent:
                    ind = ind and _sign(d[t]) * _sign(r[W] - r[t + 1]) > 0
            indicator[b][t] = ind
    if cfg.balance:
        for pool in sorted(set(pools)):
            rows = [b for b in range(B) if pools[b] == pool]
            pos, neg = [], []
            for b in rows:
                for t in range(W):
                    if indicator[b][t]:
                        v = R[b][W] - R[b][0] if cfg.balance_key == "trajectory" else R[b][W] - R[b][t]
                        if v > 0:
                            pos.append((-abs(v), b, t))
                        elif v < 0:
                            neg.append((-abs(v), b, t))
            if pos and neg:
                m = min(len(pos), len(neg))
                keep = {(b, t) for _, b, t in sorted(pos)[:m] + sorted(neg)[:m]}
                for b in rows:
                    for t in range(W):
                        indicator[b][t] = (b, t) in keep
    rewards = [[0.0] * W for _ in range(B)]
    for b in range(B):
        for t in range(W):
            d_t = R[b][t + 1] - R[b][t]
            agg = R[b][W] - R[b][t]
            if cfg.balance_key == "trajectory":
                bonus = cfg.eta * agg if indicator[b][t] else 0.0
                main = 0.0 if cfg.replace and bonus != 0 else d_t
                rewards[b][t] = main + bonus
            elif indicator[b][t]:
                rewards[b][t] = cfg.eta * agg if cfg.replace else d_t + cfg.eta * agg
            else:
                rewards[b][t] = d_t
    return rewards, indicator


def test_matches_published_semantics_on_random_cases() -> None:
    gen = torch.Generator().manual_seed(2026)
    seen_balancing_difference = 0
    for trial in range(3000):
        B = int(torch.randint(1, 13, (1,), generator=gen))
        W = int(torch.randint(1, 8, (1,), generator=gen))
        if trial % 3:
            # A few discrete values: ties in |r_agg| and |R_W - R_0|, zero increments and r_agg = 0.
            R = torch.randint(0, 5, (B, W + 1), generator=gen).double() / 4
        else:
            R = torch.rand(B, W + 1, generator=gen, dtype=torch.float64)
        flags = [bool(x) for x in torch.randint(0, 2, (5,), generator=gen)]
        cfg = CreditConfig(
            consistent=flags[0],
            first_step=flags[1],
            replace=flags[2],
            balance=trial % 8 != 0,
            balance_key="trajectory" if flags[3] else "aggregated",
            eta=(1.0, 0.5, 2.0)[trial % 3],
        )
        pools = None if flags[4] else torch.randint(0, 3, (B,), generator=gen) * 5  # ids need not be 0..P-1
        out = assign_credit(R, cfg, pools=pools)
        ref_rewards, ref_turning = published_credit(R.tolist(), cfg, None if pools is None else pools.tolist())
        assert out.turning.tolist() == ref_turning, (R, cfg, pools)
        torch.testing.assert_close(out.rewards, torch.tensor(ref_rewards, dtype=R.dtype), rtol=0, atol=1e-12)
        seen_balancing_difference += out.turning.tolist() != out.detected.tolist()
    assert seen_balancing_difference > 100  # the comparison exercised the balancing, not just detection


def test_hand_case_separates_the_balance_keys() -> None:
    # W = 4. Row 1: d = [.05, -.1, .45, .1], delta = .5, s = [+, -, +, +]: turning at k=1 (R_W - R_1
    # = .45 > 0 agrees) with r_agg = R_4 - R_0 = .5, and at k=3 (R_W - R_3 = .1 > 0) with
    # r_agg = R_4 - R_2 = .55. Row 2: d = [-.4, -.05, .75, .1], delta = .4, s = [-, -, +, +]: turning
    # at k=3 with r_agg = .85. Row 3: d = [-.1, .05, -.1, -.05], delta = -.2, s = [+, -, +, +]:
    # turning at k=1 (r_agg = -.2) and k=3 (R_W - R_3 = -.05 < 0 agrees; r_agg = .3 - .45 = -.15).
    # Three positive, two negative: both negatives stay, and two of the three positives.
    # aggregated ranks .85 (row 2), .55 (row 1, k=3) > .5 (row 1, k=1): row 1's k=1 falls back to d_1.
    # trajectory ranks by |delta|: .5, .5 (row 1) > .4 (row 2): row 2's k=3 falls back to d_3 = .75.
    R = torch.tensor(
        [[0.5, 0.55, 0.45, 0.9, 1.0], [0.5, 0.1, 0.05, 0.8, 0.9], [0.5, 0.4, 0.45, 0.35, 0.3]],
        dtype=torch.float64,
    )
    row3 = [-0.2, 0.05, -0.15, -0.05]
    detected = [[True, False, True, False], [False, False, True, False], [True, False, True, False]]
    agg = assign_credit(R, CreditConfig(balance_key="aggregated"))
    traj = assign_credit(R, CreditConfig(balance_key="trajectory"))
    assert agg.detected.tolist() == detected
    assert agg.turning.tolist() == [[False, False, True, False], [False, False, True, False], detected[2]]
    assert traj.turning.tolist() == [[True, False, True, False], [False, False, False, False], detected[2]]
    expected_agg = torch.tensor([[0.05, -0.1, 0.55, 0.1], [-0.4, -0.05, 0.85, 0.1], row3], dtype=torch.float64)
    expected_traj = torch.tensor([[0.5, -0.1, 0.55, 0.1], [-0.4, -0.05, 0.75, 0.1], row3], dtype=torch.float64)
    torch.testing.assert_close(agg.rewards, expected_agg, rtol=0, atol=1e-12)
    torch.testing.assert_close(traj.rewards, expected_traj, rtol=0, atol=1e-12)


LOOSE = {"consistent": False, "first_step": False}


def test_trajectory_key_takes_the_sign_from_the_increment() -> None:
    # Without consistency, first_step off, W = 4:
    # A = [0, .8, .7, .9, .5]: d = [.8, -.1, .2, -.4], delta = .5, s = [+, -, +, -]: turning at k=3,
    #     d_3 = +.2 but r_agg = R_4 - R_2 = -.2 (the reward falls back afterwards); |delta| = .5.
    # B = [.5, .3, .6, .7, .8]: turning at k=2, d_2 = .3, r_agg = .5; |delta| = .3.
    # C = [.5, .7, .4, .3, .2]: turning at k=2, d_2 = -.3, r_agg = -.5; |delta| = .3.
    # aggregated: A is negative -> n+ = 1 (B), n- = 2 (A, C): keep B and C (|-.5| > |-.2|), A gets d_3.
    # trajectory: A is positive -> n+ = 2 (A, B), n- = 1 (C): keep A (|delta| .5 > .3) and C, B gets
    # d_2; A's kept turning point is credited r_agg = -.2.
    R = torch.tensor(
        [[0.0, 0.8, 0.7, 0.9, 0.5], [0.5, 0.3, 0.6, 0.7, 0.8], [0.5, 0.7, 0.4, 0.3, 0.2]], dtype=torch.float64
    )
    agg = assign_credit(R, CreditConfig(balance_key="aggregated", **LOOSE))
    traj = assign_credit(R, CreditConfig(balance_key="trajectory", **LOOSE))
    assert agg.detected[:, 1:3].tolist() == [[False, True], [True, False], [True, False]]
    assert agg.turning.tolist() == [[False] * 4, [False, True, False, False], [False, True, False, False]]
    assert traj.turning.tolist() == [[False, False, True, False], [False] * 4, [False, True, False, False]]
    c_row = [0.2, -0.5, -0.1, -0.1]
    expected_agg = torch.tensor([[0.8, -0.1, 0.2, -0.4], [-0.2, 0.5, 0.1, 0.1], c_row], dtype=torch.float64)
    expected_traj = torch.tensor([[0.8, -0.1, -0.2, -0.4], [-0.2, 0.3, 0.1, 0.1], c_row], dtype=torch.float64)
    torch.testing.assert_close(agg.rewards, expected_agg, rtol=0, atol=1e-12)
    torch.testing.assert_close(traj.rewards, expected_traj, rtol=0, atol=1e-12)


def test_trajectory_key_gives_a_zero_aggregated_turning_point_its_increment() -> None:
    # Without consistency, first_step off, W = 4:
    # Z = [0, .6, .5, .9, .5]: d = [.6, -.1, .4, -.4], delta = .5, s = [+, -, +, -]: turning at k=3
    #     with r_agg = R_4 - R_2 = 0.
    # C = [.5, .7, .4, .3, .2]: turning at k=2, r_agg = -.5, delta = -.3.
    # aggregated: Z has no sign, so only negatives: nothing is dropped and Z's k=3 gets eta * 0 = 0.
    # trajectory: Z is positive (sign of d_3 = sign of delta): one of each sign, both kept, and
    # Z's k=3 keeps d_3 = .4 (the published code replaces d_k only by a non-zero bonus).
    R = torch.tensor([[0.0, 0.6, 0.5, 0.9, 0.5], [0.5, 0.7, 0.4, 0.3, 0.2]], dtype=torch.float64)
    c_row = [0.2, -0.5, -0.1, -0.1]
    for balance in (True, False):
        agg = assign_credit(R, CreditConfig(balance=balance, balance_key="aggregated", **LOOSE))
        traj = assign_credit(R, CreditConfig(balance=balance, balance_key="trajectory", **LOOSE))
        turning = [[False, False, True, False], [False, True, False, False]]
        assert agg.turning.tolist() == turning and traj.turning.tolist() == turning
        assert agg.aggregated[0, 2] == 0
        expected_agg = torch.tensor([[0.6, -0.1, 0.0, -0.4], c_row], dtype=torch.float64)
        expected_traj = torch.tensor([[0.6, -0.1, 0.4, -0.4], c_row], dtype=torch.float64)
        torch.testing.assert_close(agg.rewards, expected_agg, rtol=0, atol=1e-12)
        torch.testing.assert_close(traj.rewards, expected_traj, rtol=0, atol=1e-12)
    # With replace off both keys give d_3 + eta * 0.
    add = assign_credit(R, CreditConfig(replace=False, balance_key="aggregated", **LOOSE))
    torch.testing.assert_close(add.rewards[0, 2], torch.tensor(0.4, dtype=torch.float64), rtol=0, atol=1e-12)


def test_pools_balance_separately() -> None:
    # First-step turning points with r_agg = +.3, +.6, +.9, -.2 (rows 0..3). One pool: n+ = 3, n- = 1,
    # keep +.9 and -.2. Pools {0, 2, 3} and {1}: the first keeps +.9 and -.2, the second has one sign
    # only and keeps its +.6. Pool ids are any integers.
    R = torch.tensor(
        [[0.0, 0.1, 0.2, 0.3], [0.0, 0.2, 0.4, 0.6], [0.0, 0.3, 0.6, 0.9], [0.2, 0.1, 0.05, 0.0]],
        dtype=torch.float64,
    )
    for key in ("aggregated", "trajectory"):
        cfg = CreditConfig(balance_key=key)
        one = assign_credit(R, cfg)
        split = assign_credit(R, cfg, pools=torch.tensor([7, -3, 7, 7]))
        assert one.turning[:, 0].tolist() == [False, False, True, True]
        assert split.turning[:, 0].tolist() == [False, True, True, True]
        torch.testing.assert_close(split.rewards[:, 0], torch.tensor([0.1, 0.6, 0.9, -0.2], dtype=torch.float64))


@pytest.mark.parametrize("key", ["aggregated", "trajectory"])
def test_one_pool_equals_no_pools_bitwise(key: str) -> None:
    gen = torch.Generator().manual_seed(11)
    for _ in range(300):
        B = int(torch.randint(1, 13, (1,), generator=gen))
        W = int(torch.randint(1, 8, (1,), generator=gen))
        R = torch.randint(0, 4, (B, W + 1), generator=gen).double() / 3
        cfg = CreditConfig(balance_key=key, consistent=bool(torch.randint(0, 2, (1,), generator=gen)))
        none = assign_credit(R, cfg)
        zeros = assign_credit(R, cfg, pools=torch.zeros(B, dtype=torch.long))
        assert torch.equal(none.turning, zeros.turning)
        assert torch.equal(none.rewards.view(torch.int64), zeros.rewards.view(torch.int64))


def test_unknown_balance_key_is_rejected() -> None:
    with pytest.raises(ValueError, match="credit.balance_key"):
        CreditConfig(balance_key="absolute")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "pools", [torch.zeros(3, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long), torch.zeros(2)], ids=repr
)
def test_bad_pools_are_rejected(pools: torch.Tensor) -> None:
    R = torch.rand(2, 4, dtype=torch.float64)
    for cfg in (CreditConfig(), CreditConfig(balance=False), CreditConfig(mode="outcome")):
        with pytest.raises(ValueError, match="pools"):
            assign_credit(R, cfg, pools=pools)
    with pytest.raises(ValueError, match="pools"):
        balance_turning_points(torch.ones(2, 3, dtype=torch.bool), R[:, 1:], pools=pools)

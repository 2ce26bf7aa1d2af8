"""Study statistics (tpgrpo.reporting.stats): hand-worked values, scipy's own routines, simulation."""

import math
import statistics

import numpy as np
import pytest
from scipy import stats as sps

from tpgrpo.reporting.stats import (
    bootstrap_variance,
    detectable_effect,
    mean_std,
    paired_estimate,
    seeds_for_half_width,
    t_interval,
    t_test_power,
)


def test_mean_std_by_hand_and_against_the_standard_library():
    mean, std = mean_std([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and std == pytest.approx(math.sqrt(5.0 / 3.0))  # (2.25+0.25+0.25+2.25)/3
    assert mean_std([5.0]) == (5.0, None)
    assert mean_std([]) == (None, None)
    values = [0.53, 0.57, 0.55, 0.49, 0.61]
    assert mean_std(values) == (pytest.approx(statistics.fmean(values)), pytest.approx(statistics.stdev(values)))


def test_t_interval_hand_worked():
    # mean 2, sd 1, n 3: t(0.975, 2) = 4.302652729749464, half-width 4.3027 / sqrt(3).
    interval = t_interval([1.0, 2.0, 3.0])
    assert interval.mean == 2.0
    assert interval.half_width == pytest.approx(4.302652729749464 / math.sqrt(3), rel=1e-12)
    assert t_interval([0.5, 0.5]).half_width == 0.0  # identical values: an interval of width 0
    with pytest.raises(ValueError):
        t_interval([1.0])


def test_paired_estimate_matches_scipy_t_test():
    d = np.array([0.012, -0.004, 0.031, 0.008, 0.019, -0.011, 0.022, 0.005])
    est = paired_estimate(d)
    ref = sps.ttest_1samp(d, 0.0)
    ci = ref.confidence_interval(0.95)
    assert est.n == 8
    assert est.mean == pytest.approx(d.mean())
    assert est.std == pytest.approx(d.std(ddof=1))
    assert (est.ci_low, est.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-10)
    assert est.p_value == pytest.approx(ref.pvalue, rel=1e-10)
    assert est.half_width == pytest.approx((ci.high - ci.low) / 2)
    assert est.resolved == (ci.low > 0 or ci.high < 0)


def test_detectable_effect_has_the_stated_power_in_simulation():
    # 12 seeds, sd 1: the effect found must be detected by the two-sided t test 80% of the time.
    n, sd = 12, 1.0
    effect = detectable_effect(sd, n)
    rng = np.random.default_rng(0)
    x = rng.normal(effect, sd, size=(200_000, n))
    t = x.mean(axis=1) / (x.std(axis=1, ddof=1) / math.sqrt(n))
    crit = sps.t.ppf(0.975, n - 1)
    assert np.mean(np.abs(t) > crit) == pytest.approx(0.80, abs=0.004)
    assert t_test_power(effect, sd, n) == pytest.approx(0.80, abs=1e-9)


def test_detectable_effect_limits():
    # Large n: the normal approximation (z_0.975 + z_0.8) sd / sqrt(n) = 2.8016 sd / sqrt(n).
    assert detectable_effect(0.5, 10_000) == pytest.approx(2.8016 * 0.5 / 100, rel=1e-3)
    # Small n is far above it (few degrees of freedom), and it scales with sd.
    assert detectable_effect(1.0, 3) > 2 * 2.8016 / math.sqrt(3)
    assert detectable_effect(0.02, 12) == pytest.approx(0.02 * detectable_effect(1.0, 12))
    assert detectable_effect(0.0, 5) == 0.0
    with pytest.raises(ValueError):
        detectable_effect(1.0, 1)


def test_bootstrap_variance_is_the_variance_of_the_mean():
    x = np.random.default_rng(1).normal(0.0, 2.0, size=400)
    expected = x.var(ddof=0) / x.size  # the bootstrap's exact variance of the resampled mean
    assert bootstrap_variance(x, resamples=20_000, seed=3) == pytest.approx(expected, rel=0.05)
    assert bootstrap_variance(x, seed=3) == bootstrap_variance(x, seed=3)
    assert bootstrap_variance(np.ones(50)) == 0.0


def test_eval_and_seed_noise_split_hand_worked():
    d = [0.03, 0.01, 0.05, 0.01]  # mean 0.025, sample variance 0.000366667
    est = paired_estimate(d, eval_variances=[1e-4, 3e-4, 2e-4, 2e-4])
    assert est.std**2 == pytest.approx(0.0011 / 3)
    assert est.eval_std == pytest.approx(math.sqrt(2e-4))
    assert est.seed_std == pytest.approx(math.sqrt(0.0011 / 3 - 2e-4))
    # Evaluation noise larger than the spread: the seeds' share is 0, never imaginary.
    assert paired_estimate(d, eval_variances=[1e-3] * 4).seed_std == 0.0
    with pytest.raises(ValueError, match="eval variances"):
        paired_estimate(d, eval_variances=[1e-4])


def test_paired_estimate_degenerate_inputs():
    assert paired_estimate([]).mean is None
    one = paired_estimate([0.02])
    assert one.mean == 0.02 and one.ci_low is None and one.detectable is None and not one.resolved
    same = paired_estimate([0.01, 0.01, 0.01])
    assert same.std == 0.0 and same.half_width == 0.0 and same.resolved and same.p_value == 0.0


def test_seeds_for_half_width_hand_worked():
    # sd 0.02, target +-0.01: n = 18 gives t(17) 0.02 / sqrt(18) = 0.00995; n = 17 gives 0.01028.
    assert seeds_for_half_width(0.02, 0.01) == 18
    assert sps.t.ppf(0.975, 16) * 0.02 / math.sqrt(17) > 0.01

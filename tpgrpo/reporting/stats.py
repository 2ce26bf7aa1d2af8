"""Statistics of a seeded comparison: paired differences with their interval and power, and the
evaluation's own noise separated from the seeds'.

A study trains variants A and B on the same seeds s = 1..n (same prompt order, same LoRA init,
same evaluation noise) and evaluates both on the same m test prompts. Per seed the paired
difference is d_s = mean_i a_si − mean_i b_si. Two sources make d_s vary:

- the evaluation: a finite set of prompts and one noise draw per prompt. With the per-prompt
  differences e_si = a_si − b_si its variance is estimated by the bootstrap over prompts
  (:func:`bootstrap_variance`), v_s ≈ Var(e_s·)/m;
- the seeds: everything training draws (rollout noise, prompt order, LoRA init).

Then Var(d_s) = σ²_seed + E[v_s], and the reported split is ``eval_std`` = sqrt(mean_s v_s) (the
evaluation's share of one seed's difference) and ``seed_std`` = sqrt(max(s² − mean_s v_s, 0)).
More prompts shrink only the first; more seeds shrink the interval of the mean in both.

Intervals, tests and power are scipy's (``scipy.stats``: Student's t, the noncentral t, the
one-sample t test), means and standard deviations numpy's; no formulas of our own. (scipy's
``tstd`` warns of precision loss whenever the values are nearly equal, say a gain the same on
every seed, and the warning would reach the terminal of every ``tpgrpo study``.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
from scipy import optimize, stats

CONFIDENCE = 0.95
POWER = 0.8


class MeanStd(NamedTuple):
    """A sample's mean and standard deviation (n − 1); None where there are too few values."""

    mean: float | None
    std: float | None


class Interval(NamedTuple):
    """The mean of a sample and the half-width of its interval: mean ± half_width."""

    mean: float
    half_width: float


def mean_std(values: Sequence[float]) -> MeanStd:
    """Mean and sample standard deviation (n − 1); both None for no values, std None for one."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return MeanStd(None, None)
    return MeanStd(float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else None)


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """The two-sided ``confidence`` interval of the mean of ``values`` (Student's t, n − 1
    degrees of freedom). Needs two values or more."""
    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        raise ValueError(f"t_interval: needs at least 2 values, got {x.size}")
    mean, sem = float(x.mean()), float(stats.sem(x))
    # scipy's distributions refuse a scale of 0; identical values have an interval of width 0.
    if sem == 0.0:
        return Interval(mean, 0.0)
    low, high = stats.t.interval(confidence, x.size - 1, loc=mean, scale=sem)
    return Interval(mean, float(high - low) / 2)


def t_test_power(effect: float, std: float, n: int, alpha: float = 1 - CONFIDENCE) -> float:
    """Power of the two-sided one-sample (paired) t test at level ``alpha`` with ``n`` values of
    standard deviation ``std`` when the true mean is ``effect``: P(|T| > t_crit) with T
    noncentral t, n − 1 degrees of freedom, noncentrality effect·√n/std."""
    if n < 2:
        raise ValueError(f"t_test_power: needs n >= 2, got {n}")
    return _power(effect * math.sqrt(n) / std, n, alpha)


def detectable_effect(std: float, n: int, power: float = POWER, alpha: float = 1 - CONFIDENCE) -> float:
    """The smallest true mean difference the two-sided paired t test at level ``alpha`` detects
    with probability ``power``, for ``n`` seeds whose differences have standard deviation ``std``
    (the root of :func:`t_test_power` − power). 0 when ``std`` is 0."""
    if n < 2:
        raise ValueError(f"detectable_effect: needs n >= 2, got {n}")
    if std == 0.0:
        return 0.0
    # The noncentrality (the effect in standard errors) lies below this generous bound even for n = 2.
    upper = 100.0
    k = optimize.brentq(lambda k: _power(k, n, alpha) - power, 0.0, upper)
    return float(k * std / math.sqrt(n))


def _power(noncentrality: float, n: int, alpha: float) -> float:
    df = n - 1
    crit = float(stats.t.ppf(1 - alpha / 2, df))
    # The lower tail vanishes for large noncentrality, where scipy may return NaN for it.
    lower = float(stats.nct.cdf(-crit, df, noncentrality))
    return float(stats.nct.sf(crit, df, noncentrality)) + (0.0 if math.isnan(lower) else lower)


def bootstrap_variance(per_prompt: Sequence[float], *, resamples: int = 2000, seed: int = 0) -> float:
    """Variance of the mean of ``per_prompt`` under resampling the prompts with replacement:
    the evaluation's own noise in one run's (or one paired difference's) mean reward."""
    x = np.asarray(per_prompt, dtype=np.float64)
    if x.size == 0:
        raise ValueError("bootstrap_variance: no values")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    return float(means.var(ddof=1))


@dataclass(frozen=True)
class PairedEstimate:
    """A paired difference over seeds, with its precision.

    Attributes:
        n: seeds.
        mean: mean difference.
        std: standard deviation of one seed's difference (n − 1); None with one seed.
        ci_low, ci_high: the 95% interval of the mean (Student's t, n − 1 df); None with one seed.
        half_width: (ci_high − ci_low) / 2.
        p_value: two-sided paired t test of mean 0.
        detectable: the smallest true difference detected with 80% power at 5% (two-sided), with
            this n and std.
        eval_std: the evaluation's share of std (bootstrap over test prompts, root mean over
            seeds); None without per-prompt scores.
        seed_std: the seeds' share, sqrt(max(std² − eval_std², 0)).
    """

    n: int
    mean: float | None
    std: float | None
    ci_low: float | None
    ci_high: float | None
    half_width: float | None
    p_value: float | None
    detectable: float | None
    eval_std: float | None
    seed_std: float | None

    @property
    def resolved(self) -> bool:
        """Whether the interval excludes 0."""
        return self.ci_low is not None and (self.ci_low > 0 or self.ci_high < 0)


def paired_estimate(differences: Sequence[float], eval_variances: Sequence[float] | None = None) -> PairedEstimate:
    """The :class:`PairedEstimate` of per-seed ``differences``; ``eval_variances`` (one per seed,
    :func:`bootstrap_variance` of its per-prompt differences) split the spread into evaluation and
    seed noise."""
    d = np.asarray(differences, dtype=np.float64)
    n = int(d.size)
    if n == 0:
        return PairedEstimate(0, None, None, None, None, None, None, None, None, None)
    mean, std = mean_std(d)
    eval_std = None
    if eval_variances is not None:
        if len(eval_variances) != n:
            raise ValueError(f"paired_estimate: {len(eval_variances)} eval variances for {n} differences")
        eval_std = math.sqrt(float(np.mean(eval_variances)))
    if std is None:
        return PairedEstimate(1, mean, None, None, None, None, None, None, eval_std, None)
    half = t_interval(d).half_width
    # Identical differences: scipy's t statistic is 0/0 (p NaN) when they are 0, and the mean is
    # certainly not 0 otherwise.
    if std == 0.0:
        p = 1.0 if mean == 0.0 else 0.0
    else:
        p = float(stats.ttest_1samp(d, 0.0).pvalue)
    seed_std = math.sqrt(max(std**2 - eval_std**2, 0.0)) if eval_std is not None else None
    return PairedEstimate(
        n=n,
        mean=mean,
        std=std,
        ci_low=mean - half,
        ci_high=mean + half,
        half_width=half,
        p_value=p,
        detectable=detectable_effect(std, n),
        eval_std=eval_std,
        seed_std=seed_std,
    )


def seeds_for_half_width(std: float, half_width: float, confidence: float = CONFIDENCE, limit: int = 100_000) -> int | None:
    """The fewest seeds whose interval half-width, t(n − 1)·std/√n, is at most ``half_width``
    (planning: how many seeds a target precision needs at this spread); None beyond ``limit``."""
    if std == 0.0:
        return 2
    n = 2
    while n <= limit:
        if float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n) <= half_width:
            return n
        n += 1
    return None

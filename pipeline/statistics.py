"""Batch-level evidence: the client batch is the unit of every interval, test and power figure.

The images of one batch share one attack (one upload, one optimisation), so they rise and fall
together; each batch gives one number (the mean over its images), and the inference runs over
those. One procedure serves each question, so its interval and its test cannot disagree: the
one-sample t on the batch means (`scipy.stats.ttest_1samp`, whose `confidence_interval` is the
interval of the same statistic). Against the baseline the number per batch is the mean paired
difference over the batch's images, and the same t makes a paired t-test of the batch means.
The verdicts of one table are one family, adjusted by Holm (`statsmodels`); the power of the
t-test is an expectation over its chi-distributed scale (`t_test_power`, equal to statsmodels'
where that is finite), and the smallest detectable difference and the batches needed are its
roots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats


@dataclass(frozen=True)
class Evidence:
    """How the statistics are computed: params.yaml's report section, its values and nothing else."""

    confidence: float  # of the t intervals
    alpha: float  # the family's level, after Holm's adjustment
    power: float  # for the smallest detectable difference
    effect: float  # dB: the paired difference the trials are sized to detect


@dataclass(frozen=True)
class Estimate:
    """The mean of per-batch values with its t interval and the two-sided p against 0."""

    mean: float
    low: float
    high: float
    p: float
    batches: int
    sd: float  # of the per-batch values


NONE = Estimate(math.nan, math.nan, math.nan, math.nan, 0, math.nan)


def batch_means(frame: pd.DataFrame, column: str) -> np.ndarray:
    """One value per client batch (trial): the mean of `column` over the batch's images."""
    return frame.groupby("trial", sort=True)[column].mean().to_numpy(dtype=float)


def t_estimate(values, confidence: float) -> Estimate:
    """The one-sample t of per-batch values: mean, interval and p against 0, one procedure.
    Below two batches there is no spread to estimate (all nan); with no spread at all the
    interval is the value itself and p is 1 at zero, 0 elsewhere."""
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if len(x) < 2:
        return Estimate(float(x[0]) if len(x) else math.nan, math.nan, math.nan, math.nan, len(x), math.nan)
    mean, sd = float(x.mean()), float(x.std(ddof=1))
    if sd == 0:
        return Estimate(mean, mean, mean, 1.0 if mean == 0 else 0.0, len(x), 0.0)
    test = stats.ttest_1samp(x, 0.0)
    ci = test.confidence_interval(confidence)
    return Estimate(mean, float(ci.low), float(ci.high), float(test.pvalue), len(x), sd)


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjustment of one family of p-values (statsmodels' multipletests)."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(pvalues, dtype=float)
    if len(p) == 0:
        return p
    return multipletests(p, method="holm")[1]


def _levels(alpha: float, power: float) -> None:
    if not 0 < alpha < power < 1:
        raise ValueError(f"a power analysis needs 0 < alpha < power < 1 (alpha {alpha:g}, power {power:g})")


def t_test_power(effect_size: float, batches: int, alpha: float) -> float:
    """Power of a two-sided one-sample t-test over `batches` values at standardised `effect_size`:
    P(|T| > t crit) for T = (Z + effect_size sqrt(n)) / (X / sqrt(df)), X chi with df = n - 1,
    as an expectation over X (`scipy.stats.chi.expect`). The same as statsmodels' TTestPower.power,
    whose noncentral t returns nan where the power is near 1."""
    if batches < 2:
        raise ValueError(f"a t-test needs at least 2 batches, not {batches}")
    df = batches - 1
    crit = float(stats.t.isf(alpha / 2, df)) / math.sqrt(df)
    shift = effect_size * math.sqrt(batches)

    def rejects(x: float) -> float:
        return float(stats.norm.cdf(shift - crit * x) + stats.norm.cdf(-shift - crit * x))

    # Over the chi's own mass: over [0, inf) the quadrature misses its narrow peak at large df.
    chi = stats.chi(df)
    return float(min(1.0, chi.expect(rejects, lb=float(chi.ppf(1e-15)), ub=float(chi.isf(1e-15)))))


def detectable_difference(sd: float, batches: int, alpha: float, power: float) -> float:
    """The smallest mean paired difference (in the unit of `sd`) a two-sided t-test over `batches`
    batches detects with `power` at level `alpha`, the batch SD being `sd`: the root of
    `t_test_power` in the effect (statsmodels' solver returns a wrong root, silently, at few
    batches and strict levels)."""
    _levels(alpha, power)
    if batches < 2 or not math.isfinite(sd):
        return math.nan
    if sd == 0:
        return 0.0
    from scipy.optimize import brentq

    high = 1.0  # the power rises with the effect, from alpha at 0
    while t_test_power(high, batches, alpha) < power:
        high *= 2
    size = brentq(lambda size: t_test_power(size, batches, alpha) - power, 0.0, high, xtol=1e-10)
    return float(sd * size)


def batches_needed(sd: float, effect: float, alpha: float, power: float) -> int:
    """The fewest batches (at least 2) with which a two-sided t-test detects a mean paired
    difference `effect` with `power` at `alpha`, the batch SD being `sd`; with no spread, 2."""
    _levels(alpha, power)
    if not (math.isfinite(sd) and sd >= 0 and math.isfinite(effect) and effect > 0):
        raise ValueError(f"no sample size for an effect of {effect:g} at a batch SD of {sd:g}")
    if sd == 0:
        return 2
    size = effect / sd
    low, high = 1, 2  # power(low) < power <= power(high), power rising with the batches
    while t_test_power(size, high, alpha) < power:
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if t_test_power(size, middle, alpha) >= power else (middle, high)
    return high


@dataclass(frozen=True)
class Components:
    """Variance components of per-image values grouped in batches (one-way random effects, the
    ANOVA estimators): between batches and within them, the intra-batch correlation, the design
    effect of a batch of `size` images and the SD of one batch's mean."""

    between: float
    within: float
    size: float
    batches: int

    @property
    def icc(self) -> float:
        total = self.between + self.within
        return self.between / total if total > 0 else math.nan

    @property
    def design_effect(self) -> float:
        return 1 + (self.size - 1) * self.icc

    @property
    def batch_sd(self) -> float:
        return math.sqrt(self.between + self.within / self.size)


def variance_components(cells: list[pd.DataFrame], column: str) -> Components:
    """Pooled over `cells` (each with columns trial and `column`): the within-batch variance from
    the batches' own spread, the between-batch variance from the spread of their means less what
    the within part explains (floored at 0), each cell weighted by its degrees of freedom."""
    within_ss = within_df = between_sum = between_df = 0.0
    sizes, batches = [], 0
    for cell in cells:
        groups = [g[column].to_numpy(dtype=float) for _, g in cell.groupby("trial", sort=True)]
        if len(groups) < 2:
            continue
        k = float(np.mean([len(g) for g in groups]))
        within_ss += sum(((g - g.mean()) ** 2).sum() for g in groups)
        within_df += sum(len(g) - 1 for g in groups)
        means = np.array([g.mean() for g in groups])
        between_sum += means.var(ddof=1) * (len(groups) - 1)
        between_df += len(groups) - 1
        sizes.append(k)
        batches += len(groups)
    if not between_df or not within_df:
        return Components(math.nan, math.nan, math.nan, batches)
    within = within_ss / within_df
    size = float(np.mean(sizes))
    between = max(between_sum / between_df - within / size, 0.0)
    return Components(between, within, size, batches)

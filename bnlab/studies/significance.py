"""Tests of significance for comparing arms over seeds: Welch's t test with the confidence
interval of the difference, and Holm's adjustment of a table's p values.

`welch(a, b)` equals `scipy.stats.ttest_ind(a, b, equal_var=False)` (statistic, p value and the
interval of `confidence_interval()`); `holm(p)` is Holm's step-down adjustment (Holm 1979),
which keeps the family-wise error rate of a whole table at the level of one test.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import scipy.stats

ALPHA = 0.05  # below it a difference is called significant; at or above, "indistinguishable"


class Comparison(NamedTuple):
    difference: float  # mean(a) - mean(b)
    low: float  # the difference's confidence interval (95% by default)
    high: float
    p: float  # two-sided p value of Welch's t test
    df: float  # Welch-Satterthwaite degrees of freedom
    t: float  # the t statistic


def welch(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Comparison:
    """Welch's two-sample t test of `a` against `b` (final values, one per seed).

    Args:
      a, b: at least two values each.
      level: of the confidence interval of `mean(a) - mean(b)`.

    Returns:
      The difference, its interval, the two-sided p value, the degrees of freedom and t.

    Raises:
      ValueError: with fewer than two values in a sample (no variance to test with).
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size < 2 or b.size < 2:
        raise ValueError(
            f"Welch's t test needs at least 2 values per arm (got {a.size} and {b.size}); "
            "run more seeds"
        )
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    difference = float(a.mean() - b.mean())
    se = math.sqrt(va + vb)
    if se == 0.0:  # both arms constant: the difference is exact
        p = 1.0 if difference == 0.0 else 0.0
        return Comparison(difference, difference, difference, p, float(a.size + b.size - 2),
                          math.copysign(math.inf, difference) if difference else 0.0)  # fmt: skip
    df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    t = difference / se
    p = float(2 * scipy.stats.t.sf(abs(t), df))
    half = float(scipy.stats.t.ppf(0.5 + level / 2, df)) * se
    return Comparison(difference, difference - half, difference + half, p, float(df), float(t))


def paired(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Comparison:
    """The paired t test of `a` against `b` (two measurements of the same seeds, in the same
    order: recalibrated and running statistics on the same weights), as
    `scipy.stats.ttest_rel(a, b)`: the mean difference, its interval, p, df = n - 1, t.

    Raises:
      ValueError: samples of different lengths, or fewer than two pairs.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.size < 2:
        raise ValueError(
            f"a paired t test needs two samples of the same n >= 2 ({a.size}, {b.size})"
        )
    d = a - b
    difference, se, df = float(d.mean()), float(d.std(ddof=1) / math.sqrt(d.size)), d.size - 1
    if se == 0.0:
        p = 1.0 if difference == 0.0 else 0.0
        return Comparison(difference, difference, difference, p, float(df),
                          math.copysign(math.inf, difference) if difference else 0.0)  # fmt: skip
    t = difference / se
    half = float(scipy.stats.t.ppf((1 + level) / 2, df)) * se
    p = float(2 * scipy.stats.t.sf(abs(t), df))
    return Comparison(difference, difference - half, difference + half, p, float(df), t)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p values, in the order given: the i-th smallest of m is multiplied by
    `m - i` (i from 0), made non-decreasing in that order, and capped at 1."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [0.0] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * float(p_values[i])))
        adjusted[i] = running
    return adjusted


def p_text(p: float) -> str:
    """`p` to 2 significant digits, or as many more as it takes not to round it onto the other
    side of `ALPHA` (0.0497 reads `0.0497`, 0.04996 `0.04996`, never `0.05`)."""
    for digits in range(2, 17):
        text = f"{p:.{digits}g}"
        if (float(text) < ALPHA) == (p < ALPHA):
            return text
    return repr(p)


def verdict(comparison: Comparison, p_adjusted: float | None = None) -> str:
    """`"+0.42 [0.10, 0.74], p=0.012"`, or `"indistinguishable (...)"` at p >= `ALPHA` (the
    adjusted p when given)."""
    p = comparison.p if p_adjusted is None else p_adjusted
    text = (
        f"{comparison.difference:+.4g} [{comparison.low:.4g}, {comparison.high:.4g}], p={p_text(p)}"
    )
    return text if p < ALPHA else f"indistinguishable ({text})"

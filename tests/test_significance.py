"""Welch's t test and Holm's adjustment (`bnlab.results.welch`, `bnlab.results.holm`) against
scipy and a hand-computed table."""

import numpy as np
import pytest
import scipy.stats

from bnlab import results


@pytest.mark.parametrize(
    "a, b",
    [
        ([0.981, 0.979, 0.983, 0.980, 0.982], [0.975, 0.978, 0.970, 0.976, 0.974]),
        ([0.99, 0.991], [0.5, 0.7, 0.9, 0.95, 0.97, 0.98]),  # unequal sizes and variances
        ([1.0, 2.0, 3.0], [1.5, 2.5, 3.5]),
    ],
)
def test_welch_equals_scipys_unequal_variance_t_test(a, b):
    got = results.welch(a, b)
    want = scipy.stats.ttest_ind(a, b, equal_var=False)
    interval = want.confidence_interval(0.95)
    assert got.difference == pytest.approx(np.mean(a) - np.mean(b), rel=1e-12)
    assert got.t == pytest.approx(want.statistic, rel=1e-10)
    assert got.p == pytest.approx(want.pvalue, rel=1e-10)
    assert got.df == pytest.approx(want.df, rel=1e-10)
    assert (got.low, got.high) == pytest.approx((interval.low, interval.high), rel=1e-10)


def test_welch_needs_two_values_per_arm_and_handles_constant_arms():
    with pytest.raises(ValueError, match="at least 2 values per arm"):
        results.welch([0.9], [0.8, 0.7])
    same = results.welch([0.5, 0.5], [0.5, 0.5])
    assert (same.difference, same.p) == (0.0, 1.0)
    assert results.welch([0.6, 0.6], [0.5, 0.5]).p == 0.0


def test_holm_against_a_hand_computed_table():
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> raised to 0.06 (monotone)
    assert results.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert results.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert results.holm([]) == []


def test_a_verdict_says_indistinguishable_at_p_005_and_above():
    c = results.welch([0.981, 0.979, 0.983, 0.980, 0.982], [0.975, 0.978, 0.970, 0.976, 0.974])
    assert results.verdict(c).startswith(f"{c.difference:+.4g} [")
    assert results.verdict(c, p_adjusted=0.05).startswith("indistinguishable (")


def test_a_p_value_never_reads_as_if_on_the_other_side_of_005():
    from bnlab.studies.significance import p_text

    assert p_text(0.0497) == "0.0497" and p_text(0.012) == "0.012" and p_text(0.05) == "0.05"
    assert p_text(0.2) == "0.2" and p_text(2.4e-5) == "2.4e-05"
    assert p_text(0.04996) == "0.04996" and p_text(0.049999) == "0.049999"
    c = results.welch([0.981, 0.979, 0.983, 0.980, 0.982], [0.975, 0.978, 0.970, 0.976, 0.974])
    assert results.verdict(c, p_adjusted=0.0497).endswith("p=0.0497")


def test_paired_equals_scipys_related_t_test():
    from scipy import stats

    from bnlab.studies.significance import paired

    running = [0.95, 0.97, 0.91, 0.96, 0.94]
    recalibrated = [0.97, 0.98, 0.95, 0.965, 0.96]
    c = paired(recalibrated, running)
    ref = stats.ttest_rel(recalibrated, running)
    np.testing.assert_allclose([c.t, c.p], [ref.statistic, ref.pvalue], rtol=1e-10)
    interval = ref.confidence_interval(0.95)
    np.testing.assert_allclose([c.low, c.high], [interval.low, interval.high], rtol=1e-10)
    assert c.df == 4 and c.difference == pytest.approx(np.mean(recalibrated) - np.mean(running))
    with pytest.raises(ValueError, match="same n"):
        paired([1.0, 2.0], [1.0])

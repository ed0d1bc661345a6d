"""The shared statistics on hand-computed numbers (t quantiles from printed tables)."""

import math

import numpy as np
import pytest

from unet.utils.stats import (
    column_band,
    finite,
    fisher_p,
    paired_differences,
    paired_ratio_ci,
    running_mean,
    t_interval,
)


def test_t_interval_on_known_numbers():
    # t_{0.975, 2} = 4.303: [1, 2, 3] has mean 2, s = 1, half-width 4.303 / sqrt(3) = 2.484
    mean, half = t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(2.484, abs=1e-3)
    # t_{0.95, 3} = 2.353 (a 90% interval): [0, 1, 2, 3] has mean 1.5, s = sqrt(5/3), half 2.353 * 1.291 / 2 = 1.519
    mean, half = t_interval([0.0, 1.0, 2.0, 3.0], level=0.9)
    assert mean == 1.5 and half == pytest.approx(1.519, abs=1e-3)
    mean, half = t_interval([5.0])
    assert mean == 5.0 and math.isnan(half)
    assert all(math.isnan(x) for x in t_interval([]))


def test_paired_ratio_ci_is_a_t_interval_on_log_ratios():
    # log ratios 0, 1, 2: mean 1, s = 1, half-width 4.303 / sqrt(3) = 2.484
    geo, lo, hi = paired_ratio_ci([1.0, math.e, math.e ** 2])
    assert geo == pytest.approx(math.e)
    assert lo == pytest.approx(math.exp(1 - 2.484), rel=1e-3) and hi == pytest.approx(math.exp(1 + 2.484), rel=1e-3)
    # the geometric mean of 2 and 8 is 4; one ratio alone has no interval
    assert paired_ratio_ci([2.0, 8.0])[0] == pytest.approx(4.0)
    geo, lo, hi = paired_ratio_ci([3.0])
    assert geo == pytest.approx(3.0) and math.isnan(lo) and math.isnan(hi)


def test_finite_and_paired_differences():
    assert finite([1, None, float("nan"), True, float("inf"), 2.5]) == [1.0, 2.5]
    a = {0: 1.0, 1: 2.0, 2: 4.0, 3: None}
    b = {0: 0.5, 1: 1.0, 2: 3.0, 3: 1.0, 4: 2.0}
    assert paired_differences(a, b) == [0.5, 1.0, 1.0]  # seeds 3 (no A value) and 4 (no A run) have no pair


def test_fisher_p():
    # 0/3 against 3/3: each extreme table has probability C(3,0) C(3,3) / C(6,3) = 1/20; two-sided 2/20
    assert fisher_p(0, 3, 3, 3) == pytest.approx(0.1)
    assert fisher_p(1, 4, 1, 4) == pytest.approx(1.0)


def test_running_mean_and_column_band():
    np.testing.assert_allclose(running_mean([1.0, 3.0, None, 5.0], 2), [1.0, 2.0, 3.0, 5.0])
    assert math.isnan(running_mean([float("nan")], 3)[0])
    mean, low, high = column_band([[1.0, np.nan], [2.0, 4.0], [3.0, np.nan]])
    np.testing.assert_allclose(mean, [2.0, 4.0])
    assert low[0] == pytest.approx(2 - 2.484, abs=1e-3) and high[0] == pytest.approx(2 + 2.484, abs=1e-3)
    assert math.isnan(low[1]) and math.isnan(high[1])  # one finite run: no band

"""
Statistics shared by the ablation report and the benchmark: t-intervals (``scipy.stats.t``),
seed-paired differences, geometric-mean ratios and Fisher's exact test. Plain numbers in,
plain numbers out; nothing here imports torch.
"""

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

LEVEL = 0.95


def finite(values: "Iterable[float | None]") -> list[float]:
    """The finite numbers among ``values`` (None, booleans, NaN and inf dropped), as floats."""
    return [float(v) for v in values if v is not None and not isinstance(v, bool) and math.isfinite(v)]


def t_interval(values: "Sequence[float] | np.ndarray", level: float = LEVEL) -> tuple[float, float]:
    """
    Mean and half-width of the t confidence interval, mean +- t_{(1+level)/2, n-1} s / sqrt(n)
    (s the sample standard deviation).

    :param values: n numbers (all used: drop non-finite ones first, see ``finite``).
    :param level: the coverage, 0.95 for a 95% interval.
    :return: (mean, half_width); half_width is NaN for n < 2, both are NaN for n = 0.
    """
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan")
    if len(v) < 2:
        return float(v[0]), float("nan")
    return float(v.mean()), float(stats.t.ppf((1 + level) / 2, len(v) - 1) * stats.sem(v))


def paired_ratio_ci(ratios, level=LEVEL):
    """
    Geometric mean of positive paired ratios (e.g. per-repeat timings B/A) and its t-interval,
    taken on the log ratios, where a machine's multiplicative slow-downs are roughly symmetric.

    :return: (geo_mean, lo, hi); lo and hi are NaN for fewer than 2 ratios.
    """
    mean, half = t_interval([math.log(r) for r in ratios], level)
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def paired_differences(a: "Mapping[Any, float | None]", b: "Mapping[Any, float | None]") -> list[float]:
    """a[key] - b[key] for the keys (seeds) where both values are finite, in key order:
    the pairs that saw the same data, t and noise."""
    return [a[k] - b[k] for k in sorted(a) if k in b and len(finite([a[k], b[k]])) == 2]


def fisher_p(k_a: int, n_a: int, k_b: int, n_b: int) -> float:
    """Two-sided Fisher exact p-value for k_a of n_a events against k_b of n_b."""
    return float(stats.fisher_exact([[k_a, n_a - k_a], [k_b, n_b - k_b]])[1])


def running_mean(values: "Iterable[float | None]", window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` values (fewer at the start), None and NaN ignored;
    NaN where a window holds no finite value."""
    x = np.asarray([np.nan if v is None else v for v in values], dtype=float)
    out = np.full(len(x), np.nan)
    for i in range(len(x)):
        w = x[max(0, i - window + 1): i + 1]
        w = w[np.isfinite(w)]
        if len(w):
            out[i] = w.mean()
    return out


def column_band(rows: np.ndarray, level: float = LEVEL) -> "tuple[np.ndarray, np.ndarray, np.ndarray]":
    """
    Per column of a 2-D array (runs x steps): the mean of the finite entries and its t-band.

    :return: (mean, low, high) arrays; low and high are NaN where a column has fewer than 2
        finite entries.
    """
    rows = np.asarray(rows, dtype=float)
    mean, low, high = (np.full(rows.shape[1], np.nan) for _ in range(3))
    for j in range(rows.shape[1]):
        m, h = t_interval(finite(rows[:, j]), level)
        mean[j], low[j], high[j] = m, m - h, m + h
    return mean, low, high

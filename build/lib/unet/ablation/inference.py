"""
The ablation's one statistics module: every test the reports read, one alpha, one Holm correction.

- Failure counts: exact (Clopper-Pearson) intervals, the stratified exact McNemar test of paired
  failures with Newcombe's interval of the paired difference.
- The old grids' held-out loss and frontier measures: seed-paired t-tests.
- The never-censored grid's tests on its continuous endpoint (``definitions.final_loss``): one
paired outcome per (cell, seed), stopped runs ranked worst, a Wilcoxon signed-rank test
(``scipy.stats.wilcoxon``), Holm's correction over the secondaries, and "no difference" only as
equivalence within the pre-registered margin (two one-sided t-tests, TOST).

Stopped runs: every stopped run takes the value W = 1 + the largest final loss of any run in the
test that finished; it is worse than every finished run and tied with every other stopped run.
A contrast of one pair of arms is A - B per (cell, seed); a factorial contrast (``pairs``) is
the mean of its pairs' differences in that (cell, seed).
"""

import math
import statistics

import numpy as np
from scipy import stats as sps

from unet.utils.stats import paired_differences, t_interval

ALPHA = 0.05


def worst_value(values):
    """W: 1 + the largest finite value (1 when none is finite)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return (max(finite) if finite else 0.0) + 1.0


def contrasts(blocks, pairs):
    """
    Per-block contrasts and how many of their runs were imputed.

    :param blocks: [{arm: final loss or inf}] one mapping per (cell, seed).
    :param pairs: [[A, B], ...]: the contrast is the mean over pairs of A - B.
    :return: (list of contrasts, imputed run count).
    """
    w = worst_value([v for b in blocks for v in b.values()])
    fill = lambda v: w if v is None or not math.isfinite(v) else v  # noqa: E731
    imputed = sum(1 for b in blocks for a in {x for p in pairs for x in p} if fill(b[a]) == w)
    return [statistics.fmean(fill(b[a]) - fill(b[c]) for a, c in pairs) for b in blocks], imputed


def paired_rank_test(d):
    """Two-sided Wilcoxon signed-rank p of contrasts ``d`` (zero differences dropped; exact for
    small samples without ties, as scipy decides); 1.0 when every difference is zero."""
    nonzero = [x for x in d if x != 0]
    if not nonzero:
        return 1.0
    return float(sps.wilcoxon(nonzero, alternative="two-sided").pvalue)


def tost(d, margin, alpha=ALPHA):
    """Two one-sided t-tests of |mean d| < margin: the larger of their p values (equivalence
    when below ``alpha``: the 90% interval lies inside +-margin)."""
    d = np.asarray(d, dtype=float)
    n = len(d)
    if n < 2:
        return 1.0
    sd = d.std(ddof=1)
    if sd == 0:
        return 0.0 if abs(d.mean()) < margin else 1.0
    se = sd / math.sqrt(n)
    p_low = sps.t.sf((d.mean() + margin) / se, n - 1)  # H0: mean <= -margin
    p_high = sps.t.cdf((d.mean() - margin) / se, n - 1)  # H0: mean >= +margin
    return float(max(p_low, p_high))


def final_loss_test(blocks, pairs, margin):
    """
    The paired test of one pre-registered final-loss comparison.

    :return: dict with ``n`` blocks, ``imputed`` runs, the contrasts' ``median`` and ``mean`` with
        its 95% t-interval (``low``, ``high``), ``p`` (Wilcoxon), ``p_equivalence`` (TOST against
        ``margin``; None when a run was imputed: a stopped run has no loss to be equivalent with).
    """
    d, imputed = contrasts(blocks, pairs)
    mean, half = t_interval(d)
    return dict(n=len(d), imputed=imputed, median=statistics.median(d) if d else None, mean=mean, low=mean - half,
                high=mean + half,
                p=paired_rank_test(d), p_equivalence=None if imputed else tost(d, margin), margin=margin)


def verdict(test, margin=None, p=None, names=None):
    """The one wording of a test's result the numbers support: a difference and its direction
    (p below ``ALPHA``; Holm-adjusted ``p`` for a secondary), equivalence (failure fractions: the
    interval inside +-``margin``; final loss: TOST against the test's margin, no run stopped), or
    "not resolved".

    :param names: the two sides' names (default the test's arms; a factorial contrast's sides)."""
    p = test["p"] if p is None else p
    if "measure" not in test or test["measure"] == "final_loss":
        pairs = test.get("pairs", [test.get("arms", ("A", "B"))])
        a, b = names or (pairs[0] if len(pairs) == 1 else ("the zeroed side", "the default side"))
        if p < ALPHA:
            return f"{a if test['median'] < 0 else b} ends lower (p = {p:.2g})"
        if test["p_equivalence"] is not None and test["p_equivalence"] < ALPHA:
            return f"equivalent within +-{test['margin']:g} (TOST p = {test['p_equivalence']:.2g})"
        return f"not resolved: neither a difference (p = {p:.2g}) nor equivalence within +-{test['margin']:g}"
    a, b = names or test["arms"]
    if test["n"] < 2 or math.isnan(test["diff"]):
        return "too few pairs"
    if test["measure"] == "failure":
        if p < ALPHA:
            return f"{a} fails {'less' if test['diff'] < 0 else 'more'} often than {b}"
        if -margin < test["low"] and test["high"] < margin:
            return f"equivalent within ±{margin:g} in failure fraction"
        return "not resolved"
    if p < ALPHA:
        return f"{a} {'lower' if test['diff'] < 0 else 'higher'} held-out L_simple than {b}"
    return "not resolved"


def seed_paired_verdict(test, p_holm):
    """The old grids' frontier tests' verdict from a Holm-adjusted p: '<a> better' / '<a> worse'
    (or higher / lower where neither is better), 'no detectable difference' (not equivalence: these
    tests have no margin), or too few pairs."""
    if test["n"] < 2:
        return "too few runs to compare"
    if p_holm >= ALPHA or test["mean"] == 0:
        return "no detectable difference"
    if test["better"] is None:
        return f"{test['a']} {'higher' if test['mean'] > 0 else 'lower'}"
    good = test["mean"] > 0 if test["better"] == "higher" else test["mean"] < 0
    return f"{test['a']} {'better' if good else 'worse'}"


def binomial_interval(k, n):
    """The exact (Clopper-Pearson) 95% interval of a fraction k / n; (nan, nan) for n = 0."""
    if n == 0:
        return float("nan"), float("nan")
    return _exact(k, n, 0.95)


# Stratified exact McNemar test: within each stratum only discordant pairs carry information;
# under the null that A and B fail alike in every stratum, each discordant pair is A's with
# probability 1/2, so the pooled count of "A failed, B did not" is Binomial(b + c, 1/2).
def mcnemar_exact(pairs):
    """
    The exact conditional (McNemar / sign) test on paired binary outcomes pooled over strata.

    :param pairs: [(stratum, seed, A failed, B failed)].
    :return: dict with ``n`` pairs, ``b`` (A failed, B not), ``c`` (B failed, A not), ``p``
        (two-sided; 1.0 without discordant pairs), the paired difference in failure fraction
        ``diff`` = (b - c) / n and its 95% interval (``low``, ``high``: Newcombe's).
    """
    n = len(pairs)
    b = sum(1 for _, _, fa, fb in pairs if fa and not fb)
    c = sum(1 for _, _, fa, fb in pairs if fb and not fa)
    m = b + c
    p = 1.0 if m == 0 else float(sps.binomtest(b, m, 0.5).pvalue)
    if n == 0:
        return {"n": 0, "b": 0, "c": 0, "p": 1.0, "diff": float("nan"), "low": float("nan"), "high": float("nan"),
                "statistic": "no pairs"}
    both = sum(1 for _, _, fa, fb in pairs if fa and fb)
    low, high = paired_difference_interval(both, b, c, n)
    return {"n": n, "b": b, "c": c, "p": p, "diff": (b - c) / n, "low": low, "high": high,
            "statistic": f"b={b}, c={c} of {n} pairs"}


# Newcombe's interval for a difference of paired proportions (Newcombe 1998, Stat. Med. 17:2635,
# method 10): Wilson score limits of each arm's failure fraction, combined with the phi
# correlation of the pairs. Unlike a Wald or t interval it does not collapse to a point when no
# pair is discordant, and it stays inside [-1, 1].
def paired_difference_interval(both, b, c, n):
    """A 95% interval for (b - c) / n from the 2x2 table of n pairs (``both`` failed, only A,
    only B, neither = the rest)."""
    neither = n - both - b - c
    p1, p2 = (both + b) / n, (both + c) / n
    l1, u1 = _wilson(both + b, n)
    l2, u2 = _wilson(both + c, n)
    den = (both + b) * (c + neither) * (both + c) * (b + neither)
    phi = (both * neither - b * c) / math.sqrt(den) if den > 0 else 0.0
    d = p1 - p2
    low = d - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    high = d + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return max(-1.0, low), min(1.0, high)


def _wilson(k, n, z=1.959963984540054):
    """The Wilson score 95% interval of k / n."""
    p, z2 = k / n, z * z
    centre, half = (p + z2 / (2 * n)) / (1 + z2 / n), z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return centre - half, centre + half


def _exact(k, n, level):
    ci = sps.binomtest(k, n).proportion_ci(confidence_level=level, method="exact")
    return float(ci.low), float(ci.high)


def paired_loss_test(pairs):
    """Seed-paired t-test of A - B on the final held-out L_simple (pairs where both finished)."""
    d = paired_differences({(s, x): va for x, s, va, _ in pairs if va is not None},
                           {(s, x): vb for x, s, _, vb in pairs if vb is not None})
    mean, half = t_interval(d)
    p = float(sps.ttest_1samp(d, 0.0).pvalue) if len(d) >= 2 and max(d) != min(d) else 1.0
    return {"n": len(d), "diff": mean, "low": mean - half, "high": mean + half, "p": p,
            "statistic": f"mean A - B = {mean:+.4f} over {len(d)} pairs"}


def paired_test(a, b):
    """
    Seed-paired comparison of a per-seed measure of arm A against arm B.

    :param a: {seed: value or None} for arm A; b likewise.
    :return: dict with ``n`` pairs, ``mean`` difference A - B, its 95% ``half`` width and the
        two-sided paired t-test ``p`` (1.0 when the differences are all equal or n < 2: no evidence).
    """
    d = paired_differences({s: v for s, v in a.items() if v is not None},
                           {s: v for s, v in b.items() if v is not None})
    mean, half = t_interval(d)
    if len(d) < 2 or max(d) == min(d):
        p = 1.0 if len(d) < 2 or d[0] == 0 else 0.0  # identical non-zero shifts: exact, not noise
    else:
        p = float(sps.ttest_1samp(d, 0.0).pvalue)
    return {"n": len(d), "mean": mean, "half": half, "p": p}


def holm(pvalues):
    """Holm's step-down adjusted p-values, in the input order: the k-th smallest of m is
    multiplied by (m - k + 1), made monotone, capped at 1. Controls the family-wise error."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted

"""
The never-censored grid's tests on its continuous endpoint (``definitions.final_loss``): one
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

from unet.utils.stats import t_interval

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


def holm(pvalues):
    """Holm-adjusted p values, in the input's order."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    out, running = [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        out[i] = running
    return out


def verdict(test, p=None, alpha=ALPHA, names=("A", "B")):
    """One sentence the numbers support: a difference (its direction), equivalence within the
    margin, or neither ("not resolved").

    :param p: the p value to judge (Holm-adjusted for a secondary); default ``test["p"]``.
    """
    p = test["p"] if p is None else p
    a, b = names
    if p < alpha:
        better = a if test["median"] < 0 else b
        return f"{better} ends lower (p = {p:.2g})"
    if test["p_equivalence"] is not None and test["p_equivalence"] < alpha:
        return f"equivalent within +-{test['margin']:g} (TOST p = {test['p_equivalence']:.2g})"
    return f"not resolved: neither a difference (p = {p:.2g}) nor equivalence within +-{test['margin']:g}"

"""
The pre-registered endpoints of a stability grid: failure fractions per (panel, arm, lr) with
exact binomial intervals, the primary test (failure at the edge learning rates, A vs B,
seed-paired, one stratified exact McNemar test over every named cell), the secondary tests
(Holm-corrected among themselves), and the conclusions worded from them. Pure functions of
``results.json``; nothing here trains, plots or imports torch.

A run *fails* by ``unet.train.diagnostics.FailureRule`` (non-finite loss, a held-out L_simple
above the zero predictor's, or an mse spike); *diverged* is the stricter count of non-finite
losses alone. Each result row carries both.
"""

import math

from scipy import stats as sps

from unet.utils.stats import paired_differences, t_interval

from .grid import cell_label, cell_matches, tested_cells
from .inference import final_loss_test
from .inference import verdict as final_loss_verdict
from .summary import holm

ALPHA = 0.05


def binomial_interval(k, n):
    """The exact (Clopper-Pearson) 95% interval of a fraction k / n; (nan, nan) for n = 0."""
    if n == 0:
        return float("nan"), float("nan")
    return _exact(k, n, 0.95)


def failure_fractions(runs):
    """[{panel, arm, lr, failed, diverged, n, low, high}] over every (cell without lr, arm, lr)."""
    groups = {}
    for r in runs:
        panel = {k: v for k, v in r["cell"].items() if k != "lr"}
        key = (cell_label(panel), r["arm"], float(r["cell"].get("lr", r["config"]["lr"])))
        groups.setdefault(key, {"panel": panel, "runs": []})["runs"].append(r)
    out = []
    for (label, arm, lr), g in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][1])):
        k, n = sum(bool(r["failed"]) for r in g["runs"]), len(g["runs"])
        low, high = binomial_interval(k, n)
        out.append({"panel": label, "arm": arm, "lr": lr, "failed": k, "n": n, "low": low, "high": high,
                    "diverged": sum(bool(r["diverged"]) for r in g["runs"]), "fraction": k / n})
    return out


def paired_outcomes(runs, spec):
    """[(stratum label, seed, value of A, value of B)] of one test spec: the failed flag, or the
    final held-out L_simple (None for a failed run), of the two arms' runs with the same seed."""
    a, b = spec["arms"]
    measure = spec["measure"]
    pairs = []
    for cell in tested_cells(spec):
        by_arm = {arm: {r["seed"]: r for r in runs if r["arm"] == arm and cell_matches(r["cell"], cell)}
                  for arm in (a, b)}
        for seed in sorted(set(by_arm[a]) & set(by_arm[b])):
            ra, rb = by_arm[a][seed], by_arm[b][seed]
            if measure == "failure":
                name = spec.get("definition")  # a never-censored grid's failure definition, scored from the record
                fa, fb = (ra["verdicts"][name], rb["verdicts"][name]) if name else (ra["failed"], rb["failed"])
                pairs.append((cell_label(cell), seed, bool(fa), bool(fb)))
            else:
                pairs.append((cell_label(cell), seed, ra["measures"].get("final_eval_mse"),
                              rb["measures"].get("final_eval_mse")))
    return pairs


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


def final_loss_blocks(runs, spec):
    """([{arm: final loss, inf for a stopped run}] per (cell, seed) that every arm of the spec's
    pairs ran, their stratum labels): the blocks of a ``final_loss`` test."""
    arms = sorted({a for pair in spec["pairs"] for a in pair})
    blocks, strata = [], set()
    for cell in tested_cells(spec):
        by_arm = {arm: {r["seed"]: r for r in runs if r["arm"] == arm and cell_matches(r["cell"], cell)}
                  for arm in arms}
        for seed in sorted(set.intersection(*(set(v) for v in by_arm.values()))):
            blocks.append({arm: math.inf if by_arm[arm][seed].get("final_loss") is None
                           else by_arm[arm][seed]["final_loss"] for arm in arms})
            strata.add(cell_label(cell))
    return blocks, sorted(strata)


def run_final_loss_test(runs, spec, margin):
    """A ``final_loss`` test (``inference.final_loss_test``) in the fields the report reads."""
    blocks, strata = final_loss_blocks(runs, spec)
    t = final_loss_test(blocks, spec["pairs"], margin)
    contrast = " and ".join(f"{a} - {b}" for a, b in spec["pairs"])
    return {**spec, **t, "diff": t["mean"], "strata": strata, "test": "Wilcoxon signed-rank (stopped runs worst)",
            "statistic": f"median contrast {t['median']:+.4f} ({contrast}) over {t['n']} pairs, "
                         f"{t['imputed']} stopped run(s) ranked worst"}


def run_test(runs, spec, margin=0.25):
    """One pre-registered test's result: its spec, the numbers, and the test's name."""
    if spec["measure"] == "final_loss":
        return run_final_loss_test(runs, spec, margin)
    pairs = paired_outcomes(runs, spec)
    result = mcnemar_exact(pairs) if spec["measure"] == "failure" else paired_loss_test(pairs)
    test = "stratified exact McNemar" if spec["measure"] == "failure" else "paired t-test"
    return {**spec, **result, "test": test, "strata": sorted({x for x, *_ in pairs})}


def endpoint_tests(results):
    """{"primary": test or None, "secondary": [tests with ``p_holm``]} of ``results.json``."""
    ab, runs = results["ablation"], results["runs"]
    margin = ab.get("equivalence_margin", 0.25)
    primary = run_test(runs, ab["primary"], margin) if ab.get("primary") else None
    secondary = [run_test(runs, s, margin) for s in ab.get("secondary", [])]
    for t, p in zip(secondary, holm([t["p"] for t in secondary])):
        t["p_holm"] = p
    return {"primary": primary, "secondary": secondary, "alpha": ALPHA,
            "equivalence_margin": ab.get("equivalence_margin", 0.25)}


def verdict(test, margin, p=None):
    """'A fails less often than B' / 'more often', 'equivalent within +-margin', or
    'not resolved'; for the held-out loss, 'A lower' / 'A higher' / 'not resolved'."""
    a, b = test["arms"]
    p = test["p"] if p is None else p
    if test["n"] < 2 or math.isnan(test["diff"]):
        return "too few pairs"
    if test["measure"] == "final_loss":
        names = (a, b) if len(test["pairs"]) == 1 else ("the zeroed side", "the default side")
        return final_loss_verdict(test, p, names=names)
    if test["measure"] == "failure":
        if p < ALPHA:
            return f"{a} fails {'less' if test['diff'] < 0 else 'more'} often than {b}"
        if -margin < test["low"] and test["high"] < margin:
            return f"equivalent within ±{margin:g} in failure fraction"
        return "not resolved"
    if p < ALPHA:
        return f"{a} {'lower' if test['diff'] < 0 else 'higher'} held-out L_simple than {b}"
    return "not resolved"


def _test_sentence(test, margin, p, label):
    v = verdict(test, margin, p)
    what = "paired difference in failure fraction" if test["measure"] == "failure" else "mean A - B"
    return (f"{label} ({test['name']}: {test['arms'][0]} vs {test['arms'][1]}, {test['test']}, "
            f"{test['statistic']}, p = {p:.3g}): **{v}**; {what} {test['diff']:+.3f} "
            f"[{test['low']:+.3f}, {test['high']:+.3f}] over {', '.join(test['strata'])}.")


def endpoint_conclusions(tests):
    """The conclusions a reader may draw, one sentence per pre-registered test, worded from its
    numbers: significance at 5% (Holm-adjusted for the secondary tests), equivalence only where
    the interval lies inside the pre-registered margin, "not resolved" otherwise."""
    margin, out = tests["equivalence_margin"], []
    if tests["primary"]:
        out.append(_test_sentence(tests["primary"], margin, tests["primary"]["p"], "Primary endpoint"))
    for t in tests["secondary"]:
        out.append(_test_sentence(t, margin, t["p_holm"], "Secondary (Holm-adjusted p)"))
    if tests["secondary"]:
        out.append("Everything else in this report is descriptive: it was not pre-registered and its intervals "
                   "are not corrected for the number of comparisons.")
    return out

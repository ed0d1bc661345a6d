"""
The pre-registered endpoints of a stability grid: failure fractions per (panel, arm, lr) with
exact binomial intervals, the primary and secondary tests (Holm-corrected among the secondaries)
on the pairs each names, and the conclusions worded from them. Pure functions of
``results.json``; the statistics are ``inference``'s; nothing here trains, plots or imports torch.

A never-censored grid's test is either ``final_loss`` (the held-out L_simple at the end, stopped
runs worst) or ``failure`` under one of ``definitions``' start-neutral definitions. The superseded
digits grid's runs carry ``failed`` (``unet.train.diagnostics.FailureRule``, which stopped them)
and ``diverged`` (non-finite losses alone).
"""

import math

from .grid import cell_label, cell_matches, tested_cells
from .inference import (  # noqa: F401 (the report and tests read them here too)
    ALPHA,
    binomial_interval,
    final_loss_test,
    holm,
    mcnemar_exact,
    paired_loss_test,
    verdict,
)


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


def _final(r):
    return r.get("final_loss")


def final_loss_blocks(runs, spec, value=_final):
    """([{arm: final loss, inf for a stopped run}] per (cell, seed) that every arm of the spec's
    pairs ran, their stratum labels): the blocks of a ``final_loss`` test (``value``: another
    per-run number, such as the step-0 loss)."""
    arms = sorted({a for pair in spec["pairs"] for a in pair})
    blocks, strata = [], set()
    for cell in tested_cells(spec):
        by_arm = {arm: {r["seed"]: r for r in runs if r["arm"] == arm and cell_matches(r["cell"], cell)}
                  for arm in arms}
        for seed in sorted(set.intersection(*(set(v) for v in by_arm.values()))):
            values = {arm: value(by_arm[arm][seed]) for arm in arms}
            blocks.append({arm: math.inf if v is None else v for arm, v in values.items()})
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

"""
Learning-rate frontiers: the stability measures the field uses, computed from a sweep of
runs over learning rates, per arm (an init scheme in one panel: norm, depth, ...) and seed.
Pure functions of plain records; nothing here trains or plots.

Definitions (each also printed in the report):
- maximal stable learning rate: the largest swept learning rate at which every seed of the
  arm finished without divergence (per seed: the largest at which that seed did);
- maximal trainable learning rate: the same, where every seed also ended below its initial
  loss (a run the divergence rule lets finish can still end worse than it started);
- learning-rate sensitivity (Wortsman et al. 2023, "Small-scale proxies for large-scale
  Transformer training instabilities", arXiv 2309.14322, section 3.1): the mean over the
  swept learning rates of min(final loss, initial loss) minus the best final loss over the
  sweep; a diverged run counts as the initial loss. 0 = the loss does not depend on the lr;
- optimal learning rate and best loss: where the final loss is lowest;
- Holm's step-down correction (Holm 1979) of the p-values of all comparisons in a report.
"""

import math
from dataclasses import dataclass, field

from scipy import stats as sps

from .stats import finite, paired_differences, t_interval


@dataclass(frozen=True)
class SweepRun:
    """One run of a learning-rate sweep, reduced to what the frontier measures read.

    :param panel: the grid values other than init, lr and seed, as a sorted tuple of (key, value).
    :param final_loss: the final held-out loss; None (or non-finite) when the run diverged.
    :param early: {step: training loss at that step} for the early-training deficit.
    """

    panel: tuple
    arm: str
    seed: int
    lr: float
    diverged: bool
    final_loss: float = None
    initial_loss: float = None
    early: dict = field(default_factory=dict)


def _ok(x):
    return x is not None and math.isfinite(x)


def seed_curves(runs):
    """{(panel, arm): {seed: [runs sorted by lr]}}."""
    out = {}
    for r in runs:
        out.setdefault((r.panel, r.arm), {}).setdefault(r.seed, []).append(r)
    for seeds in out.values():
        for s in seeds:
            seeds[s].sort(key=lambda r: r.lr)
    return out


def max_stable_lr(curve):
    """The largest lr of one seed's sweep that finished without divergence (None if none did)."""
    ok = [r.lr for r in curve if not r.diverged and _ok(r.final_loss)]
    return max(ok) if ok else None


def max_trainable_lr(curve):
    """The largest lr of one seed's sweep whose run finished below its initial loss: a run that
    does not diverge by the rule may still end worse than it started (None if none did better)."""
    ok = [r.lr for r in curve if not r.diverged and _ok(r.final_loss) and _ok(r.initial_loss)
          and r.final_loss < r.initial_loss]
    return max(ok) if ok else None


def lr_sensitivity(curve):
    """Wortsman et al.'s sensitivity of one seed's sweep: mean over lrs of min(final, initial)
    minus the best final loss; None when no run finished or no initial loss is known."""
    initial = [r.initial_loss for r in curve if _ok(r.initial_loss)]
    finals = [r.final_loss for r in curve if not r.diverged and _ok(r.final_loss)]
    if not initial or not finals:
        return None
    l0 = min(initial)  # every lr of a seed starts from the same weights and batch: equal up to rounding
    capped = [min(r.final_loss, l0) if (not r.diverged and _ok(r.final_loss)) else l0 for r in curve]
    return sum(capped) / len(capped) - min(finals)


def best(curve):
    """(optimal lr, best final loss) of one seed's sweep, or (None, None)."""
    ok = [r for r in curve if not r.diverged and _ok(r.final_loss)]
    if not ok:
        return None, None
    r = min(ok, key=lambda r: r.final_loss)
    return r.lr, r.final_loss


def arm_measures(seeds):
    """
    The frontier measures of one arm over its seeds.

    :param seeds: {seed: [SweepRun sorted by lr]} of one (panel, arm).
    :return: dict of per-seed values (``per_seed``: {measure: {seed: value}}) and summaries:
        ``max_stable_lr`` (all seeds stable there), ``sensitivity`` / ``best_loss`` /
        ``log10_opt_lr`` / ``log10_max_stable_lr`` / ``log10_max_trainable_lr`` as (mean, 95%
        half-width), ``max_trainable_lr`` (every seed ended below its initial loss), ``opt_lr`` (lowest mean final loss over the
        lrs every seed finished), ``diverged`` {lr: (k, n)}, ``initial_loss`` (median).
    """
    per_seed = {"max_stable_lr": {}, "max_trainable_lr": {}, "sensitivity": {}, "best_loss": {}, "log10_opt_lr": {}}
    for s, curve in seeds.items():
        lr_opt, loss = best(curve)
        per_seed["max_stable_lr"][s] = max_stable_lr(curve)
        per_seed["max_trainable_lr"][s] = max_trainable_lr(curve)
        per_seed["sensitivity"][s] = lr_sensitivity(curve)
        per_seed["best_loss"][s] = loss
        per_seed["log10_opt_lr"][s] = None if lr_opt is None else math.log10(lr_opt)
    by_lr = {}
    for curve in seeds.values():
        for r in curve:
            by_lr.setdefault(r.lr, []).append(r)
    stable = [lr for lr, rs in by_lr.items() if all(not r.diverged and _ok(r.final_loss) for r in rs)]
    mean_loss = {lr: sum(r.final_loss for r in by_lr[lr]) / len(by_lr[lr]) for lr in stable}
    out = {"per_seed": per_seed, "max_stable_lr": max(stable) if stable else None,
           "opt_lr": min(mean_loss, key=mean_loss.get) if mean_loss else None,
           "diverged": {lr: (sum(r.diverged for r in rs), len(rs)) for lr, rs in sorted(by_lr.items())},
           "n_seeds": len(seeds)}
    for k in ("sensitivity", "best_loss", "log10_opt_lr"):
        out[k] = t_interval(finite(per_seed[k].values()))
    for k in ("max_stable_lr", "max_trainable_lr"):
        out[f"log10_{k}"] = t_interval(finite(log10_or_none(v) for v in per_seed[k].values()))
    trains = [lr for lr in stable if all(r.final_loss < r.initial_loss for r in by_lr[lr] if _ok(r.initial_loss))]
    out["max_trainable_lr"] = max(trains) if trains else None
    initial = sorted(finite(r.initial_loss for curve in seeds.values() for r in curve))
    out["initial_loss"] = initial[len(initial) // 2] if initial else None
    return out


def log10_or_none(x):
    return None if x is None else math.log10(x)


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


def early_losses(seeds, steps, lr):
    """{step: {seed: training loss at that step}} of one arm's runs at learning rate ``lr``, for
    the seed-paired early-training deficit (None where the run had stopped or lacks that lr)."""
    at = {s: next((r for r in curve if r.lr == lr), None) for s, curve in seeds.items()}
    return {k: {s: None if r is None else r.early.get(k) for s, r in at.items()} for k in steps}


# --------------------------------------------------------------------------- the report's frontier

# The measures compared between two arms of a panel, seed by seed: (key, label, which way is
# better for the first arm: "higher", "lower", or None where neither is, e.g. the optimum's place).
COMPARED = [("log10_max_stable_lr", "log10 max stable lr", "higher"),
            ("log10_max_trainable_lr", "log10 max trainable lr", "higher"), ("sensitivity", "lr sensitivity", "lower"),
            ("best_loss", "best final loss", "lower"), ("log10_opt_lr", "log10 optimal lr", None)]
ALPHA = 0.05


def _hashable(v):
    return tuple(v) if isinstance(v, list) else v


def sweep_runs(results):
    """The runs of ``results.json`` as ``SweepRun``s: the panel is the run's cell without ``lr``,
    the learning rate is the run's own (so a grid without an lr axis is a one-lr sweep)."""
    out = []
    for r in results["runs"]:
        lr = r["cell"].get("lr", r.get("config", {}).get("lr"))
        if lr is None:
            continue  # a hand-written result without its config: not part of a sweep
        m = r["measures"]
        early = {int(k[len("loss_at_"):]): v for k, v in m.items() if k.startswith("loss_at_")}
        out.append(SweepRun(tuple((k, _hashable(v)) for k, v in r["cell"].items() if k != "lr"), r["arm"], r["seed"],
                            float(lr), bool(m["diverged"]), m.get("final_eval_loss"),
                            m.get("initial_loss"), early))
    return out


def loss_by_lr(seeds):
    """{lr: {"mean", "ci", "n" finished, "diverged", "runs"}} of one arm's final held-out losses."""
    by_lr = {}
    for curve in seeds.values():
        for r in curve:
            by_lr.setdefault(r.lr, []).append(r)
    out = {}
    for lr, rs in sorted(by_lr.items()):
        mean, half = t_interval(finite(r.final_loss for r in rs if not r.diverged))
        out[lr] = {"mean": mean, "ci": half, "n": sum(not r.diverged and _ok(r.final_loss) for r in rs),
                   "diverged": sum(r.diverged for r in rs), "runs": len(rs)}
    return out


def _per_seed(measures, key):
    """{seed: value} of one compared measure (the max stable lr on a log scale, as swept)."""
    if key in ("log10_max_stable_lr", "log10_max_trainable_lr"):
        return {s: log10_or_none(v) for s, v in measures["per_seed"][key[len("log10_"):]].items()}
    return measures["per_seed"][key]


def pair_tests(a_seeds, b_seeds, ma, mb, a, b, early_steps):
    """Every seed-paired test of arm ``a`` against ``b`` in one panel: the ``COMPARED`` measures,
    then the training loss at each early step at ``b``'s optimal learning rate (the baseline's)."""
    tests = []
    for key, label, better in COMPARED:
        pa, pb = _per_seed(ma, key), _per_seed(mb, key)
        tests.append({"a": a, "b": b, "measure": key, "label": label, "better": better, **paired_test(pa, pb)})
    lr = mb["opt_lr"] if mb["opt_lr"] is not None else ma["opt_lr"]
    if lr is not None:
        ea, eb = early_losses(a_seeds, early_steps, lr), early_losses(b_seeds, early_steps, lr)
        for k in early_steps:
            tests.append({"a": a, "b": b, "measure": f"loss_at_{k}", "label": f"training loss at step {k}",
                          "better": "lower", "lr": lr, **paired_test(ea[k], eb[k])})
    return tests


def judge(test, p_holm):
    """The test's verdict from its Holm-adjusted p-value: '<a> better' / '<a> worse' (or
    higher / lower where neither is better), 'no detectable difference', or too few pairs."""
    if test["n"] < 2:
        return "too few runs to compare"
    if p_holm >= ALPHA or test["mean"] == 0:
        return "no detectable difference"
    if test["better"] is None:
        return f"{test['a']} {'higher' if test['mean'] > 0 else 'lower'}"
    good = test["mean"] > 0 if test["better"] == "higher" else test["mean"] < 0
    return f"{test['a']} {'better' if good else 'worse'}"


def frontier_summary(runs, pairs, early_steps):
    """
    The frontier of every panel: each arm's measures (``arm_measures``) and final loss per lr,
    and every seed-paired test of the compared pairs, Holm-corrected across all of them.

    :param runs: ``SweepRun``s. :param pairs: [(A, B)] arms to compare.
    :return: {"panels": [{"panel", "lrs", "arms": {arm: measures + "by_lr"}, "tests": [...]}],
        "tests": the number of tests in the Holm family, "alpha"}.
    """
    curves = seed_curves(runs)
    panels, tests = [], []
    for panel in dict.fromkeys(r.panel for r in runs):
        arms = {arm: {**arm_measures(seeds), "by_lr": loss_by_lr(seeds)} for (p, arm), seeds in curves.items()
                if p == panel}
        ptests = [t for a, b in pairs if a in arms and b in arms
                  for t in pair_tests(curves[(panel, a)], curves[(panel, b)], arms[a], arms[b], a, b, early_steps)]
        tests += [t for t in ptests if t["n"] >= 2]
        panels.append({"panel": dict(panel), "lrs": sorted({r.lr for r in runs if r.panel == panel}), "arms": arms,
                       "tests": ptests})
    for t, p in zip(tests, holm([t["p"] for t in tests])):
        t["p_holm"] = p
    for panel in panels:
        for t in panel["tests"]:
            t.setdefault("p_holm", float("nan"))
            t["verdict"] = judge(t, t["p_holm"])
    return {"panels": panels, "tests": len(tests), "alpha": ALPHA}

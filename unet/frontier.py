"""
Learning-rate frontiers: the stability measures the field uses, computed from a sweep of
runs over learning rates, per arm (an init scheme in one panel: norm, depth, ...) and seed.
Pure functions of plain records; nothing here trains or plots.

Definitions (each also printed in the report):
- maximal stable learning rate: the largest swept learning rate at which every seed of the
  arm finished without divergence (per seed: the largest at which that seed did);
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
        ``log10_opt_lr`` as (mean, 95% half-width), ``opt_lr`` (lowest mean final loss over the
        lrs every seed finished), ``diverged`` {lr: (k, n)}.
    """
    per_seed = {"max_stable_lr": {}, "sensitivity": {}, "best_loss": {}, "log10_opt_lr": {}}
    for s, curve in seeds.items():
        lr_opt, loss = best(curve)
        per_seed["max_stable_lr"][s] = max_stable_lr(curve)
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

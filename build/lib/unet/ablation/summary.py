"""
The ablation's descriptive summary: ``results.json`` in, numbers and plain-words conclusions out,
for the report (``unet.ablation.report``) to render; the tests themselves are ``inference``'s.
Every interval is a 95% t-interval over seeds; a difference between two arms is paired by seed
(same data, t and noise) and is called "indistinguishable" when its interval covers 0. Pure
functions of plain records; nothing here trains, plots or imports torch.

The learning-rate frontier (each definition also printed in the report):
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

import numpy as np

from unet.utils.stats import column_band, finite, fisher_p, paired_differences, running_mean, t_interval

from .grid import cell_label
from .inference import ALPHA, holm, paired_test, seed_paired_verdict  # noqa: F401 (the report and tests read them here too)


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
    failed: bool
    final_loss: float = None
    initial_loss: float = None
    early: dict = field(default_factory=dict)
    zero_loss: float = None


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
    ok = [r.lr for r in curve if not r.failed and _ok(r.final_loss)]
    return max(ok) if ok else None


def max_trainable_lr(curve):
    """The largest lr of one seed's sweep whose run finished below its initial loss: a run that
    does not diverge by the rule may still end worse than it started (None if none did better)."""
    ok = [r.lr for r in curve if not r.failed and _ok(r.final_loss) and _ok(r.initial_loss)
          and r.final_loss < r.initial_loss]
    return max(ok) if ok else None


def lr_sensitivity(curve, cap=None):
    """Wortsman et al.'s sensitivity of one seed's sweep: mean over lrs of min(final, cap)
    minus the best final loss, a failed run counting as the cap; None when no run finished.
    ``cap`` is one value for every arm (the zero predictor's loss); without it each run's own
    initial loss caps it, as Wortsman et al. do, which credits an arm whose loss starts higher."""
    initial = [r.initial_loss for r in curve if _ok(r.initial_loss)]
    finals = [r.final_loss for r in curve if not r.failed and _ok(r.final_loss)]
    if (cap is None and not initial) or not finals:
        return None
    l0 = cap if cap is not None else min(initial)  # a seed's lrs share weights and batch: equal up to rounding
    capped = [min(r.final_loss, l0) if (not r.failed and _ok(r.final_loss)) else l0 for r in curve]
    return sum(capped) / len(capped) - min(finals)


def best(curve):
    """(optimal lr, best final loss) of one seed's sweep, or (None, None)."""
    ok = [r for r in curve if not r.failed and _ok(r.final_loss)]
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
        half-width), ``max_trainable_lr`` (every seed ended below its initial loss), ``opt_lr``
        (lowest mean final loss over the lrs every seed finished), ``diverged`` {lr: (k, n)}, ``initial_loss`` (median).
    """
    per_seed = {"max_stable_lr": {}, "max_trainable_lr": {}, "sensitivity": {}, "sensitivity_own_cap": {},
                "best_loss": {}, "log10_opt_lr": {}}
    for s, curve in seeds.items():
        lr_opt, loss = best(curve)
        per_seed["max_stable_lr"][s] = max_stable_lr(curve)
        per_seed["max_trainable_lr"][s] = max_trainable_lr(curve)
        per_seed["sensitivity"][s] = lr_sensitivity(curve, curve[0].zero_loss)
        per_seed["sensitivity_own_cap"][s] = lr_sensitivity(curve)
        per_seed["best_loss"][s] = loss
        per_seed["log10_opt_lr"][s] = None if lr_opt is None else math.log10(lr_opt)
    by_lr = {}
    for curve in seeds.values():
        for r in curve:
            by_lr.setdefault(r.lr, []).append(r)
    stable = [lr for lr, rs in by_lr.items() if all(not r.failed and _ok(r.final_loss) for r in rs)]
    mean_loss = {lr: sum(r.final_loss for r in by_lr[lr]) / len(by_lr[lr]) for lr in stable}
    out = {"per_seed": per_seed, "max_stable_lr": max(stable) if stable else None,
           "opt_lr": min(mean_loss, key=mean_loss.get) if mean_loss else None,
           "failed": {lr: (sum(r.failed for r in rs), len(rs)) for lr, rs in sorted(by_lr.items())},
           "n_seeds": len(seeds)}
    for k in ("sensitivity", "sensitivity_own_cap", "best_loss", "log10_opt_lr"):
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
        # L_simple throughout: the held-out one at the end, the first step's training one as the
        # run's own start, and the zero predictor's as the cap every arm shares.
        first_mse = (r.get("curves", {}).get("mse") or [None])[0]
        out.append(SweepRun(tuple((k, _hashable(v)) for k, v in r["cell"].items() if k != "lr"), r["arm"], r["seed"],
                            float(lr), bool(m["failed"]), m.get("final_eval_mse"), first_mse, early,
                            r.get("zero_predictor_loss")))
    return out


def loss_by_lr(seeds):
    """{lr: {"mean", "ci", "n" finished, "diverged", "runs"}} of one arm's final held-out losses."""
    by_lr = {}
    for curve in seeds.values():
        for r in curve:
            by_lr.setdefault(r.lr, []).append(r)
    out = {}
    for lr, rs in sorted(by_lr.items()):
        mean, half = t_interval(finite(r.final_loss for r in rs if not r.failed))
        out[lr] = {"mean": mean, "ci": half, "n": sum(not r.failed and _ok(r.final_loss) for r in rs),
                   "failed": sum(r.failed for r in rs), "runs": len(rs)}
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
            t["verdict"] = seed_paired_verdict(t, t["p_holm"])
    return {"panels": panels, "tests": len(tests), "alpha": ALPHA}


# (key, label, which direction is better: "lower", or None where neither is better, only higher or lower)
MEASURES = [
    ("final_eval_loss", "final held-out loss", "lower"),
    ("final_eval_mse", "final held-out MSE", "lower"),
    ("steps_to_threshold", "steps to threshold", "lower"),
    ("initial_loss", "initial loss", None),
    ("max_grad_norm", "max grad norm", None),
    ("median_grad_norm", "median grad norm", None),
    ("spike_count", "loss spikes", "lower"),
]
TOO_FEW = "too few runs to compare"


def mean_ci(values):
    """Mean, 95% t half-width and count of the finite ``values`` (None and NaN dropped)."""
    v = finite(values)
    return (*t_interval(v), len(v))


def ci_words(mean, half, n, better, name="A"):
    """Plain words for a difference ``name`` - other with CI mean +- half over n pairs."""
    if n < 2 or not math.isfinite(half):
        return TOO_FEW
    if mean - half <= 0 <= mean + half:
        return "indistinguishable"
    if better == "lower":
        return f"{name} better" if mean < 0 else f"{name} worse"
    return f"{name} lower" if mean < 0 else f"{name} higher"


def steps_to_threshold(losses, threshold, window=10):
    """The first step (1-based) at which the mean of the last ``window`` training losses is at
    or below ``threshold``; None if never (a full window is needed, so one lucky batch is not enough)."""
    smooth = running_mean(losses, window)
    for i in range(window - 1, len(smooth)):
        if smooth[i] <= threshold:
            return i + 1
    return None


# --------------------------------------------------------------------------- curves


def _smoothed_rows(curves, window, length):
    rows = np.full((len(curves), length), np.nan)
    for i, c in enumerate(curves):
        rows[i, :min(len(c), length)] = running_mean(c, window)[:length]
    return rows


def curve_band(curves, window=1, length=None, log=False):
    """
    Per step: the mean over runs of their ``window``-smoothed curves and its 95% t-band (runs
    that stopped early drop out). With ``log`` the mean and band are taken of log values
    (a geometric mean), so a band around a positive curve stays positive on a log axis.

    :return: (mean, low, high) arrays.
    """
    length = length or max((len(c) for c in curves), default=0)
    rows = _smoothed_rows(curves, window, length)
    if not log:
        return column_band(rows)
    with np.errstate(divide="ignore", invalid="ignore"):
        rows = np.where(rows > 0, np.log(np.where(rows > 0, rows, 1.0)), np.nan)
    return tuple(np.exp(x) for x in column_band(rows))


def paired_curve_difference(curves_a, curves_b, window=1):
    """Per step: mean and 95% t-band of the seed-paired difference of two arms' smoothed curves
    (``curves_a`` and ``curves_b`` map seed -> curve). :return: (mean, low, high) arrays."""
    seeds = [s for s in curves_a if s in curves_b]
    length = max((min(len(curves_a[s]), len(curves_b[s])) for s in seeds), default=0)
    a = _smoothed_rows([curves_a[s] for s in seeds], window, length)
    b = _smoothed_rows([curves_b[s] for s in seeds], window, length)
    return column_band(a - b)


# --------------------------------------------------------------------------- grouping


def cell_ids(runs):
    """The cells' ids in the order their first run appears."""
    return list(dict.fromkeys(r["cell_id"] for r in runs))


def arm_names(runs):
    """The arms (init schemes) in the order their first run appears."""
    return list(dict.fromkeys(r["arm"] for r in runs))


def comparisons(results):
    """The (A, B) pairs of arms the ablation compares."""
    return results["ablation"].get("comparisons", [["zero", "standard"]])


def finished_by_seed(runs, arm):
    """{seed: run} of ``arm``'s runs that did not diverge."""
    return {r["seed"]: r for r in runs if r["arm"] == arm and not r["measures"]["failed"]}


# --------------------------------------------------------------------------- summary


def arm_summary(runs):
    """One arm's runs: their count, how many diverged (and at which step), and each measure's
    mean +- CI over the finished runs (a run stopped at step 1 has no comparable measures)."""
    out = {"n": len(runs), "failed": sum(bool(r["measures"]["failed"]) for r in runs),
           "failed_at": [r["steps"] for r in runs if r["measures"]["failed"]]}
    for key, _, _ in MEASURES:
        m, h, n = mean_ci([r["measures"].get(key) for r in runs if not r["measures"]["failed"]])
        out[key] = {"mean": m, "ci": h, "n": n}
    return out


def compare_arms(runs, arms, a, b):
    """Seed-paired differences A - B of every measure with CI and verdict, and the divergence
    counts of both arms with Fisher's exact p-value."""
    da, db = arms[a], arms[b]
    comp = {"a": a, "b": b, "failed": {"a": da["failed"], "n_a": da["n"], "b": db["failed"], "n_b": db["n"],
                                       "p": fisher_p(da["failed"], da["n"], db["failed"], db["n"])}}
    by_seed = {arm: finished_by_seed(runs, arm) for arm in (a, b)}
    for key, _, better in MEASURES:
        m, h, n = mean_ci(paired_differences(*[{s: r["measures"].get(key) for s, r in by_seed[arm].items()}
                                                for arm in (a, b)]))
        comp[key] = {"mean": m, "ci": h, "n": n, "verdict": ci_words(m, h, n, better, a)}
    return comp


def summarize(results):
    """Per cell: every arm's mean +- CI of each measure and its divergence count, and each
    comparison's seed-paired difference with CI and verdict; then the conclusions."""
    cells = []
    for cid in cell_ids(results["runs"]):
        runs = [r for r in results["runs"] if r["cell_id"] == cid]
        arms = {arm: arm_summary([r for r in runs if r["arm"] == arm]) for arm in arm_names(runs)}
        comps = [compare_arms(runs, arms, a, b) for a, b in comparisons(results) if a in arms and b in arms]
        cells.append({"cell_id": cid, "cell": runs[0]["cell"], "label": cell_label(runs[0]["cell"]), "arms": arms,
                      "comparisons": comps})
    early = results["ablation"].get("early_steps", [10, 50, 100])
    frontier = frontier_summary(sweep_runs(results), [tuple(c) for c in comparisons(results)], early)
    return {"cells": cells, "frontier": frontier, "descriptive": frontier_conclusions(frontier)}


# --------------------------------------------------------------------------- words


def fmt_num(x, digits=3):
    """A number in 3 significant digits (scientific when very large or small); '–' for none."""
    if x is None or not math.isfinite(x):
        return "–"
    if x != 0 and (abs(x) >= 1e4 or abs(x) < 1e-3):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def fmt_mean_ci(d):
    """'mean ± half (n=N)' of a measure's summary."""
    if d["n"] == 0:
        return "–"
    ci = f" ± {fmt_num(d['ci'], 2)}" if d["n"] >= 2 else ""
    return f"{fmt_num(d['mean'])}{ci} (n={d['n']})"


def fmt_diff(d):
    """'mean [low, high] (n=N)' of a paired difference."""
    if d["n"] < 2:
        return f"{fmt_num(d['mean'])} (n={d['n']})" if d["n"] else "–"
    return f"{fmt_num(d['mean'])} [{fmt_num(d['mean'] - d['ci'])}, {fmt_num(d['mean'] + d['ci'])}] (n={d['n']})"


def measure_name(key, label, threshold):
    """A measure's name in the report; steps to threshold names its threshold."""
    return f"steps to loss {threshold:g}" if key == "steps_to_threshold" else label


def fmt_lr(lr):
    """A learning rate as swept ('0.003', '1e-04'); '–' for none (no stable lr)."""
    return "–" if lr is None else f"{lr:g}"


def effect_value(t):
    """One test's A - B with its 95% interval; for a log10 lr the ratio ('x3.16 [x1.5, x6.6]')."""
    mean, half = t["mean"], t["half"]
    if t["measure"].startswith("log10_"):
        ci = f" [x{fmt_num(10 ** (mean - half))}, x{fmt_num(10 ** (mean + half))}]" if math.isfinite(half) else ""
        return f"x{fmt_num(10 ** mean)}{ci}"
    return fmt_num(mean) + (f" [{fmt_num(mean - half)}, {fmt_num(mean + half)}]" if math.isfinite(half) else "")


def effect_words(t):
    """'max stable lr x3.16 [x1.5, x6.6]', 'lr sensitivity -0.12 [-0.2, -0.04]'."""
    return f"{t['label'].removeprefix('log10 ')} {effect_value(t)}"


def _where(items):
    return "; ".join(f"{label} ({', '.join(map(effect_words, ts))})" if ts else label for label, ts in items)


def pair_conclusion(fs, a, b):
    """Where A helps, hurts or makes no detectable difference against B, panel by panel, from
    the Holm-judged frontier tests (max stable lr, sensitivity, best loss, optimum's place)."""
    groups = {"helps": [], "hurts": [], "mixed": [], "moves": [], "same": [], "few": []}
    for p in fs["panels"]:
        ts = [t for t in p["tests"] if (t["a"], t["b"]) == (a, b) and not t["measure"].startswith("loss_at_")]
        if not ts:
            continue
        label, good = cell_label(p["panel"]), [t for t in ts if t["verdict"] == f"{a} better"]
        bad, moved = (
            [t for t in ts if t["verdict"] == f"{a} worse"],
            [t for t in ts if t["verdict"].endswith(("higher", "lower"))],
        )
        if all(t["n"] < 2 for t in ts):
            groups["few"].append((label, []))
        else:
            kind = "mixed" if good and bad else "helps" if good else "hurts" if bad else "moves" if moved else "same"
            groups[kind].append((label, good + bad + moved))
    words = []
    for kind, text in (("helps", f"{a} init helps in"), ("hurts", f"{a} init hurts in"),
                       ("mixed", "it helps on some measures and hurts on others in"),
                       ("moves", "it moves the optimal learning rate, and nothing else detectably, in"),
                       ("same", "no detectable difference in"), ("few", "too few finished runs of both to compare in")):
        if groups[kind]:
            words.append(f"{text} {_where(groups[kind])}")
    return f"**{a} vs {b}**: " + "; ".join(words) + "."


def early_conclusion(fs, a, b):
    """Per early step: in how many panels A's training loss was higher, lower or not
    detectably different from B's (same batch, t and noise; at B's optimal lr)."""
    parts = []
    for step in dict.fromkeys(
        t["measure"] for p in fs["panels"] for t in p["tests"] if t["measure"].startswith("loss_at_")
    ):
        ts = [
            t
            for p in fs["panels"]
            for t in p["tests"]
            if (t["a"], t["b"], t["measure"]) == (a, b, step) and t["n"] >= 2
        ]
        if ts:
            worse, better = (
                sum(t["verdict"].endswith("worse") for t in ts),
                sum(t["verdict"].endswith("better") for t in ts),
            )
            parts.append(f"step {step[len('loss_at_'):]}: {a} higher in {worse}, lower in {better}, "
                         f"no detectable difference in {len(ts) - worse - better} of {len(ts)} panels")
    return f"Early training ({a} − {b} training loss at {b}'s optimal lr): " + "; ".join(parts) + "." if parts else ""


def direction_words(fs, a, b):
    """Per compared measure, in how many panels the point estimate favours A and B (or, where
    neither is better, is higher / lower), whatever the tests say: consistency across panels."""
    parts, order = [], []
    for p in fs["panels"]:
        for t in p["tests"]:
            if (t["a"], t["b"]) == (a, b) and t["n"] >= 2 and t["label"] not in order:
                order.append(t["label"])
    for label in order:
        ts = [
            t for p in fs["panels"] for t in p["tests"] if (t["a"], t["b"], t["label"]) == (a, b, label) and t["n"] >= 2
        ]
        sign = {"higher": 1, "lower": -1, None: 1}[ts[0]["better"]]
        up, down = sum(sign * t["mean"] > 0 for t in ts), sum(sign * t["mean"] < 0 for t in ts)
        kind = ("higher", "lower") if ts[0]["better"] is None else ("favours " + a, "favours " + b)
        parts.append(f"{label.removeprefix('log10 ')}: {kind[0]} in {up}, {kind[1]} in {down} of {len(ts)}")
    return (f"Direction of the point estimates across panels ({a} − {b}, significant or not): " + "; ".join(parts) + "."
            if parts else "")


def suggestive_words(fs, a, b):
    """The tests of A against B with p < alpha before the correction but not after: named as
    suggestive only, so a reader can check whether a second run repeats them."""
    ts = [(cell_label(p["panel"]), t) for p in fs["panels"] for t in p["tests"]
          if (t["a"], t["b"]) == (a, b) and t["n"] >= 2 and t["p"] < fs["alpha"] <= t["p_holm"]]
    if not ts:
        return ""
    return (f"Below p = {fs['alpha']:g} before the correction only (suggestive, not claimed): "
            + "; ".join(f"{label}: {effect_words(t)} (p = {fmt_num(t['p'], 2)})" for label, t in ts) + ".")


def frontier_conclusions(fs):
    """The conclusions, generated from the frontier: per compared pair where A helps, hurts or
    does not matter; the early-training deficit; each panel's max stable lrs; the correction."""
    pairs = list(dict.fromkeys((t["a"], t["b"]) for p in fs["panels"] for t in p["tests"]))
    lines = []
    for a, b in pairs:
        lines.append(pair_conclusion(fs, a, b))
        lines += [w for w in (early_conclusion(fs, a, b), direction_words(fs, a, b), suggestive_words(fs, a, b)) if w]
        stable = [f"{cell_label(p['panel'])}: " + ", ".join(f"{arm} {fmt_lr(p['arms'][arm]['max_stable_lr'])}"
                                                             for arm in (a, b))
                  for p in fs["panels"] if a in p["arms"] and b in p["arms"]]
        lines.append(f"Largest learning rate at which every seed finished ({a}, {b}): " + "; ".join(stable) + ".")
    lines.append(f"A difference is called only where its seed-paired t-test survives Holm's correction over all "
                 f"{fs['tests']} tests in this report (family-wise error {fs['alpha']:g}); 'no detectable difference' "
                 "is not evidence of equality, only that these seeds cannot resolve one.")
    return lines


# --------------------------------------------------------------------------- rules


def smoothing_window(results):
    """The running-mean window of the curves and of steps to threshold (the grid's ``smooth``)."""
    return results["ablation"].get("smooth", 10)


def divergence_rule(results):
    """(factors, windows): the distinct ``divergence_factor`` and ``divergence_window`` values of
    the runs' configs, as the report states the rule. Results written before the window was a
    config key used the ablation's ``smooth`` window."""
    smooth = smoothing_window(results)
    factors = sorted({r["config"].get("divergence_factor", 10.0) for r in results["runs"]})
    windows = sorted({r["config"].get("divergence_window", smooth) for r in results["runs"]})
    return factors, windows


def spike_rule(results):
    """{"factor", "window"} of the loss-spike rule the runs were measured with (recorded by the
    runner from ``diagnostics.SpikeDetector``), or None for results written before it was."""
    return results.get("rules", {}).get("spikes")

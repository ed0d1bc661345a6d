"""
The ablation's statistics, plots and report: ``results.json`` in; ``report.md``, PNGs and a
summary out. Every interval is a 95% t-interval over seeds; a difference between two arms is
paired by seed (same data, t and noise), and is called "indistinguishable" when its interval
covers 0. Nothing here trains or imports torch.
"""

import math
import os
import statistics

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

LEVEL = 0.95
# (key, label, which direction is better: "lower", or None where neither is better, only higher or lower)
MEASURES = [
    ("final_eval_loss", "final held-out loss", "lower"),
    ("final_eval_mse", "final held-out MSE", "lower"),
    ("steps_to_threshold", "steps to threshold", "lower"),
    ("initial_loss", "initial loss", None),
    ("max_grad_norm", "max grad norm", None),
    ("median_grad_norm", "median grad norm", None),
    ("max_update_ratio", "max update/weight ratio", None),
    ("median_update_ratio", "median update/weight ratio", None),
    ("spike_count", "loss spikes", "lower"),
]
MODEL_KEYS = {"channels", "model_channels", "num_res_blocks", "attention_resolutions", "dropout", "channel_mult",
              "class_cond", "num_classes", "num_heads", "num_heads_upsample", "use_scale_shift_norm", "norm",
              "image_size", "learn_sigma"}
ARM_COLORS = {"zero": "C0", "standard": "C1", "kaiming": "C2", "fixup": "C3", "all-zero": "C4"}


def finite(values):
    """The finite numbers among ``values`` (None, NaN and inf dropped), as floats."""
    return [float(v) for v in values if v is not None and not isinstance(v, bool) and math.isfinite(v)]


def t_interval(values, level=LEVEL):
    """
    Mean and half-width of the t confidence interval, mean +- t_{(1+level)/2, n-1} s / sqrt(n)
    (s the sample standard deviation), over the finite values.

    :return: (mean, half_width, n); half_width is NaN for n < 2, both NaN for n = 0.
    """
    v = finite(values)
    if not v:
        return float("nan"), float("nan"), 0
    if len(v) < 2:
        return v[0], float("nan"), 1
    half = stats.t.ppf((1 + level) / 2, len(v) - 1) * statistics.stdev(v) / math.sqrt(len(v))
    return statistics.fmean(v), float(half), len(v)


def paired_differences(a, b):
    """a[seed] - b[seed] for the seeds where both are finite (the same data, t and noise)."""
    return [a[s] - b[s] for s in sorted(a) if s in b and finite([a[s], b[s]]) and len(finite([a[s], b[s]])) == 2]


def verdict(mean, half, n, better, name="A"):
    """Plain words for a difference ``name`` - other with CI mean +- half over n pairs."""
    if n < 2 or not math.isfinite(half):
        return "too few runs to compare"
    if mean - half <= 0 <= mean + half:
        return "indistinguishable"
    if better == "lower":
        return f"{name} better" if mean < 0 else f"{name} worse"
    return f"{name} lower" if mean < 0 else f"{name} higher"


def running_mean(values, window):
    """Trailing mean over the last ``window`` values (fewer at the start), NaNs ignored."""
    x = np.asarray([np.nan if v is None else v for v in values], dtype=float)
    out = np.full(len(x), np.nan)
    for i in range(len(x)):
        w = x[max(0, i - window + 1): i + 1]
        w = w[np.isfinite(w)]
        if len(w):
            out[i] = w.mean()
    return out


def steps_to_threshold(losses, threshold, window=10):
    """The first step (1-based) at which the mean of the last ``window`` training losses is at
    or below ``threshold``; None if never (a full window is needed, so one lucky batch is not enough)."""
    smooth = running_mean(losses, window)
    for i in range(window - 1, len(smooth)):
        if smooth[i] <= threshold:
            return i + 1
    return None


def _smoothed_rows(curves, window, length):
    rows = np.full((len(curves), length), np.nan)
    for i, c in enumerate(curves):
        rows[i, :min(len(c), length)] = running_mean(c, window)[:length]
    return rows


def _band(rows):
    mean, low, high = (np.full(rows.shape[1], np.nan) for _ in range(3))
    for j in range(rows.shape[1]):
        m, h, n = t_interval(rows[:, j])
        mean[j] = m
        if n >= 2:
            low[j], high[j] = m - h, m + h
    return mean, low, high


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
        return _band(rows)
    with np.errstate(divide="ignore", invalid="ignore"):
        rows = np.where(rows > 0, np.log(np.where(rows > 0, rows, 1.0)), np.nan)
    return tuple(np.exp(x) for x in _band(rows))


def paired_curve_difference(curves_a, curves_b, window=1):
    """Per step: mean and 95% t-band of the seed-paired difference of two arms' smoothed curves
    (``curves_a`` and ``curves_b`` map seed -> curve). :return: (mean, low, high) arrays."""
    seeds = [s for s in curves_a if s in curves_b]
    length = max((min(len(curves_a[s]), len(curves_b[s])) for s in seeds), default=0)
    a = _smoothed_rows([curves_a[s] for s in seeds], window, length)
    b = _smoothed_rows([curves_b[s] for s in seeds], window, length)
    return _band(a - b)


def fisher_p(k_a, n_a, k_b, n_b):
    """Two-sided Fisher exact p-value for k_a/n_a against k_b/n_b diverged runs."""
    return float(stats.fisher_exact([[k_a, n_a - k_a], [k_b, n_b - k_b]])[1])


# --------------------------------------------------------------------------- summary


def _cells(runs):
    order = []
    for r in runs:
        if r["cell_id"] not in order:
            order.append(r["cell_id"])
    return order


def _arms(runs):
    return list(dict.fromkeys(r["arm"] for r in runs))


def _label(cell):
    return ", ".join(f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in cell.items()) or "base"


def summarize(results):
    """Per cell: every arm's mean +- CI of each measure and its divergence count, and each
    comparison's seed-paired difference with CI and verdict."""
    comparisons = results["ablation"].get("comparisons", [["zero", "standard"]])
    cells = []
    for cid in _cells(results["runs"]):
        runs = [r for r in results["runs"] if r["cell_id"] == cid]
        arms = {}
        for arm in _arms(runs):
            rs = [r for r in runs if r["arm"] == arm]
            arms[arm] = {"n": len(rs), "diverged": sum(bool(r["measures"]["diverged"]) for r in rs),
                         "diverged_at": [r["steps"] for r in rs if r["measures"]["diverged"]]}
            for key, _, _ in MEASURES:  # over finished runs: a run stopped at step 1 has no comparable measures
                m, h, n = t_interval([r["measures"].get(key) for r in rs if not r["measures"]["diverged"]])
                arms[arm][key] = {"mean": m, "ci": h, "n": n}
        comps = []
        for a, b in comparisons:
            if a not in arms or b not in arms:
                continue
            by = {arm: {r["seed"]: r["measures"] for r in runs if r["arm"] == arm and not r["measures"]["diverged"]}
                  for arm in (a, b)}
            da, db = arms[a], arms[b]
            comp = {"a": a, "b": b, "diverged": {"a": da["diverged"], "n_a": da["n"], "b": db["diverged"], "n_b": db["n"],
                                                 "p": fisher_p(da["diverged"], da["n"], db["diverged"], db["n"])}}
            for key, _, better in MEASURES:
                diffs = paired_differences({s: m.get(key) for s, m in by[a].items()},
                                           {s: m.get(key) for s, m in by[b].items()})
                m, h, n = t_interval(diffs)
                comp[key] = {"mean": m, "ci": h, "n": n, "verdict": verdict(m, h, n, better, a)}
            comps.append(comp)
        cells.append({"cell_id": cid, "cell": runs[0]["cell"], "label": _label(runs[0]["cell"]), "arms": arms,
                      "comparisons": comps})
    summary = {"cells": cells}
    summary["conclusions"] = conclusions(summary, results)
    return summary


def _num(x, digits=3):
    if x is None or not math.isfinite(x):
        return "–"
    if x != 0 and (abs(x) >= 1e4 or abs(x) < 1e-3):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def _mean_ci(d):
    if d["n"] == 0:
        return "–"
    ci = f" ± {_num(d['ci'], 2)}" if d["n"] >= 2 else ""
    return f"{_num(d['mean'])}{ci} (n={d['n']})"


def _diff(d):
    if d["n"] < 2:
        return f"{_num(d['mean'])} (n={d['n']})" if d["n"] else "–"
    return f"{_num(d['mean'])} [{_num(d['mean'] - d['ci'])}, {_num(d['mean'] + d['ci'])}] (n={d['n']})"


def conclusions(summary, results):
    """Plain-words findings, each one only as strong as its confidence interval."""
    threshold = results["ablation"].get("threshold")
    seeds = len(results["ablation"].get("seeds", []))
    lines, tally = [], {}
    for cell in summary["cells"]:
        for c in cell["comparisons"]:
            a, b = c["a"], c["b"]
            parts = []
            for key, label, _ in MEASURES:
                d = c[key]
                always = key in ("final_eval_loss", "steps_to_threshold")
                if always or d["verdict"] not in ("indistinguishable", "too few runs to compare"):
                    name = f"steps to loss {threshold:g}" if key == "steps_to_threshold" else label
                    parts.append(f"{name}: {d['verdict']} ({a} − {b} = {_diff(d)})")
            dv = c["diverged"]
            if dv["a"] or dv["b"]:
                note = "" if dv["p"] < 0.05 else f"; with {dv['n_a']} and {dv['n_b']} runs this count alone is not significant at the 5% level"
                parts.append(f"diverged: {a} {dv['a']}/{dv['n_a']}, {b} {dv['b']}/{dv['n_b']} "
                             f"(Fisher exact p = {dv['p']:.2g}{note})")
            lines.append(f"**{cell['label']}**, {a} vs {b}: " + "; ".join(parts) + ".")
            v = c["final_eval_loss"]["verdict"]
            t = tally.setdefault((a, b), {"better": 0, "worse": 0, "indistinguishable": 0, "too few": 0, "cells": 0})
            t["cells"] += 1
            t["better" if v.endswith("better") else "worse" if v.endswith("worse") else
              "indistinguishable" if v == "indistinguishable" else "too few"] += 1
    overall = []
    for (a, b), t in tally.items():
        if t["too few"] == t["cells"]:
            overall.append(f"In the {t['cells']} cell(s) that have both {a} and {b}, too few runs of both finished "
                           f"to compare their final losses (see the divergence counts).")
            continue
        s = (f"Over the {t['cells']} cell(s) that have both {a} and {b}, {a} reached a lower final held-out loss "
             f"than {b} in {t['better']}, a higher one in {t['worse']}, and the two were indistinguishable "
             f"(95% CI of the seed-paired difference covers 0) in {t['indistinguishable']}")
        s += f"; {t['too few']} had too few finished runs to compare." if t["too few"] else "."
        overall.append(s)
    overall.append(f"Each interval is over {seeds} seed(s) and is not corrected for the number of cells and measures "
                   f"compared, so an isolated difference among many comparisons may be chance.")
    return overall + lines


# --------------------------------------------------------------------------- plots


def _subplots(n, width=4.2, height=3.2):
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat[:n])


def plot_curves(results, key, path, ylabel, window=1, log=True):
    """One panel per cell: each arm's mean curve over seeds with its 95% band."""
    runs = results["runs"]
    cells = _cells(runs)
    fig, axes = _subplots(len(cells))
    for ax, cid in zip(axes, cells):
        rs = [r for r in runs if r["cell_id"] == cid]
        for arm in _arms(rs):
            curves = [r["curves"][key] for r in rs if r["arm"] == arm]
            mean, low, high = curve_band(curves, window, log=log)
            steps = np.arange(1, len(mean) + 1)
            k = sum(bool(r["measures"]["diverged"]) for r in rs if r["arm"] == arm)
            label = f"{arm} ({k}/{len(curves)} diverged)" if k else arm
            color = ARM_COLORS.get(arm)
            if np.isfinite(mean).any():
                ax.plot(steps, mean, color=color, label=label, lw=1.2)
                ax.fill_between(steps, low, high, color=color, alpha=0.25, lw=0)
            else:
                ax.plot([], [], color=color, label=label + ", no finite value")
        ax.set_title(_label(rs[0]["cell"]), fontsize=8)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_paired_difference(results, path, key="loss", window=1):
    """One panel per cell: for each comparison A vs B, the seed-paired difference A - B of the
    smoothed training curves with its 95% band; below the zero line A is lower."""
    runs = results["runs"]
    comparisons = results["ablation"].get("comparisons", [["zero", "standard"]])
    cells = [c for c in _cells(runs) if any({a, b} <= set(_arms([r for r in runs if r["cell_id"] == c]))
                                            for a, b in comparisons)]
    fig, axes = _subplots(max(1, len(cells)))
    for ax, cid in zip(axes, cells):
        rs = [r for r in runs if r["cell_id"] == cid]
        for i, (a, b) in enumerate(comparisons):
            ca = {r["seed"]: r["curves"][key] for r in rs if r["arm"] == a and not r["measures"]["diverged"]}
            cb = {r["seed"]: r["curves"][key] for r in rs if r["arm"] == b and not r["measures"]["diverged"]}
            mean, low, high = paired_curve_difference(ca, cb, window)
            if not len(mean) or not np.isfinite(mean).any():
                continue
            steps = np.arange(1, len(mean) + 1)
            ax.plot(steps, mean, color=f"C{i}", lw=1.2, label=f"{a} − {b} ({len(set(ca) & set(cb))} seeds)")
            ax.fill_between(steps, low, high, color=f"C{i}", alpha=0.25, lw=0)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_title(_label(rs[0]["cell"]), fontsize=8)
        ax.set_xlabel("step")
        ax.set_ylabel(f"difference in training {key} ({window}-step mean)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_activation_rms(results, path):
    """Per model shape (cells that differ only in, e.g., lr share one): each ResBlock's output
    RMS at init, first block to last, per init scheme (mean over seeds)."""
    groups = {}
    for r in results["runs"]:
        groups.setdefault(r["model_key"], []).append(r)
    fig, axes = _subplots(len(groups))
    for ax, rs in zip(axes, groups.values()):
        for arm in _arms(rs):
            rows = [[v for _, v in r["init"]["activation_rms"]] for r in rs if r["arm"] == arm]
            rows = [[np.nan if v is None else v for v in row] for row in rows if row]
            if not rows:
                continue
            mean = np.nanmean(np.asarray(rows, dtype=float), axis=0) if np.isfinite(rows).any() else np.full(len(rows[0]), np.nan)
            ax.plot(np.arange(len(mean)), mean, marker="o", ms=3, color=ARM_COLORS.get(arm),
                    label=arm if np.isfinite(mean).all() else f"{arm} (non-finite beyond the plot)")
        cell = {k: v for k, v in rs[0]["cell"].items() if k in MODEL_KEYS}
        ax.set_title(_label(cell), fontsize=8)
        ax.set_xlabel("ResBlock (forward order: encoder, middle, decoder)")
        ax.set_ylabel("output RMS at init")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_symmetry(symmetry, path):
    """Left: how distinct each zeroed layer's output channels are after each step (0 = all
    identical); right: the fraction of parameter tensors that have left their initial value."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for s in symmetry:
        color = ARM_COLORS.get(s["arm"])
        vals = np.asarray(list(s["layers"].values()), dtype=float)
        for row in vals:
            ax1.plot(s["steps"], row, color=color, alpha=0.25, lw=0.7)
        ax1.plot(s["steps"], vals.mean(0), color=color, lw=2, label=f"{s['arm']} (mean of {len(vals)} zeroed layers)")
        ax2.plot(s["steps"], s["moved_fraction"], color=color, marker="o", ms=3, label=s["arm"])
    ax1.set_xlabel("optimizer steps taken")
    ax1.set_ylabel("output-channel distinctness")
    ax1.set_title("zeroed layers: mean pairwise distance of weight rows / row norm", fontsize=8)
    ax1.legend(fontsize=7)
    ax2.set_xlabel("optimizer steps taken")
    ax2.set_ylabel("fraction of parameter tensors moved")
    ax2.set_title("parameters that have left their initial value", fontsize=8)
    ax2.set_ylim(-0.03, 1.03)
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- report


def _cell_table(cell, threshold):
    arms = list(cell["arms"])
    comps = cell["comparisons"]
    head = ["measure", *arms, *[f"{c['a']} − {c['b']} [95% CI]" for c in comps], *["verdict" for _ in comps]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label, _ in MEASURES:
        name = f"steps to loss {threshold:g}" if key == "steps_to_threshold" else label
        row = [name, *[_mean_ci(cell["arms"][a][key]) for a in arms], *[_diff(c[key]) for c in comps],
               *[c[key]["verdict"] for c in comps]]
        lines.append("| " + " | ".join(row) + " |")
    row = ["diverged", *[f"{cell['arms'][a]['diverged']}/{cell['arms'][a]['n']}" for a in arms],
           *[f"Fisher p = {c['diverged']['p']:.2g}" for c in comps], *["" for _ in comps]]
    lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main_table(summary):
    """One line per cell and comparison: final held-out loss of each arm, their seed-paired
    difference with its 95% CI and the verdict, and the divergence counts."""
    lines = ["| cell | A vs B | held-out loss A | held-out loss B | A − B [95% CI] | verdict | diverged A | diverged B |",
             "|---|---|---|---|---|---|---|---|"]
    for cell in summary["cells"]:
        for c in cell["comparisons"]:
            a, b = cell["arms"][c["a"]], cell["arms"][c["b"]]
            lines.append(f"| {cell['label']} | {c['a']} vs {c['b']} | {_mean_ci(a['final_eval_loss'])} | "
                         f"{_mean_ci(b['final_eval_loss'])} | {_diff(c['final_eval_loss'])} | "
                         f"{c['final_eval_loss']['verdict']} | {a['diverged']}/{a['n']} | {b['diverged']}/{b['n']} |")
    return "\n".join(lines)


def divergence_table(summary):
    """Diverged runs per cell and arm, with the steps at which they stopped."""
    arms = list(dict.fromkeys(a for cell in summary["cells"] for a in cell["arms"]))
    lines = ["| cell | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    for cell in summary["cells"]:
        row = []
        for a in arms:
            d = cell["arms"].get(a)
            at = f" (at step {', '.join(map(str, d['diverged_at']))})" if d and d["diverged"] else ""
            row.append(f"{d['diverged']}/{d['n']}{at}" if d else "")
        lines.append(f"| {cell['label']} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def _symmetry_section(symmetry):
    if not symmetry:
        return ["The symmetry runs were switched off (`symmetry: {steps: 0}`)."]
    last = len(symmetry[0]["steps"]) - 1
    out = ["| init | zeroed layers | with distinct output channels: at init | after 1 step | after 2 steps | "
           f"after {last} steps | fraction of parameter tensors moved after 1 / 2 / 3 steps |",
           "|---|---|---|---|---|---|---|"]
    for s in symmetry:
        layers = list(s["layers"].values())

        def count(step):
            return sum(1 for v in layers if step < len(v) and v[step] is not None and v[step] > 0)

        moved = " / ".join(f"{m:.2f}" for m in s["moved_fraction"][1:4])
        out.append(f"| {s['arm']} | {len(layers)} | {count(0)} | {count(1)} | {count(2)} | "
                   f"{count(len(s['steps']) - 1)} | {moved} |")
    return out


def write_report(results, out_dir):
    """
    Write ``report.md`` and the PNG plots into ``out_dir``.

    :param results: the dict of ``results.json`` (runs, symmetry, ablation).
    :return: {"plots": [paths], "summary": the summary dict}.
    """
    ab = results["ablation"]
    window = ab.get("smooth", 10)
    summary = summarize(results)
    plots = {
        "loss": plot_curves(results, "loss", os.path.join(out_dir, "loss_curves.png"),
                            f"training loss ({window}-step mean)", window),
        "diff": plot_paired_difference(results, os.path.join(out_dir, "loss_difference.png"), "loss", window),
        "grad": plot_curves(results, "grad_norm", os.path.join(out_dir, "grad_norm.png"),
                            f"grad norm before clipping ({window}-step mean)", window),
        "update": plot_curves(results, "update_ratio", os.path.join(out_dir, "update_ratio.png"),
                              f"update / weight RMS ({window}-step mean)", window),
        "act": plot_activation_rms(results, os.path.join(out_dir, "activation_rms_init.png")),
    }
    if results.get("symmetry"):
        plots["sym"] = plot_symmetry(results["symmetry"], os.path.join(out_dir, "symmetry.png"))
    runs = results["runs"]
    seeds = ab.get("seeds", [])
    md = [f"# Zero-init ablation: {results.get('name', '')}", "",
          f"Produced by `{results.get('command', 'python -m unet.ablation')}`: {len(runs)} runs "
          f"({len(summary['cells'])} cells, seeds {', '.join(map(str, seeds))}), {results.get('run_seconds', 0) / 60:.1f} min of "
          f"training summed over runs; "
          f"wandb group `{results.get('group', '')}`. Each arm of a cell differs from the others only in `init`; "
          "for a given seed every run sees the same batches, timesteps and noise, and the held-out loss is "
          "measured on the same fixed batch, t and noise for every run.", "",
          "## Main result: final held-out loss", "", main_table(summary), "",
          "Intervals are 95% t-intervals over seeds; A − B is paired by seed. A diverged run stops there and is "
          "counted below; every other measure is over the finished runs only, so n counts those.", "",
          "Divergence (runs that stopped on a non-finite loss or gradient, or when the median of the last "
          f"{window} training losses rose above 10x the initial loss):", "",
          divergence_table(summary), "",
          "## Conclusions", "", *[f"- {line}" for line in summary["conclusions"]], "",
          "## Training loss", "", f"![loss curves]({os.path.basename(plots['loss'])})", "",
          f"Geometric mean over seeds of the {window}-step running mean of the training loss, with its 95% band "
          "(taken of log values). Seeds differ in their batches, so these bands are wide; the arms of one seed share "
          "every batch, and the seed-paired difference below removes that noise:", "",
          f"![paired loss difference]({os.path.basename(plots['diff'])})", "",
          "Mean over seeds of the difference between two arms' smoothed training losses (same seed, same batches), "
          "with its 95% band; below 0 the first arm is lower.", "",
          "## Gradient norm and update size", "", f"![grad norm]({os.path.basename(plots['grad'])})", "",
          f"![update ratio]({os.path.basename(plots['update'])})", "",
          "The update/weight ratio is the RMS of one optimizer step's change over the RMS of the weights before it.", "",
          "## Activation RMS by depth at init", "", f"![activation RMS]({os.path.basename(plots['act'])})", "",
          "The RMS of each ResBlock's output at step 0 on the fixed held-out batch (mean over seeds). Under `zero` "
          "every block is the identity at init, so the RMS is carried through unchanged by the residual branches.", "",
          "## Per-cell tables", ""]
    for cell in summary["cells"]:
        md += [f"### {cell['label']}", "", _cell_table(cell, ab.get("threshold", float("nan"))), ""]
    md += ["## Symmetry: zero against all-zero", ""]
    if "sym" in plots:
        md += [f"![symmetry]({os.path.basename(plots['sym'])})", ""]
    md += [*_symmetry_section(results.get("symmetry")), "",
           "A zeroed layer's weight gradient is (upstream gradient) x (its own input). Under `zero` the input is "
           "non-zero and differs from channel to channel, so once any gradient reaches the layer one step makes its "
           "output channels different: the output conv at the first step, the other zeroed layers at the second, "
           "and by the third every parameter has moved. Under `all-zero` every activation is 0, so every weight "
           "gradient is 0 and only the output conv's bias ever moves: the channels stay identical (distinctness 0). "
           "`standard` (random rows from the start) is shown for scale.", "",
           "## Measures", "",
           "- *initial loss*: the training loss of the first step.",
           f"- *steps to threshold*: the first step at which the mean of the last {window} training losses is at or "
           f"below {ab.get('threshold', float('nan')):g} (runs that never get there are left out; n counts the others).",
           "- *final held-out loss / MSE*: the loss after the last step on a fixed held-out batch with fixed t and "
           "noise (the same for every run).",
           "- *grad norm*: the global gradient norm before clipping, max and median over steps.",
           "- *loss spikes*: steps whose loss is above 2x the median of the previous 50 (`diagnostics.SpikeDetector`).",
           f"- *diverged*: a non-finite loss or gradient, or the median of the last {window} losses above 10x the "
           "initial loss (a median, so that one batch's spike is counted as a spike, not a divergence); the run stops "
           "there and is counted.", ""]
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(md))
    return {"plots": list(plots.values()), "summary": summary}

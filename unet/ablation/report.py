"""The learning-rate frontier in the ablation report: the lead figure (final held-out loss against
learning rate, one panel per (norm, depth), one line per init with its seed band, divergences
marked), the table of frontier measures per arm, the Holm-corrected seed-paired tests, the
early-training deficit and the measures' definitions with their sources. The numbers come from
``unet.ablation.frontier`` through ``unet.ablation.summary``; this module only draws and writes them.

The ablation's report: ``results.json`` in; ``report.md`` and PNG plots out. The numbers and
conclusions come from ``unet.ablation.summary``; this module only draws and writes them, one small
function per plot and per report section. The rules the prose states (divergence, spikes,
threshold) are read from the results, never restated here. Nothing here trains or imports torch.
"""

import math
import os

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from .grid import cell_label  # noqa: E402
from .summary import (  # noqa: E402
    MEASURES,
    arm_names,
    cell_ids,
    comparisons,
    curve_band,
    divergence_rule,
    effect_value,
    finished_by_seed,
    fmt_diff,
    fmt_lr,
    fmt_mean_ci,
    fmt_num,
    measure_name,
    paired_curve_difference,
    smoothing_window,
    spike_rule,
    summarize,
)

ARM_COLORS = {"zero": "C0", "standard": "C1", "kaiming": "C2", "fixup": "C3", "all-zero": "C4"}
ARM_MARKERS = {"zero": "o", "standard": "s", "kaiming": "^", "fixup": "D"}


def _row(cells):
    return "| " + " | ".join(cells) + " |"


def _initial_loss(panel):
    """The median initial loss over the panel's arms (each arm's runs start from their own init)."""
    values = [v for arm in panel["arms"].values() for v in [arm.get("initial_loss")] if v is not None]
    return float(np.median(values)) if values else None


def _y_range(panel, initial):
    """(low, high) of the losses drawn: every arm's mean, up to 10x the initial loss (a run that
    finished far above it, such as kaiming without norm, is drawn as a ^ at the top instead)."""
    means = [d["mean"] for m in panel["arms"].values() for d in m["by_lr"].values() if d["n"]]
    cap = 10 * initial if initial else max(means, default=1.0)
    shown = [v for v in means if v <= cap] or [cap]
    return 0.8 * min(shown), 1.25 * max(max(shown), initial or 0.0)


def draw_frontier_panel(ax, panel):
    """One (norm, depth) panel: per arm, the mean final held-out loss over the seeds that
    finished at each lr with its 95% band (filled markers: every seed finished; hollow: some
    diverged; ^: beyond the top), and an x with 'k/n' in the top band where k of n seeds diverged."""
    initial = _initial_loss(panel)
    low, high = _y_range(panel, initial)
    top = ax.get_xaxis_transform()  # x in data, y in axes fraction
    for i, (arm, m) in enumerate(panel["arms"].items()):
        color, marker = ARM_COLORS.get(arm, f"C{i + 5}"), ARM_MARKERS.get(arm, "o")
        lrs = [lr for lr, d in m["by_lr"].items() if d["n"]]
        mean = np.array([m["by_lr"][lr]["mean"] for lr in lrs], dtype=float)
        half = np.nan_to_num(np.array([m["by_lr"][lr]["ci"] for lr in lrs], dtype=float))
        shown = np.minimum(mean, high)
        ax.plot(lrs, shown, color=color, lw=1.3, label=arm)
        inside = np.where(mean <= high, 1.0, np.nan)  # no band around a mean beyond the top
        ax.fill_between(lrs, np.maximum(mean - half, low) * inside, np.minimum(mean + half, high) * inside,
                        color=color, alpha=0.2, lw=0)
        for lr, y in zip(lrs, mean):
            whole = m["by_lr"][lr]["n"] == m["by_lr"][lr]["runs"]
            ax.plot([lr], [min(y, high)], "^" if y > high else marker, color=color, ms=4,
                    mfc=color if whole else "white")
        for lr, d in m["by_lr"].items():
            if d["diverged"]:
                y = 0.95 - 0.07 * i
                ax.plot([lr], [y], "x", color=color, ms=5, mew=1.5, transform=top, clip_on=False)
                ax.text(lr, y, f" {d['diverged']}/{d['runs']}", color=color, fontsize=6, transform=top, va="center")
    if initial is not None:
        ax.axhline(initial, color="0.5", lw=0.8, ls=":", label="initial loss (median)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    # the data fill the lower 60% of the panel; the divergence marks sit above them
    ax.set_ylim(low, math.exp(math.log(low) + (math.log(high) - math.log(low)) / 0.6))
    ax.set_title(cell_label(panel["panel"]), fontsize=9)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final held-out loss")


def plot_frontier(frontier, path):
    """The report's lead figure: one panel per (norm, depth), three to a row, one legend."""
    panels = frontier["panels"]
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.3 * cols, 3.4 * rows + 0.6), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, panel in zip(axes.flat, panels):
        draw_frontier_panel(ax, panel)
    handles = {}
    for ax in axes.flat[:len(panels)]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles), fontsize=8)
    fig.suptitle("final held-out loss against learning rate: mean over the seeds that finished, 95% band; "
                 "x = diverged (k/n seeds)", fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _mean_ci(d, digits=3):
    mean, half = d
    if mean is None or not math.isfinite(mean):
        return "–"
    return fmt_num(mean, digits) + (f" ± {fmt_num(half, 2)}" if half is not None and math.isfinite(half) else "")


def _lr_interval(d):
    """A per-seed log10 lr's mean ± half as a geometric mean with its interval."""
    mean, half = d
    if mean is None or not math.isfinite(mean):
        return "–"
    ci = f" [{fmt_num(10 ** (mean - half))}, {fmt_num(10 ** (mean + half))}]" if math.isfinite(half) else ""
    return fmt_num(10 ** mean) + ci


def frontier_table(frontier):
    """Per panel and arm: the max stable lr (all seeds; per seed as a geometric mean with its
    interval), the max trainable lr, the sensitivity, the optimal lr and the best loss, with 95% intervals."""
    lines = [_row(["panel", "init", "max stable lr (all seeds)", "max stable lr per seed: geo. mean [95% CI]",
                   "max trainable lr (all seeds)", "lr sensitivity (mean ± 95% CI)", "optimal lr (lowest mean loss)",
                   "optimal lr per seed: geo. mean [95% CI]", "best final loss (mean ± 95% CI)", "diverged runs"]),
             "|" + "---|" * 10]
    for p in frontier["panels"]:
        for arm, m in p["arms"].items():
            log_stable = m.get("log10_max_stable_lr") or (float("nan"), float("nan"))
            k = sum(d[0] for d in m["diverged"].values())
            n = sum(d[1] for d in m["diverged"].values())
            lines.append(
                _row(
                    [
                        cell_label(p["panel"]),
                        arm,
                        fmt_lr(m["max_stable_lr"]),
                        _lr_interval(log_stable),
                        fmt_lr(m["max_trainable_lr"]),
                        _mean_ci(m["sensitivity"]),
                        fmt_lr(m["opt_lr"]),
                        _lr_interval(m["log10_opt_lr"]),
                        _mean_ci(m["best_loss"]),
                        f"{k}/{n}",
                    ]
                )
            )
    return "\n".join(lines)


def tests_table(frontier, early):
    """The seed-paired tests (frontier measures, or with ``early`` the early-training losses):
    A - B with its 95% interval, the raw and Holm-adjusted p-values and the verdict."""
    lines = [_row(["panel", "A vs B", "measure" + (" (at lr)" if early else ""), "A − B [95% CI] (pairs)",
                   "p", "Holm p", "verdict"]), "|---|---|---|---|---|---|---|"]
    for p in frontier["panels"]:
        for t in p["tests"]:
            if t["measure"].startswith("loss_at_") != early:
                continue
            what = f"{t['label']} (lr {fmt_lr(t['lr'])})" if early else t["label"]
            lines.append(_row([cell_label(p["panel"]), f"{t['a']} vs {t['b']}", what,
                               f"{effect_value(t)} ({t['n']})" if t["n"] else "–",
                               fmt_num(t["p"], 2) if t["n"] >= 2 else "–",
                               fmt_num(t["p_holm"], 2) if t["n"] >= 2 else "–", t["verdict"]]))
    return "\n".join(lines)


DEFINITIONS = [
    "*maximal stable learning rate*: the largest swept learning rate at which every seed of the arm finished without "
    "diverging (per seed: the largest at which that seed did). Zeroed residual branches are argued for by how they "
    "move it, especially without normalisation and with depth: Fixup (Zhang et al. 2019), SkipInit (De & Smith "
    "2020), ReZero (Bachlechner et al. 2020).",
    "*maximal trainable learning rate*: the largest swept learning rate at which every seed finished *and* ended "
    "below its initial loss: the divergence rule (a loss 10x the initial) lets a run finish that has learnt nothing.",
    "*learning-rate sensitivity* (Wortsman et al. 2023, \"Small-scale proxies for large-scale Transformer training "
    "instabilities\", arXiv 2309.14322): per seed, the mean over the swept learning rates of min(final loss, initial "
    "loss) minus the best final loss of the sweep; a diverged run counts as the initial loss. 0 = the final loss does "
    "not depend on the learning rate; an intervention that stabilises training lowers it.",
    "*optimal learning rate* and *best final loss*: where the final held-out loss is lowest (per seed; the table's "
    "'optimal lr' is the lr with the lowest mean over seeds among those every seed finished).",
    "*early-training deficit*: the training loss at the early steps, at the baseline arm's optimal learning rate; "
    "every arm of a seed sees the same batch, t and noise at a given step, so the paired difference is the init's.",
    "*tests*: per measure, a two-sided one-sample t-test on the per-seed differences A − B (`scipy.stats`), with a "
    "95% t-interval; the p-values of all tests in the report are adjusted together by Holm's step-down method "
    "(Holm 1979), which controls the family-wise error rate.",
]


def frontier_sections(results, summary, plots):
    """The report's leading sections when the grid sweeps the learning rate (else nothing)."""
    fs = summary.get("frontier")
    if not fs:
        return []
    return ["## The learning-rate frontier", "", f"![final held-out loss against learning rate]"
            f"({os.path.basename(plots['frontier'])})", "",
            "One panel per (norm, depth); one line per init: the mean final held-out loss over the seeds that finished "
            "at that learning rate, with its 95% t-band (filled marker: every seed finished; hollow: some diverged). "
            "An x at the top marks a learning rate where k of n seeds diverged; the dotted line is the initial loss.",
            "", "### Frontier measures per arm", "", frontier_table(fs), "",
            f"### Seed-paired comparisons (Holm-corrected over all {fs['tests']} tests)", "",
            tests_table(fs, early=False), "", "### Early-training deficit", "", tests_table(fs, early=True), "",
            "## Conclusions", "", *[f"- {line}" for line in summary["conclusions"]], "",
            "### Definitions and sources", "", *[f"- {d}" for d in DEFINITIONS], ""]


MODEL_KEYS = {"channels", "model_channels", "num_res_blocks", "attention_resolutions", "dropout", "channel_mult",
              "class_cond", "num_classes", "num_heads", "num_heads_upsample", "use_scale_shift_norm", "norm",
              "image_size", "learn_sigma"}


# --------------------------------------------------------------------------- plots


def _subplots(n, width=4.2, height=3.2):
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat[:n])


def _finish_axis(ax, title, xlabel, ylabel, log=False):
    ax.set_title(title, fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=7)


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _panels(path, groups, draw, xlabel, ylabel, log=False):
    """One panel per group of runs: ``draw(ax, runs)`` plots one and returns its title."""
    fig, axes = _subplots(max(1, len(groups)))
    for ax, runs in zip(axes, groups):
        _finish_axis(ax, draw(ax, runs), xlabel, ylabel, log)
    return _save(fig, path)


def _by_cell(runs):
    return [[r for r in runs if r["cell_id"] == cid] for cid in cell_ids(runs)]


def _band_line(ax, mean, low, high, color, label):
    steps = np.arange(1, len(mean) + 1)
    ax.plot(steps, mean, color=color, label=label, lw=1.2)
    ax.fill_between(steps, low, high, color=color, alpha=0.25, lw=0)


def plot_curves(results, key, path, ylabel, window=1, log=True):
    """One panel per cell: each arm's mean curve over seeds with its 95% band."""
    def draw(ax, rs):
        for arm in arm_names(rs):
            mine = [r for r in rs if r["arm"] == arm]
            mean, low, high = curve_band([r["curves"][key] for r in mine], window, log=log)
            k = sum(bool(r["measures"]["diverged"]) for r in mine)
            label = f"{arm} ({k}/{len(mine)} diverged)" if k else arm
            if np.isfinite(mean).any():
                _band_line(ax, mean, low, high, ARM_COLORS.get(arm), label)
            else:
                ax.plot([], [], color=ARM_COLORS.get(arm), label=label + ", no finite value")
        return cell_label(rs[0]["cell"])

    return _panels(path, _by_cell(results["runs"]), draw, "step", ylabel, log)


def plot_paired_difference(results, path, key="loss", window=1):
    """One panel per cell: for each comparison A vs B, the seed-paired difference A - B of the
    smoothed training curves with its 95% band; below the zero line A is lower."""
    pairs = comparisons(results)
    cells = [rs for rs in _by_cell(results["runs"]) if any({a, b} <= set(arm_names(rs)) for a, b in pairs)]

    def draw(ax, rs):
        for i, (a, b) in enumerate(pairs):
            ca, cb = ({s: r["curves"][key] for s, r in finished_by_seed(rs, arm).items()} for arm in (a, b))
            mean, low, high = paired_curve_difference(ca, cb, window)
            if len(mean) and np.isfinite(mean).any():
                _band_line(ax, mean, low, high, f"C{i}", f"{a} − {b} ({len(set(ca) & set(cb))} seeds)")
        ax.axhline(0, color="k", lw=0.8)
        return cell_label(rs[0]["cell"])

    return _panels(path, cells, draw, "step", f"difference in training {key} ({window}-step mean)")


def plot_activation_rms(results, path):
    """Per model shape (cells that differ only in, e.g., lr share one): each ResBlock's output
    RMS at init, first block to last, per init scheme (mean over seeds)."""
    groups = {}
    for r in results["runs"]:
        groups.setdefault(r["model_key"], []).append(r)

    def draw(ax, rs):
        for arm in arm_names(rs):
            rows = [[np.nan if v is None else v for _, v in r["init"]["activation_rms"]] for r in rs if r["arm"] == arm]
            rows = [row for row in rows if row]
            if not rows:
                continue
            mean = (
                np.nanmean(np.asarray(rows, dtype=float), axis=0)
                if np.isfinite(rows).any()
                else np.full(len(rows[0]), np.nan)
            )
            ax.plot(np.arange(len(mean)), mean, marker="o", ms=3, color=ARM_COLORS.get(arm),
                    label=arm if np.isfinite(mean).all() else f"{arm} (non-finite beyond the plot)")
        return cell_label({k: v for k, v in rs[0]["cell"].items() if k in MODEL_KEYS})

    return _panels(path, list(groups.values()), draw, "ResBlock (forward order: encoder, middle, decoder)",
                   "output RMS at init", log=True)


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
    _finish_axis(ax1, "zeroed layers: mean pairwise distance of weight rows / row norm", "optimizer steps taken",
                 "output-channel distinctness")
    _finish_axis(ax2, "parameters that have left their initial value", "optimizer steps taken",
                 "fraction of parameter tensors moved")
    ax2.set_ylim(-0.03, 1.03)
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    return _save(fig, path)


def make_plots(results, out_dir):
    """Every plot of the report, written into ``out_dir``: {short name: path}."""
    window = smoothing_window(results)
    def at(name):
        return os.path.join(out_dir, name)

    plots = {
        "loss": plot_curves(results, "loss", at("loss_curves.png"), f"training loss ({window}-step mean)", window),
        "diff": plot_paired_difference(results, at("loss_difference.png"), "loss", window),
        "grad": plot_curves(results, "grad_norm", at("grad_norm.png"),
                            f"grad norm before clipping ({window}-step mean)", window),
        "update": plot_curves(results, "update_ratio", at("update_ratio.png"),
                              f"update / weight RMS ({window}-step mean)", window),
        "act": plot_activation_rms(results, at("activation_rms_init.png")),
    }
    if results.get("symmetry"):
        plots["sym"] = plot_symmetry(results["symmetry"], at("symmetry.png"))
    return plots


# --------------------------------------------------------------------------- tables


def cell_table(cell, threshold):
    """Every measure of every arm of one cell, each comparison's difference and verdict."""
    arms, comps = list(cell["arms"]), cell["comparisons"]
    head = ["measure", *arms, *[f"{c['a']} − {c['b']} [95% CI]" for c in comps], *["verdict" for _ in comps]]
    lines = [_row(head), "|" + "---|" * len(head)]
    for key, label, _ in MEASURES:
        lines.append(_row([measure_name(key, label, threshold), *[fmt_mean_ci(cell["arms"][a][key]) for a in arms],
                           *[fmt_diff(c[key]) for c in comps], *[c[key]["verdict"] for c in comps]]))
    lines.append(_row(["diverged", *[f"{cell['arms'][a]['diverged']}/{cell['arms'][a]['n']}" for a in arms],
                       *[f"Fisher p = {c['diverged']['p']:.2g}" for c in comps], *["" for _ in comps]]))
    return "\n".join(lines)


def main_table(summary):
    """One line per cell and comparison: final held-out loss of each arm, their seed-paired
    difference with its 95% CI and the verdict, and the divergence counts."""
    lines = [
        "| cell | A vs B | held-out loss A | held-out loss B | A − B [95% CI] | verdict | diverged A | diverged B |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cell in summary["cells"]:
        for c in cell["comparisons"]:
            a, b = cell["arms"][c["a"]], cell["arms"][c["b"]]
            lines.append(
                _row(
                    [
                        cell["label"],
                        f"{c['a']} vs {c['b']}",
                        fmt_mean_ci(a["final_eval_loss"]),
                        fmt_mean_ci(b["final_eval_loss"]),
                        fmt_diff(c["final_eval_loss"]),
                        c["final_eval_loss"]["verdict"],
                        f"{a['diverged']}/{a['n']}",
                        f"{b['diverged']}/{b['n']}",
                    ]
                )
            )
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


def symmetry_table(symmetry):
    """Per init: how many zeroed layers have distinct output channels after 0, 1, 2 and the
    last step, and the fraction of parameter tensors moved after 1, 2 and 3 steps."""
    if not symmetry:
        return ["The symmetry runs were switched off (`symmetry: {steps: 0}`)."]
    last = len(symmetry[0]["steps"]) - 1
    out = ["| init | zeroed layers | with distinct output channels: at init | after 1 step | after 2 steps | "
           f"after {last} steps | fraction of parameter tensors moved after 1 / 2 / 3 steps |",
           "|---|---|---|---|---|---|---|"]
    for s in symmetry:
        layers = list(s["layers"].values())
        counts = [sum(1 for v in layers if step < len(v) and v[step] is not None and v[step] > 0)
                  for step in (0, 1, 2, len(s["steps"]) - 1)]
        moved = " / ".join(f"{m:.2f}" for m in s["moved_fraction"][1:4])
        out.append(_row([s["arm"], str(len(layers)), *map(str, counts), moved]))
    return out


# --------------------------------------------------------------------------- rules in words


def _either(values, fmt="{}"):
    return " or ".join(fmt.format(v) for v in values)


def divergence_words(results):
    """The divergence rule the runs used, in words, from their configs."""
    factors, windows = divergence_rule(results)
    level = [f for f in factors if f > 0]
    if not level:
        return "a non-finite loss or gradient"
    return (f"a non-finite loss or gradient, or the median of the last {_either(windows)} training losses above "
            f"{_either(level, '{:g}')}x the initial loss")


def spike_words(results):
    """The loss-spike rule the runs were measured with, in words."""
    rule = spike_rule(results)
    if rule is None:
        return "steps whose loss is far above the median of the previous losses (`diagnostics.SpikeDetector`)"
    return (f"steps whose loss is above {rule['factor']:g}x the median of the previous {rule['window']} "
            "(`diagnostics.SpikeDetector`)")


# --------------------------------------------------------------------------- sections
# Each takes (results, summary, plots) and returns its Markdown lines; SECTIONS orders them.


def _image(alt, path):
    return f"![{alt}]({os.path.basename(path)})"


def intro_section(results, summary, plots):
    runs, seeds = results["runs"], results["ablation"].get("seeds", [])
    return [f"# Zero-init ablation: {results.get('name', '')}", "",
            f"Produced by `{results.get('command', 'python -m unet.ablation')}`: {len(runs)} runs "
            f"({len(summary['cells'])} cells, seeds {', '.join(map(str, seeds))}), "
            f"{results.get('run_seconds', 0) / 60:.1f} min of training summed over runs; "
            f"wandb group `{results.get('group', '')}`. Each arm of a cell differs from the others only in `init`; "
            "for a given seed every run sees the same batches, timesteps and noise, and the held-out loss is "
            "measured on the same fixed batch, t and noise for every run.", ""]


def main_section(results, summary, plots):
    frontier = bool(summary.get("frontier"))
    head = ("## Per learning rate: final held-out loss (95% intervals not corrected for multiple comparisons)"
            if frontier else "## Main result: final held-out loss")
    md = [head, "", main_table(summary), "",
          "Intervals are 95% t-intervals over seeds; A − B is paired by seed. A diverged run stops there and is "
          "counted below; every other measure is over the finished runs only, so n counts those.", "",
          f"Divergence (runs that stopped on {divergence_words(results)}):", "",
          divergence_table(summary), ""]
    return md if frontier else md + ["## Conclusions", "", *[f"- {line}" for line in summary["conclusions"]], ""]


def curves_section(results, summary, plots):
    window = smoothing_window(results)
    return [
        "## Training loss",
        "",
        _image("loss curves", plots["loss"]),
        "",
        f"Geometric mean over seeds of the {window}-step running mean of the training loss, with its 95% band "
        "(taken of log values). Seeds differ in their batches, so these bands are wide; the arms of one seed share "
        "every batch, and the seed-paired difference below removes that noise:",
        "",
        _image("paired loss difference", plots["diff"]),
        "",
        "Mean over seeds of the difference between two arms' smoothed training losses (same seed, same batches), "
        "with its 95% band; below 0 the first arm is lower.",
        "",
        "## Gradient norm and update size",
        "",
        _image("grad norm", plots["grad"]),
        "",
        _image("update ratio", plots["update"]),
        "",
        "The update/weight ratio is the RMS of one optimizer step's change over the RMS of the weights before it.",
        "",
        "## Activation RMS by depth at init",
        "",
        _image("activation RMS", plots["act"]),
        "",
        "The RMS of each ResBlock's output at step 0 on the fixed held-out batch (mean over seeds). Under `zero` "
        "every block is the identity at init, so the RMS is carried through unchanged by the residual branches.",
        "",
    ]


def cell_tables_section(results, summary, plots):
    if summary.get("frontier"):
        return []  # one table per (panel, lr) cell would bury the frontier; results.json has every number
    threshold = results["ablation"].get("threshold", float("nan"))
    md = ["## Per-cell tables", ""]
    for cell in summary["cells"]:
        md += [f"### {cell['label']}", "", cell_table(cell, threshold), ""]
    return md


def symmetry_section(results, summary, plots):
    md = ["## Symmetry: zero against all-zero", ""]
    if "sym" in plots:
        md += [_image("symmetry", plots["sym"]), ""]
    return md + [
        *symmetry_table(results.get("symmetry")),
        "",
        "A zeroed layer's weight gradient is (upstream gradient) x (its own input). Under `zero` the input is "
        "non-zero and differs from channel to channel, so once any gradient reaches the layer one step makes its "
        "output channels different: the output conv at the first step, the other zeroed layers at the second, "
        "and by the third every parameter has moved. Under `all-zero` every activation is 0, so every weight "
        "gradient is 0 and only the output conv's bias ever moves: the channels stay identical (distinctness 0). "
        "`standard` (random rows from the start) is shown for scale.",
        "",
    ]


def measures_section(results, summary, plots):
    window = smoothing_window(results)
    threshold = results["ablation"].get("threshold", float("nan"))
    median_note = " (a median, so that one batch's spike is counted as a spike, not a divergence)" \
        if max(divergence_rule(results)[1]) > 1 else ""
    return ["## Measures", "",
            "- *initial loss*: the training loss of the first step.",
            f"- *steps to threshold*: the first step at which the mean of the last {window} training losses is at or "
            f"below {threshold:g} (runs that never get there are left out; n counts the others).",
            "- *final held-out loss / MSE*: the loss after the last step on a fixed held-out batch with fixed t and "
            "noise (the same for every run).",
            "- *grad norm*: the global gradient norm before clipping, max and median over steps.",
            f"- *loss spikes*: {spike_words(results)}.",
            f"- *diverged*: {divergence_words(results)}{median_note}; the run stops there and is counted "
            "(`diagnostics.DivergenceMonitor`).", ""]


# The report, top to bottom: each section maps (results, summary, plots) to Markdown lines.
SECTIONS = (
    intro_section,
    frontier_sections,
    main_section,
    curves_section,
    cell_tables_section,
    symmetry_section,
    measures_section,
)


def write_report(results, out_dir):
    """
    Write ``report.md`` and the PNG plots into ``out_dir``.

    :param results: the dict of ``results.json`` (runs, symmetry, ablation).
    :return: {"plots": [paths], "summary": the summary dict}.
    """
    summary = summarize(results)
    plots = make_plots(results, out_dir)
    if summary.get("frontier"):
        plots["frontier"] = plot_frontier(summary["frontier"], os.path.join(out_dir, "lr_frontier.png"))
    md = [line for section in SECTIONS for line in section(results, summary, plots)]
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(md))
    return {"plots": list(plots.values()), "summary": summary}

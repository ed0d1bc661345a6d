"""
The learning-rate frontier in the ablation report: the lead figure (final held-out loss against
learning rate, one panel per (norm, depth), one line per init with its seed band, divergences
marked), the table of frontier measures per arm, the Holm-corrected seed-paired tests, the
early-training deficit and the measures' definitions with their sources. The numbers come from
``unet.frontier`` through ``unet.summary``; this module only draws and writes them.
"""

import math
import os

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .ablation_grid import cell_label  # noqa: E402
from .summary import effect_value, fmt_lr, fmt_num  # noqa: E402

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
            lines.append(_row([cell_label(p["panel"]), arm, fmt_lr(m["max_stable_lr"]), _lr_interval(log_stable),
                               fmt_lr(m["max_trainable_lr"]), _mean_ci(m["sensitivity"]), fmt_lr(m["opt_lr"]), _lr_interval(m["log10_opt_lr"]),
                               _mean_ci(m["best_loss"]), f"{k}/{n}"]))
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

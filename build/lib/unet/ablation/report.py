"""
The report of the grids run before the never-censoring runner (the superseded digits grid, whose
``results.json`` ships in ``docs/ablation/``): ``results.json`` in, ``report.md`` and PNG plots out.
The lead figure is the learning-rate frontier (final held-out loss against lr, one panel per
(norm, depth), one line per init with its seed band, divergences marked), then the pre-registered
failure-count tests, the frontier measures, the Holm-corrected seed-paired tests, the curves, the
mechanism, the init study and the symmetry runs. The numbers come from ``summary``, ``endpoints``
and ``inference``; this module only draws and writes them. A never-censored grid's report is
``answer``'s.
"""

import math
import os

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from .definitions import never_censored
from .endpoints import endpoint_conclusions, endpoint_tests, failure_fractions, verdict  # noqa: E402
from .grid import cell_label, cell_matches  # noqa: E402
from .summary import (  # noqa: E402
    arm_names,
    cell_ids,
    comparisons,
    curve_band,
    effect_value,
    finished_by_seed,
    fmt_lr,
    fmt_num,
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
    failed; ^: beyond the top), and an x with 'k/n' in the top band where k of n seeds failed."""
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
            if d["failed"]:
                y = 0.95 - 0.07 * i
                ax.plot([lr], [y], "x", color=color, ms=5, mew=1.5, transform=top, clip_on=False)
                ax.text(lr, y, f" {d['failed']}/{d['runs']}", color=color, fontsize=6, transform=top, va="center")
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
                 "x = failed (k/n seeds)", fontsize=9)
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
                   "optimal lr per seed: geo. mean [95% CI]", "best final loss (mean ± 95% CI)",
                   "lr sensitivity, own initial loss as cap", "failed runs"]),
             "|" + "---|" * 11]
    for p in frontier["panels"]:
        for arm, m in p["arms"].items():
            log_stable = m.get("log10_max_stable_lr") or (float("nan"), float("nan"))
            k = sum(d[0] for d in m["failed"].values())
            n = sum(d[1] for d in m["failed"].values())
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
                        _mean_ci(m["sensitivity_own_cap"]),
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
    "loss) minus the best final loss of the sweep; a failed run counts as the cap. Here the cap is one value for both "
    "arms, the zero predictor's held-out L_simple, beside Wortsman et al.'s own-initial-loss cap (which credits an "
    "arm whose loss starts higher, as standard's output conv makes it). 0 = the final loss does "
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
    return ["## Descriptive: the learning-rate frontier", "",
            "Not pre-registered: these measures and tests describe the sweep; the endpoints above are the design.", "",
            f"![final held-out loss against learning rate]"
            f"({os.path.basename(plots['frontier'])})", "",
            "One panel per (norm, depth); one line per init: the mean final held-out loss over the seeds that finished "
            "at that learning rate, with its 95% t-band (filled marker: every seed finished; hollow: some failed). "
            "An x at the top marks a learning rate where k of n seeds failed; the dotted line is the initial loss.",
            "", "### Frontier measures per arm", "", frontier_table(fs), "",
            f"### Seed-paired comparisons (Holm-corrected over all {fs['tests']} tests)", "",
            tests_table(fs, early=False), "", "### Early-training deficit", "", tests_table(fs, early=True), "",
            "### Descriptive conclusions", "", *[f"- {line}" for line in summary["descriptive"]], "",
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
            k = sum(bool(r["measures"]["failed"]) for r in mine)
            label = f"{arm} ({k}/{len(mine)} failed)" if k else arm
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
        "act": plot_activation_rms(results, at("activation_rms_init.png")),
    }
    if results.get("symmetry"):
        plots["sym"] = plot_symmetry(results["symmetry"], at("symmetry.png"))
    return plots


# --------------------------------------------------------------------------- tables


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


def symmetry_words(symmetry):
    """What the symmetry runs measured, in words generated from their numbers: the step at which
    the first and the last zeroed layer got distinct output channels, when every parameter had
    moved, and for ``all-zero`` how many layers were still symmetric at the end."""
    if not symmetry:
        return ""
    words = []
    for s in symmetry:
        first = [v for v in s["first_distinct"].values()]
        done = [v for v in first if v is not None]
        moved_all = next((i for i, m in enumerate(s["moved_fraction"]) if m >= 1.0), None)
        last = len(s["steps"]) - 1
        if len(done) == len(first) and done:
            when = (f"every one of its {len(first)} zeroed layers had distinct output channels from step "
                    f"{min(done)} (the first) to step {max(done)} (the last)")
        else:
            when = f"{len(first) - len(done)} of its {len(first)} zeroed layers still had identical output channels"
        moved = (f"every parameter tensor had moved by step {moved_all}" if moved_all is not None else
                 f"{s['moved_fraction'][-1]:.0%} of the parameter tensors had moved after {last} steps")
        words.append(f"`{s['arm']}`: {when}; {moved}.")
    return ("Measured in these runs (0 = at init; a layer counts as distinct when its weight rows differ): "
            + " ".join(words) + " A zeroed layer's weight gradient is (upstream gradient) x (its own input): "
            "non-zero and channel-varying under `zero`, identically zero for every hidden layer under `all-zero`.")


def decoder_words(results):
    """The blocks that are not the identity under zero init, counted from the runs' block names:
    every decoder ResBlock (``output_blocks``) takes the concatenated skip connection, so it
    changes its channel count and starts as its 1x1 skip conv."""
    names = next((r["init"]["activation_rms"] for r in results["runs"] if r["init"].get("activation_rms")), [])
    blocks = [n for n, _ in names]
    dec = [n for n in blocks if n.startswith("output_blocks")]
    if not blocks:
        return ""
    return (f"Under zero init {len(blocks) - len(dec)} of the {len(blocks)} ResBlocks of the first panel's model "
            f"start as the identity; the other {len(dec)}, every decoder block, concatenate the skip connection, "
            "change their channel count and start as their 1x1 skip conv, not as the identity.")


# --------------------------------------------------------------------------- rules in words


def _either(values, fmt="{}"):
    return " or ".join(fmt.format(v) for v in values)


def spike_words(results):
    """The loss-spike rule the runs were measured with, in words."""
    rule = spike_rule(results)
    if rule is None:
        return "steps whose loss is far above the median of the previous losses (`diagnostics.SpikeDetector`)"
    return (f"steps whose loss is above {rule['factor']:g}x the median of the previous {rule['window']} "
            "(`diagnostics.SpikeDetector`)")


# --------------------------------------------------------------------------- the pre-registered endpoints


def failure_words(results):
    """The failure rule the runs used, in words, from the grid's ``failure`` keys."""
    f = results["ablation"].get("failure", {})
    if never_censored(results):
        return ("a non-finite loss or the guard (the median training L_simple of the last 10 steps above 10x the "
                "zero predictor's), the only rules that stop a run; the fractions count those stops, and every "
                "other failure definition is scored from the records below")
    return (f"a non-finite training or held-out loss; a held-out L_simple (every {f.get('eval_every', '?')} steps, on "
            "the fixed held-out batch with fixed t and noise) above the zero predictor's (the L_simple of predicting "
            f"zero noise on that batch, computed: {_zero_loss(results)}); or an mse spike, a step's training mse above "
            f"{f.get('spike_factor', '?'):g}x the median of the previous {f.get('spike_window', '?')} steps "
            "(`diagnostics.FailureRule`)")


def _zero_loss(results):
    values = sorted({round(r["zero_predictor_loss"], 4) for r in results["runs"] if r.get("zero_predictor_loss")})
    return ", ".join(f"{v:.4f}" for v in values) or "–"


def _ci(low, high, digits=2):
    return f"[{low:.{digits}f}, {high:.{digits}f}]" if math.isfinite(low) else "–"


def fractions_table(fractions):
    """Failed runs per (panel, lr, arm) with the exact 95% interval of the fraction."""
    head = ["panel", "lr", "init", "failed / runs", "fraction [exact 95% CI]", "non-finite"]
    lines = [_row(head), "|" + "---|" * len(head)]
    for f in fractions:
        lines.append(_row([f["panel"], fmt_lr(f["lr"]), f["arm"], f"{f['failed']}/{f['n']}",
                           f"{f['fraction']:.2f} {_ci(f['low'], f['high'])}", str(f["diverged"])]))
    return "\n".join(lines)


def tests_table_endpoints(tests):
    """The primary and secondary tests: numbers, p (Holm for the secondary ones) and verdict."""
    lines = [_row(["test", "A vs B", "measure", "test statistic", "A − B [95% CI]", "p", "Holm p", "verdict"]),
             "|---|---|---|---|---|---|---|---|"]
    margin = tests["equivalence_margin"]
    rows = [(tests["primary"], None)] if tests["primary"] else []
    rows += [(t, t["p_holm"]) for t in tests["secondary"]]
    for t, p_holm in rows:
        what = "failure fraction" if t["measure"] == "failure" else "final held-out L_simple"
        arms = " and ".join(" vs ".join(p) for p in t.get("pairs", [t["arms"]]))
        lines.append(_row([("primary: " if p_holm is None else "") + t["name"], arms, what,
                           t["statistic"], f"{t['diff']:+.3f} {_ci(t['low'], t['high'], 3)}", fmt_num(t["p"], 2),
                           "–" if p_holm is None else fmt_num(p_holm, 2),
                           verdict(t, margin, t["p"] if p_holm is None else p_holm)]))
    return "\n".join(lines)


def plot_failure_fractions(fractions, path):
    """The lead figure: failure fraction against lr, one panel per (norm, depth), one line per
    init with its exact 95% interval as error bars."""
    panels = list(dict.fromkeys(f["panel"] for f in fractions))
    fig, axes = _subplots(max(1, len(panels)), 4.3, 3.3)
    for ax, panel in zip(axes, panels):
        for k, arm in enumerate(dict.fromkeys(f["arm"] for f in fractions if f["panel"] == panel)):
            pts = [f for f in fractions if f["panel"] == panel and f["arm"] == arm]
            x = np.array([f["lr"] for f in pts]) * (1 + 0.03 * (k - 1))  # offset so the bars do not overlap
            y = np.array([f["fraction"] for f in pts])
            err = np.array([[f["fraction"] - f["low"] for f in pts], [f["high"] - f["fraction"] for f in pts]])
            ax.errorbar(x, y, yerr=err, marker=ARM_MARKERS.get(arm, "o"), ms=4, lw=1.2, capsize=2,
                        color=ARM_COLORS.get(arm), label=arm)
        ax.set_xscale("log")
        ax.set_ylim(-0.05, 1.05)
        _finish_axis(ax, panel, "learning rate", "fraction of seeds failed")
    fig.suptitle("failed runs (FailureRule) against learning rate, exact 95% intervals", fontsize=9)
    return _save(fig, path)


def endpoints_section(results, summary, plots):
    tests = summary["endpoints"]
    return ["## The answer: pre-registered endpoints", "",
            *[f"- {line}" for line in summary["conclusions"]], "",
            tests_table_endpoints(tests), "",
            (f"A difference is called equivalence only where both one-sided tests against "
             f"±{tests['equivalence_margin']:g} (held-out L_simple) reject at 5% and no run in the test stopped (a "
             "stopped run ranks worst)" if never_censored(results) else
             f"A failure-fraction difference is called equivalent only where its 95% interval lies inside ±"
             f"{tests['equivalence_margin']:g}, the margin written in the grid file before the run")
            + "; 'not resolved' means neither a difference nor equivalence is supported by these seeds.", "",
            _image("failure fraction against learning rate", plots["failures"]), "",
            f"A run **fails** on {failure_words(results)}.", "",
            fractions_table(summary["fractions"]), ""]


# --------------------------------------------------------------------------- mechanism over training


def _edge_runs(results, arms=("zero", "standard")):
    """{panel label: {arm: runs}} at each panel's middle primary lr (the edge), for the arms."""
    primary = results["ablation"].get("primary") or {}
    out = {}
    for cell in primary.get("cells", []):
        lrs = cell["lr"] if isinstance(cell.get("lr"), list) else [cell.get("lr")]
        lr, panel = lrs[len(lrs) // 2], {k: v for k, v in cell.items() if k != "lr"}
        label = f"{cell_label(panel)}, lr={fmt_lr(lr)}"
        wanted = {**panel, "lr": lr}
        out[label] = {arm: [r for r in results["runs"] if r["arm"] == arm and cell_matches(r["cell"], wanted)]
                      for arm in arms}
    return out


def _mechanism_series(runs, get):
    """(steps, mean over runs) of ``get(run) -> {step: value}``, where any run has a value."""
    by_step = {}
    for r in runs:
        for step, v in get(r).items():
            if v is not None and math.isfinite(v):
                by_step.setdefault(step, []).append(v)
    steps = sorted(by_step)
    return steps, [float(np.mean(by_step[s])) for s in steps]


def _block_mean(key):
    def get(r):
        rows = [(b["step"], b[key]) for b in r["mechanism"]["blocks"] if b[key]]
        values = lambda v: [x for _, x in v] if key == "activation_rms" else list(v.values())  # noqa: E731
        return {step: float(np.mean(values(v))) for step, v in rows}
    return get


def _row_value(read):
    return lambda r: {m["step"]: read(m) for m in r["mechanism"]["rows"]}


MECHANISM_PANELS = [
    ("block output RMS (mean over ResBlocks)", _block_mean("activation_rms")),
    ("branch / skip RMS (mean over ResBlocks)", _block_mean("residual_ratios")),
    ("update / weight, branch ends", _row_value(lambda m: m["update_ratio"]["branch_ends"])),
    ("update / weight, other convs", _row_value(lambda m: m["update_ratio"]["other"])),
    ("middle attention: max logit", _row_value(lambda m: m["max_logit"])),
    ("middle attention: entropy / log T", _row_value(lambda m: m["entropy"] / m["uniform_entropy"])),
]


def plot_mechanism(label, by_arm, path):
    """One figure for one panel at its edge lr: each mechanism measure against step, per arm
    (mean over the runs still going at that step)."""
    fig, axes = _subplots(len(MECHANISM_PANELS), 3.6, 2.8)
    for ax, (title, get) in zip(axes, MECHANISM_PANELS):
        for arm, runs in by_arm.items():
            steps, mean = _mechanism_series(runs, get)
            ax.plot(steps, mean, marker=ARM_MARKERS.get(arm, "o"), ms=3, color=ARM_COLORS.get(arm), label=arm)
        _finish_axis(ax, title, "step", "", log=title.startswith("update"))
    fig.suptitle(f"{label}: mean over the runs still training at each step", fontsize=9)
    return _save(fig, path)


def mechanism_plots(results, out_dir):
    """{panel label: path} of the mechanism figures (none when the runs recorded no mechanism)."""
    if not any("update_ratio" in row for r in results["runs"] for row in r.get("mechanism", {}).get("rows", [])):
        return {}
    out = {}
    for i, (label, by_arm) in enumerate(_edge_runs(results).items()):
        if all(by_arm.values()):
            out[label] = plot_mechanism(label, by_arm, os.path.join(out_dir, f"mechanism_{i}.png"))
    return out


def mechanism_section(results, summary, plots):
    if not plots.get("mechanism"):
        return []
    every = results["ablation"].get("mechanism_every", 50)
    md = ["## Mechanism over training (descriptive)", "",
          f"Every {every} steps at each panel's middle edge learning rate: each ResBlock's output RMS and its "
          "branch/skip RMS ratio on 32 fixed noised held-out images, the update-to-weight RMS ratio of one step per "
          "layer group (branch ends: the layers zero init zeroes; other: every other conv and norm), and the middle "
          "block's attention: its largest pre-softmax logit and its mean row entropy over log T (1 = uniform). A run "
          "stops when it fails, so late points average the runs that survived.", ""]
    for label, path in plots["mechanism"].items():
        md += [f"### {label}", "", _image(f"mechanism at {label}", path), ""]
    return md


def init_study_section(results, summary, plots):
    study = results.get("init_study")
    if not study:
        return ["## Init-only study", "", "Not run: `python ablation.py --init_study --output_dir DIR` adds it.", ""]
    md = ["## Init-only study (no training; descriptive)", "",
          "Per width and depth: the output RMS at init, the initial L_simple on one batch, the gradient norm of the "
          "branch ends and of the other layers, and how far one Adam step moves the output per unit learning rate.",
          "", _row(["width", "depth", "init", "output RMS", "initial L_simple", "grad norm branch ends / other",
                    "output change per unit lr"]), "|---|---|---|---|---|---|---|"]
    for r in study["scaling"]:
        g = r["grad_norm"]
        md.append(_row([str(r["width"]), str(r["depth"]), r["arm"], fmt_num(r["output_rms"]),
                        fmt_num(r["initial_loss"]), f"{fmt_num(g['branch_ends'])} / {fmt_num(g['other'])}",
                        fmt_num(r["output_change_per_lr"])]))
    md += ["", "### Init memory", "",
           "RMS difference between the zero and standard arms' zeroed-layer weights (same seed, same batches), over "
           "standard's init RMS of those weights: 1 at step 0; below 1 the two runs are closer than the init set them.",
           "", _row(["lr", *[f"step {s}" for s in study["memory"]["steps"]]]),
           "|---|" + "---|" * len(study["memory"]["steps"])]
    for lr, ratio in study["memory"]["ratio"].items():
        md.append(_row([lr, *[f"{v:.2f}" for v in ratio]]))
    return md + [""]


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
        "## Gradient norm",
        "",
        _image("grad norm", plots["grad"]),
        "",
        "## Activation RMS by depth at init",
        "",
        _image("activation RMS", plots["act"]),
        "",
        "The RMS of each ResBlock's output at step 0 on the fixed held-out batch (mean over seeds). Under `zero` "
        "a block that keeps its channel count is the identity at init and passes the RMS on unchanged; every "
        "decoder block concatenates the skip connection, changes the channel count and so starts as its 1x1 "
        "skip conv, which changes the RMS.",
        "",
    ]


def symmetry_section(results, summary, plots):
    md = ["## Symmetry: zero against all-zero", ""]
    if "sym" in plots:
        md += [_image("symmetry", plots["sym"]), ""]
    return md + [
        *symmetry_table(results.get("symmetry")),
        "",
        symmetry_words(results.get("symmetry")),
        "",
    ]


def measures_section(results, summary, plots):
    window = smoothing_window(results)
    threshold = results["ablation"].get("threshold", float("nan"))
    return ["## Measures", "",
            "- *initial loss*: the training loss of the first step.",
            f"- *steps to threshold*: the first step at which the mean of the last {window} training losses is at or "
            f"below {threshold:g} (runs that never get there are left out; n counts the others).",
            "- *final held-out loss / MSE*: the loss after the last step on a fixed held-out batch with fixed t and "
            "noise (the same for every run).",
            "- *grad norm*: the global gradient norm before clipping, max and median over steps.",
            f"- *loss spikes*: {spike_words(results)}.",
            f"- *failed*: {failure_words(results)}; the run stops there and is counted. *diverged*: the "
            "stricter count of non-finite losses alone.", ""]


# The report, top to bottom: each section maps (results, summary, plots) to Markdown lines.
SECTIONS = (
    intro_section,
    endpoints_section,
    mechanism_section,
    init_study_section,
    symmetry_section,
    frontier_sections,
    curves_section,
    measures_section,
)


def write_report(results, out_dir):
    """
    Write ``report.md`` and the PNG plots into ``out_dir``.

    :param results: the dict of ``results.json`` (runs, symmetry, ablation).
    :return: {"plots": [paths], "summary": the summary dict}.
    """
    summary = summarize(results)
    summary["endpoints"] = endpoint_tests(results)
    summary["fractions"] = failure_fractions(results["runs"])
    summary["conclusions"] = [*endpoint_conclusions(summary["endpoints"]),
                              *[w for w in (decoder_words(results), symmetry_words(results.get("symmetry"))) if w]]
    plots = make_plots(results, out_dir)
    plots["frontier"] = plot_frontier(summary["frontier"], os.path.join(out_dir, "lr_frontier.png"))
    plots["failures"] = plot_failure_fractions(summary["fractions"], os.path.join(out_dir, "failures.png"))
    mechanism = mechanism_plots(results, out_dir)
    md = [line for section in SECTIONS for line in section(results, summary, {**plots, "mechanism": mechanism})]
    plots.update({f"mechanism_{i}": p for i, p in enumerate(mechanism.values())})
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(md))
    return {"plots": list(plots.values()), "summary": summary}

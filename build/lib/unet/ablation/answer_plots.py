"""
The never-censored grid's two figures, from its compact per-run results: the held-out curves
(median over seeds per arm, one panel per cell) and the final loss against lr (every seed, one
panel per (norm, depth, warmup)). PNGs are written without a software stamp, so a rebuild on the
same matplotlib is byte-identical.
"""

import math
import statistics

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from .grid import cell_label  # noqa: E402

COLORS = {"zero": "C0", "standard": "C1", "zero-branches": "C2", "zero-output": "C4", "kaiming": "C3",
          "fixup": "C5"}


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)
    return path


def _axes(n, cols=4, width=3.6, height=2.8):
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, min(cols, n), figsize=(width * min(cols, n), height * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat


def _finite(v):
    return v is not None and math.isfinite(v)


def plot_curves(runs, path):
    """Median held-out L_simple over seeds against step, per arm; one panel per cell. A stopped
    run's curve ends where it stopped (the median is over the runs that reached each check)."""
    cells = {}
    for r in runs:
        cells.setdefault(cell_label(r["cell"]), {}).setdefault(r["arm"], []).append(r["checks"])
    fig, axes = _axes(len(cells))
    for ax, (cell, arms) in zip(axes, cells.items()):
        for arm, checks in arms.items():
            steps = max((c["steps"] for c in checks), key=len)
            med = [statistics.median(v) if v else None for v in
                   ([c["mse"][i] for c in checks if i < len(c["mse"]) and _finite(c["mse"][i])]
                    for i in range(len(steps)))]
            pts = [(s, m) for s, m in zip(steps, med) if m is not None]
            ax.plot([s for s, _ in pts], [m for _, m in pts], color=COLORS.get(arm), label=arm, lw=1.2)
        ax.set_yscale("log")
        ax.set_title(cell.replace("num_res_blocks", "blocks").replace("warmup_steps", "warmup"), fontsize=7)
        ax.set_xlabel("step", fontsize=7)
        ax.set_ylabel("held-out L_simple", fontsize=7)
        ax.tick_params(which="both", labelsize=6)
        ax.legend(fontsize=6)
    return _save(fig, path)


def plot_final_loss(runs, path):
    """Every run's final loss against lr, one panel per (norm, depth, warmup); a stopped run is an
    x at the top of its panel."""
    panels = {}
    for r in runs:
        key = cell_label({k: v for k, v in r["cell"].items() if k != "lr"})
        panels.setdefault(key, []).append(r)
    fig, axes = _axes(len(panels), cols=3, width=4.2, height=3.2)
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    for ax, (panel, rs) in zip(axes, panels.items()):
        top = max((r["final_loss"] for r in rs if _finite(r["final_loss"])), default=1.0) * 1.5
        for i, arm in enumerate(arms):
            mine = [r for r in rs if r["arm"] == arm]
            if not mine:
                continue
            shift = 1.0 + 0.06 * (i - (len(arms) - 1) / 2)  # arms side by side at each lr
            done = [(r["cell"]["lr"] * shift, r["final_loss"]) for r in mine if _finite(r["final_loss"])]
            stopped = [r["cell"]["lr"] * shift for r in mine if not _finite(r["final_loss"])]
            ax.scatter([x for x, _ in done], [y for _, y in done], s=9, color=COLORS.get(arm), label=arm)
            if stopped:
                ax.scatter(stopped, [top] * len(stopped), marker="x", s=18, color=COLORS.get(arm))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(panel.replace("num_res_blocks", "blocks").replace("warmup_steps", "warmup") + " (x: stopped)",
                     fontsize=7)
        ax.set_xlabel("lr", fontsize=7)
        ax.set_ylabel("final held-out L_simple", fontsize=7)
        ax.tick_params(which="both", labelsize=6)
        ax.legend(fontsize=6)
    return _save(fig, path)

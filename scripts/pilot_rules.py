"""Apply the pre-registered pilot rules (docs/ablation/fashion_preregistration.md) to a finished
pilot (configs/ablation/fashion_pilot.yaml): the grid's length, the edge lrs and the margin.

    python scripts/pilot_rules.py outputs/ablation_fashion_pilot

Prints the numbers and the measured seconds per step they rest on; reads only the runs' result.json."""

import glob
import json
import math
import os
import statistics
import sys

from unet.ablation.definitions import failed, final_loss

BUDGET_MINUTES = 95


def load_runs(out_dir):
    runs = []
    for path in sorted(glob.glob(os.path.join(out_dir, "runs", "*", "result.json"))):
        with open(path) as f:
            runs.append(json.load(f))
    return runs


def edge(runs, norm, depth, lrs, arms):
    """The smallest lr at which a pilot run fails under late_rise, or ends above 1.5x its arm's
    lowest final loss over the lrs; the largest lr when none does."""
    panel = [r for r in runs if (r["cell"]["norm"], r["cell"]["num_res_blocks"]) == (norm, depth)
             and r["arm"] in arms and float(r["cell"]["lr"]) in lrs]
    best = {a: min(final_loss(r) for r in panel if r["arm"] == a) for a in arms}
    for lr in sorted(lrs):
        at = [r for r in panel if float(r["cell"]["lr"]) == lr]
        if any(failed(r, "late_rise") or final_loss(r) > 1.5 * best[r["arm"]] for r in at):
            return lr, best
    return max(lrs), best


def round_up(x, digits=2):
    """``x`` rounded up to ``digits`` significant digits."""
    scale = 10 ** (digits - 1 - math.floor(math.log10(abs(x))))
    return math.ceil(x * scale) / scale


def main(out_dir):
    runs = load_runs(out_dir)
    per_step = {}
    for r in runs:  # runs that trained to the end (a run stopped at step 1 is all start-up)
        key = "A" if r["cell"]["norm"] == "group" else "B"
        if r["stopped"] is None:
            per_step.setdefault(key, []).append(r["seconds"] / r["steps"])
    secs = {k: statistics.median(v) for k, v in per_step.items()}
    runs_a, runs_b = 6 * 4 * 6, 4 * 2 * 4  # (cells x arms x seeds) of panels A and B
    for steps in (1000, 800, 600, 500):
        minutes = (runs_a * secs["A"] + runs_b * secs["B"]) * steps / 2 / 60
        print(f"max_steps {steps}: about {minutes:.0f} minutes on two single-thread processes")
    edge_a, best_a = edge(runs, "group", 2, (0.001, 0.003, 0.01, 0.03), ("zero", "standard"))
    edge_b, best_b = edge(runs, "none", 4, (0.0003, 0.001, 0.003), ("kaiming", "zero"))
    trainable = [a for a in ("kaiming", "zero") if math.isfinite(best_b[a])]
    edge_b2, best_b2 = edge(runs, "none", 4, (0.0003, 0.001, 0.003), trainable)
    print(f"edge, panel B over the arms that finish at some pilot lr ({', '.join(trainable)}; the amendment): "
          f"L = {edge_b2:g} ({best_b2})")
    practical = [final_loss(r) for r in runs if r["arm"] == "standard" and float(r["cell"]["lr"]) == 0.0002]
    sd = statistics.stdev(practical)
    print(f"seconds per step (median, with checks): panel A {secs['A']:.4f}, panel B {secs['B']:.4f}")
    print(f"edge, panel A: L = {edge_a:g} (lowest final loss per arm {best_a}); edge lrs {edge_a / 2:g} and {edge_a:g}")
    print(f"edge, panel B: L = {edge_b:g} (lowest final loss per arm {best_b})")
    print(f"margin: sd of {len(practical)} final losses at lr 2e-4 = {sd:.5f} -> {round_up(sd):g} "
          f"(values {[round(v, 5) for v in practical]})")
    for r in sorted(runs, key=lambda r: (r["cell"]["norm"], r["cell"]["num_res_blocks"], r["cell"]["lr"], r["arm"])):
        print(f"  {r['run_id']}: lr {r['cell']['lr']:g} final {final_loss(r):.4f} start {r['checks']['mse'][0]:.4f} "
              f"late_rise {failed(r, 'late_rise')} stopped {r['stopped']}")


if __name__ == "__main__":
    main(sys.argv[1])

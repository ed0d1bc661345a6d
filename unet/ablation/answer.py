"""
The never-censored grid's descriptive tables, as Markdown lines for ``report.md``: every failure
definition's count per panel, lr and arm (start-neutral ones marked), the held-out L_simple at step 0
beside the final one, and the mechanism (fp16 overflows, activation extremes, update-to-weight
ratios at the first steps). Pure functions of ``results.json``; the tests are ``endpoints``'.
"""

import math
import statistics

from .definitions import DEFINITIONS, start_neutral
from .grid import cell_label
from .record import FP16_MAX, UPDATE_STEPS, largest


def never_censored(results):
    """Whether the runs come from the never-censoring runner (they carry ``verdicts``)."""
    return all("verdicts" in r for r in results["runs"]) and bool(results["runs"])


def _groups(runs):
    """{(cell label, arm): [runs]} in the grid's order."""
    out = {}
    for r in runs:
        out.setdefault((cell_label(r["cell"]), r["arm"]), []).append(r)
    return out


def _median(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(values) if values else None


def _fmt(v, digits=4):
    return "-" if v is None else f"{v:.{digits}g}"


def definitions_table(runs):
    """Failed runs under every definition, per (cell, arm), as k/n."""
    names = list(DEFINITIONS)
    head = "| cell | arm | " + " | ".join(f"{n}{'' if start_neutral(n) else ' (descriptive)'}" for n in names) + " |"
    lines = [head, "|" + "---|" * (len(names) + 2)]
    for (cell, arm), rs in _groups(runs).items():
        counts = [f"{sum(bool(r['verdicts'][n]) for r in rs)}/{len(rs)}" for n in names]
        lines.append(f"| {cell} | {arm} | " + " | ".join(counts) + " |")
    return lines


def start_and_end_table(runs):
    """Median held-out L_simple at step 0 and at the end (final loss), per (cell, arm)."""
    lines = ["| cell | arm | step 0 | final | stopped |", "|---|---|---|---|---|"]
    for (cell, arm), rs in _groups(runs).items():
        start = _median([r["checks"]["mse"][0] for r in rs if r["checks"]["mse"]])
        lines.append(f"| {cell} | {arm} | {_fmt(start)} | {_fmt(_median([r.get('final_loss') for r in rs]))} | "
                     f"{sum(bool(r['stopped']) for r in rs)}/{len(rs)} |")
    return lines


def mechanism_table(runs):
    """Per (cell, arm): runs whose activations overflowed fp16, the median over runs of the largest
    |activation| and ResBlock output RMS seen, and the median update-to-weight ratio of the branch
    ends and of the output conv at steps 1, 2, 3, 5, 10."""
    lines = ["| cell | arm | fp16 overflow | max abs activation | max block RMS | "
             + " | ".join(f"update/weight step {s} (branch ends, output)" for s in UPDATE_STEPS) + " |",
             "|" + "---|" * (5 + len(UPDATE_STEPS))]
    for (cell, arm), rs in _groups(runs).items():
        rows = [r["mechanism"]["rows"] for r in rs]
        biggest = [largest(x["max_abs_activation"] for x in rw) for rw in rows]
        block = _median([largest(x["max_block_rms"] for x in rw) for rw in rows])
        overflow = sum(not b <= FP16_MAX for b in biggest if b is not None)
        biggest = _median(biggest)
        updates = []
        for s in UPDATE_STEPS:
            got = [r["mechanism"]["updates"].get(str(s)) for r in rs]
            got = [g for g in got if g]
            updates.append(f"{_fmt(_median([g.get('branch_ends') for g in got]), 2)}, "
                           f"{_fmt(_median([g.get('output') for g in got]), 2)}")
        lines.append(f"| {cell} | {arm} | {overflow}/{len(rs)} | {_fmt(biggest, 3)} | {_fmt(block, 3)} | "
                     + " | ".join(updates) + " |")
    return lines


def answer_sections(results, summary, plots):
    """The descriptive sections of a never-censored grid's report (none for the old runner's)."""
    if not never_censored(results):
        return []
    runs = results["runs"]
    stopped = sum(bool(r["stopped"]) for r in runs)
    overflow = sum(bool(r["mechanism"].get("fp16_overflow")) for r in runs)
    return ["## Failure definitions, scored from the full records (descriptive)", "",
            f"No rule stopped a run but a non-finite loss or the guard: {stopped} of {len(runs)} runs stopped early, "
            f"the other {len(runs) - stopped} reached max_steps. Definitions marked descriptive are not start-neutral "
            "(an arm's untrained model can fail them), so no test reads them.", "",
            *[f"- `{n}`: {DEFINITIONS[n][2]}" for n in DEFINITIONS], "",
            *definitions_table(runs), "",
            "## Where each arm starts and ends (held-out L_simple, medians over seeds)", "",
            *start_and_end_table(runs), "",
            "## Mechanism (descriptive, every run)", "",
            f"{overflow} of {len(runs)} runs had an activation above fp16's largest value ({FP16_MAX:g}) at some "
            "check: an instability GroupNorm can hide from the loss.", "",
            *mechanism_table(runs), ""]

"""
The never-censored grid's report (``report.md``), built from its compact per-run results alone
(``runner.compact_results``: what ``docs/ablation/`` ships), so anyone can rebuild it byte for
byte: the pre-registered tests with the step-0 value of the same contrast beside each, the tests
cell by cell, the 2x2 factorial, every failure definition's count (start-neutral ones marked),
where each arm starts and ends, the mechanism, the init memory and the symmetry runs. Every
sentence is worded from the numbers it states; the statistics are ``inference``'s.
"""

import math
import os
import statistics
import subprocess

from .definitions import DEFINITIONS, start_neutral
from .endpoints import endpoint_tests, final_loss_blocks
from .grid import cell_label, cell_matches, tested_cells
from .inference import ALPHA, contrasts, final_loss_test, verdict
from .record import FP16_MAX, UPDATE_STEPS, largest
from .report import symmetry_table, symmetry_words


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
    return "-" if v is None else "inf" if v == math.inf else f"{v:.{digits}g}"


def _signed(v, digits=4):
    if v is None or not math.isfinite(v):
        return "-"
    return f"{v:+.{digits}f}" if abs(v) < 100 else f"{v:+.3g}"


def _start(r):
    """The held-out L_simple of the run's untrained model (its step-0 check)."""
    return r["checks"]["mse"][0] if r["checks"]["mse"] else None


# --------------------------------------------------------------------------- the tests


def start_contrast(runs, spec):
    """The median over (cell, seed) of the test's contrast on the untrained models' held-out
    L_simple: how far apart the arms start on the endpoint's own scale."""
    blocks, _ = final_loss_blocks(runs, spec, value=_start)
    d, _ = contrasts(blocks, spec["pairs"])
    return statistics.median(d) if d else None


def contrast_over_checks(runs, spec):
    """[(step, median contrast)] of the test's contrast on the held-out L_simple at every check
    (a stopped run ranked worst at every check): whether a gap closes or holds."""
    steps = max((r["checks"]["steps"] for r in runs), key=len, default=[])
    out = []
    for i, step in enumerate(steps):
        blocks, _ = final_loss_blocks(runs, spec, value=lambda r, i=i: r["checks"]["mse"][i]
                                      if i < len(r["checks"]["mse"]) and not r["stopped"] else None)
        d, _ = contrasts(blocks, spec["pairs"])
        out.append((step, statistics.median(d) if d else None))
    return out


def stratum_tests(runs, spec, margin):
    """The test of ``spec`` in each of its cells alone (descriptive: is the result one cell's?)."""
    return [(cell_label(cell), final_loss_test(final_loss_blocks(runs, {**spec, "cells": [cell]})[0], spec["pairs"],
                                               margin)) for cell in tested_cells(spec)]


def _contrast_name(spec):
    return " and ".join(f"{a} - {b}" for a, b in spec["pairs"])


def _names(spec):
    """The two sides a verdict names: the arms, or for a factorial contrast the zeroed and default
    levels of the factor."""
    return None if len(spec["pairs"]) == 1 else ("zeroed", "default")


def test_sentence(label, t, p, start):
    """One pre-registered test in words, every number from ``t``."""
    holm = f", Holm-adjusted p = {p:.2g}" if "p_holm" in t else ""
    tost = "" if t["p_equivalence"] is None else f", TOST p = {t['p_equivalence']:.2g} against +-{t['margin']:g}"
    return (f"- {label}: {t['name']}. Contrast {_contrast_name(t)} of the final loss over {t['n']} (cell, seed) "
            f"pairs, {t['imputed']} stopped run(s) ranked worst: median {_signed(t['median'])}, mean "
            f"{_signed(t['mean'])} [95% CI {_signed(t['low'])}, {_signed(t['high'])}]; the same contrast at step 0: "
            f"median {_signed(start)}. Wilcoxon p = {t['p']:.2g}{holm}{tost}: **{verdict(t, p=p, names=_names(t))}**.")


def _all_stopped(runs, spec):
    """The arms of ``spec`` every one of whose runs in its cells stopped."""
    arms = {a for pair in spec["pairs"] for a in pair}
    mine = [r for r in runs if r["arm"] in arms and any(cell_matches(r["cell"], c) for c in tested_cells(spec))]
    return sorted(a for a in arms if (rs := [r for r in mine if r["arm"] == a]) and all(r["stopped"] for r in rs))


def trend_words(series):
    """Whether a contrast that ends on one side was larger on that side earlier (a gap closing)."""
    (_, end), later = series[-1], [(s, v) for s, v in series[1:] if v is not None]
    same = [(s, v) for s, v in later if v * end > 0]
    step, peak = max(same, key=lambda sv: abs(sv[1]), default=(series[-1][0], end))
    if abs(end) < 0.9 * abs(peak):
        return (f"its median contrast was largest at step {step} ({_signed(peak)}) and shrank to {_signed(end)} by "
                f"step {series[-1][0]}: it may be a head start that longer runs close; these runs do not say whether "
                "it closes")
    return f"its median contrast at step {series[-1][0]} ({_signed(end)}) is as large as at any earlier check"


def supported_lines(data, tests):
    """One line per pre-registered test saying what it supports, worded from its numbers."""
    runs, out = data["runs"], []
    named = [tests["primary"]] * bool(tests["primary"]) + tests["secondary"]
    if not named:
        return ["This grid pre-registers no test: everything below is descriptive."]
    for t in named:
        p = t.get("p_holm", t["p"])
        stopped = _all_stopped(runs, t)
        if stopped:
            out.append(f"- {t['name']}: every run of {', '.join(stopped)} stopped (a non-finite loss or the guard), "
                       f"so this test says that {', '.join(stopped)} does not train here, not how well it trains.")
        elif p < ALPHA:
            out.append(f"- {t['name']}: {verdict(t, p=p, names=_names(t))}, by {abs(t['mean']):.4f} held-out "
                       f"L_simple on average after {max(r['steps'] for r in runs)} steps (95% CI {_signed(t['low'])} "
                       f"to {_signed(t['high'])}); "
                       f"{trend_words(contrast_over_checks(runs, t))}.")
        elif t["p_equivalence"] is not None and t["p_equivalence"] < ALPHA:
            out.append(f"- {t['name']}: the arms are equivalent within +-{t['margin']:g}.")
        else:
            out.append(f"- {t['name']}: not resolved. Neither a difference nor equivalence within +-{t['margin']:g}: "
                       f"the contrasts run from {_signed(t['low'])} to {_signed(t['high'])} (95% CI of the mean).")
    return out


def tests_section(data, tests):
    runs, margin = data["runs"], tests["equivalence_margin"]
    md = ["## The pre-registered tests", "",
          "The endpoint is the final loss: the mean held-out L_simple of the last 3 checks (a stopped run ranks "
          f"worst). Alpha {ALPHA:g}; the secondaries are Holm-corrected among themselves; equivalence means both "
          f"one-sided tests against +-{margin:g} reject and no run in the test stopped.", ""]
    named = [("Primary", tests["primary"])] * bool(tests["primary"]) + [("Secondary", t) for t in tests["secondary"]]
    for label, t in named:
        md.append(test_sentence(label, t, t.get("p_holm", t["p"]), start_contrast(runs, t)))
    steps = [s for s, _ in contrast_over_checks(runs, named[0][1])] if named else []
    md += ["", "### Each test's contrast at every check (median over pairs, descriptive)", "",
           "Whether a difference closes as training goes on (a head start) or holds.", "",
           "| test | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---|" * len(steps)]
    md += [f"| {t['name']} | " + " | ".join(_signed(v) for _, v in contrast_over_checks(runs, t)) + " |"
           for _, t in named]
    md += ["", "### Each test cell by cell (descriptive, not corrected)", "",
           "| test | cell | pairs | median contrast | mean [95% CI] | Wilcoxon p |", "|---|---|---|---|---|---|"]
    for _, t in named:
        for label, s in stratum_tests(runs, t, margin):
            md.append(f"| {t['name']} | {label} | {s['n']} | {_signed(s['median'])} | {_signed(s['mean'])} "
                      f"[{_signed(s['low'])}, {_signed(s['high'])}] | {s['p']:.2g} |")
    return md + [""]


# --------------------------------------------------------------------------- descriptive tables


def completeness_words(runs):
    stopped = [r for r in runs if r["stopped"]]
    steps = sorted({r["steps"] for r in runs if not r["stopped"]})
    words = (f"{len(runs) - len(stopped)} of {len(runs)} runs reached max_steps ({', '.join(map(str, steps))}); "
             f"{len(stopped)} stopped early (a non-finite loss or the guard, the only rules that stop a run)")
    by = _groups(stopped)
    if by:
        words += ": " + "; ".join(f"{arm} at {cell} {len(rs)}x ({rs[0]['stopped']})" for (cell, arm), rs in by.items())
    return words + "."


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
        stopped = sum(bool(r["stopped"]) for r in rs)
        lines.append(f"| {cell} | {arm} | {_fmt(_median([_start(r) for r in rs]))} | "
                     f"{_fmt(_median([r.get('final_loss') for r in rs]))} | {stopped}/{len(rs)} |")
    return lines


FACTORIAL = ("zero", "zero-branches", "zero-output", "standard")


def factorial_table(runs):
    """Per cell that runs the four factorial arms: each arm's mean final loss, and the two main
    effects (zeroed - default, averaged over the other factor and the seeds)."""
    lines = ["| cell | " + " | ".join(FACTORIAL) + " | branch ends zeroed - default | output conv zeroed - default |",
             "|---|---|---|---|---|---|---|"]
    cells = {}
    for r in runs:
        cells.setdefault(cell_label(r["cell"]), []).append(r)
    branch_pairs = [["zero", "zero-output"], ["zero-branches", "standard"]]
    for cell, rs in cells.items():
        if {r["arm"] for r in rs} != set(FACTORIAL):
            continue
        blocks, _ = final_loss_blocks(rs, {"pairs": branch_pairs, "cells": [rs[0]["cell"]]})
        means = [_fmt(statistics.fmean(b[a] for b in blocks)) for a in FACTORIAL]
        branch, _ = contrasts(blocks, branch_pairs)
        output, _ = contrasts(blocks, [["zero", "zero-branches"], ["zero-output", "standard"]])
        lines.append(f"| {cell} | " + " | ".join(means) + f" | {_signed(statistics.fmean(branch))} | "
                     f"{_signed(statistics.fmean(output))} |")
    return lines


def _mech_rows(r):
    return r["mechanism"]["rows"] or []


def mechanism_table(runs):
    """Per (cell, arm): runs whose activations overflowed fp16, medians over runs of the largest
    |activation|, ResBlock output RMS and middle-attention logit seen, the branch ends' weight RMS at
    the end, and the update-to-weight ratio of the branch ends and the output conv at the first steps."""
    lines = ["| cell | arm | fp16 overflow | max abs activation | max block RMS | max attention logit | "
             "branch-end weight RMS at the end | "
             + " | ".join(f"update/weight step {s} (branch ends, output)" for s in UPDATE_STEPS) + " |",
             "|" + "---|" * (7 + len(UPDATE_STEPS))]
    for (cell, arm), rs in _groups(runs).items():
        rows = [_mech_rows(r) for r in rs]
        biggest = [largest(x["max_abs_activation"] for x in rw) for rw in rows if rw]
        overflow = sum(bool(r["mechanism"]["fp16_overflow"]) for r in rs)  # the recorder's own verdict
        block = _median([largest(x["max_block_rms"] for x in rw) for rw in rows if rw])
        logit = _median([largest(x["max_logit"] for x in rw) for rw in rows if rw and None not in
                         [x["max_logit"] for x in rw]])
        end_rms = _median([rw[-1]["weight_rms"].get("branch_ends") for rw in rows if rw])
        updates = []
        for s in UPDATE_STEPS:
            got = [g for g in (r["mechanism"]["updates"].get(str(s)) for r in rs) if g]
            updates.append(f"{_fmt(_median([g.get('branch_ends') for g in got]), 2)}, "
                           f"{_fmt(_median([g.get('output') for g in got]), 2)}")
        lines.append(f"| {cell} | {arm} | {overflow}/{len(rs)} | {_fmt(_median(biggest), 3)} | {_fmt(block, 3)} | "
                     f"{_fmt(logit, 3)} | {_fmt(end_rms, 3)} | " + " | ".join(updates) + " |")
    return lines


def overflow_words(runs):
    """fp16 overflows per arm over every cell (the recorder's verdict on each run)."""
    arms = {}
    for r in runs:
        k, n = arms.get(r["arm"], (0, 0))
        arms[r["arm"]] = (k + bool(r["mechanism"]["fp16_overflow"]), n + 1)
    per = ", ".join(f"{arm} {k}/{n}" for arm, (k, n) in arms.items())
    total = sum(k for k, _ in arms.values())
    return (f"{total} of {len(runs)} runs had an activation above fp16's largest value ({FP16_MAX:g}) at some check "
            f"(by arm: {per}); GroupNorm can hide such an instability from the loss, so it is reported as an outcome.")


def memory_section(study):
    """How far the zero and standard arms' zeroed layers still differ at the end, relative to the
    init's difference (``init_study.init_memory``)."""
    if not study:
        return ["## Init memory", "", "Not measured for this grid (`python ablation.py --init_study` adds it).", ""]
    mem = study["memory"]
    ends = ", ".join(f"{r[-1]:.2f} at lr {lr}" for lr, r in mem["ratio"].items())
    md = ["## Init memory (descriptive)", "",
          f"RMS difference between the `zero` and `standard` runs' weights of the layers zero init zeroes (branch "
          f"ends, `proj_out`, the output conv; same seed and batches, {mem['panel']}), over standard's init RMS of "
          f"those weights: 1 at step 0, 0 when training has erased the init's difference. After "
          f"{mem['steps'][-1]} steps: {ends}.", "",
          "| lr | " + " | ".join(f"step {s}" for s in mem["steps"]) + " |", "|---|" + "---|" * len(mem["steps"])]
    md += [f"| {lr} | " + " | ".join(f"{v:.2f}" for v in ratio) + " |" for lr, ratio in mem["ratio"].items()]
    return md + [""]


def symmetry_section(symmetry):
    return ["## Why zero init is not the all-zero pitfall", "", *symmetry_table(symmetry), "",
            symmetry_words(symmetry), ""]


def preregistration_words(name, root="."):
    """The commits of ``docs/ablation/NAME_preregistration.md`` (oldest first) from git, so the
    report names the commits that precede its data."""
    path = os.path.join("docs", "ablation", f"{name}_preregistration.md")
    if not os.path.isfile(os.path.join(root, path)):
        return f"No pre-registration (`{path}` does not exist): nothing here is a pre-registered result."
    try:
        out = subprocess.run(["git", "log", "--reverse", "--format=%h %cs %s", "--", path], cwd=root,
                             capture_output=True, text=True, check=True, timeout=30).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        out = []
    commits = [line.split(" ", 2) for line in out if line.strip()]
    if not commits:
        return f"Pre-registration: `{path}` (its commits are in the repository's history)."
    return f"Pre-registration: `{path}`, committed in " + "; ".join(
        f"{h} ({d}{', first' if i == 0 else ''})" for i, (h, d, *_) in enumerate(commits)) + "."


# --------------------------------------------------------------------------- the report


def report_lines(data, plots, prereg):
    runs, ab, tests = data["runs"], data["ablation"], endpoint_tests(data)
    invocations = {}
    for r in runs:
        invocations[r["invocation"]] = invocations.get(r["invocation"], 0) + 1
    seconds = sum(r["seconds"] or 0 for r in runs)
    return [
        f"# Does zero init change how well the U-Net trains? The `{data['name']}` grid", "",
        f"Built from the compact per-run results alone by `{data.get('report_command', '')}`. {prereg} Runs: "
        f"`{data.get('command', '')}` in {len(invocations)} invocation(s) ("
        + ", ".join(f"{k}: {n} runs" for k, n in invocations.items())
        + f"), {seconds / 60:.1f} min of training summed over runs. {completeness_words(runs)}", "",
        "## What these numbers support", "", *supported_lines(data, tests), "",
        *tests_section(data, tests),
        "## The 2x2 factorial: mean final loss per arm (descriptive)", "", *factorial_table(runs), "",
        "## Where each arm starts and ends (held-out L_simple, medians over seeds)", "",
        f"![held-out curves]({os.path.basename(plots['curves'])})", "",
        f"![final loss against lr]({os.path.basename(plots['final'])})", "", *start_and_end_table(runs), "",
        "## Failure definitions, scored from the full records (descriptive)", "",
        "Definitions marked descriptive are not start-neutral (an untrained model of some arm fails them), so no test "
        "reads them.", "", *[f"- `{n}`: {DEFINITIONS[n][2]}" for n in DEFINITIONS], "", *definitions_table(runs), "",
        "## Mechanism (descriptive, every run)", "", overflow_words(runs), "",
        "The update-to-weight ratio is the RMS of a step's change over the RMS of the weights before it; '-' where "
        "those weights were all zero (the ratio is undefined), 0 where the step did not move them.", "",
        *mechanism_table(runs), "",
        *memory_section(data.get("init_study")),
        *symmetry_section(data.get("symmetry")),
        f"Equivalence margin: {ab['equivalence_margin']:g} held-out L_simple; seeds "
        f"{', '.join(map(str, ab['seeds']))}.",
        "",
    ]


def write_answer_report(data, out_dir, root="."):
    """
    Write ``report.md`` and its plots into ``out_dir`` from compact results.

    :param data: ``runner.compact_results``' dict (name, command, ablation, runs, symmetry, init_study).
    :param root: the repository, whose git history names the pre-registration commits.
    :return: the paths written.
    """
    from .answer_plots import plot_curves, plot_final_loss

    os.makedirs(out_dir, exist_ok=True)
    plots = {"curves": plot_curves(data["runs"], os.path.join(out_dir, "held_out_curves.png")),
             "final": plot_final_loss(data["runs"], os.path.join(out_dir, "final_loss.png"))}
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(report_lines(data, plots, preregistration_words(data["name"], root))))
    return [path, *plots.values()]

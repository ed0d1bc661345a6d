"""The never-censored grid's report on hand-made compact results: its sentences follow the numbers
(a reversed effect reverses the verdict, an effect inside the margin is equivalence, a stopped run
ranks worst), the step-0 contrast is reported beside the final one, and the same data rebuild the
same bytes. The shipped grid's committed report rebuilds byte-identical from its committed runs."""

import gzip
import json
import os

import pytest

from unet.ablation.answer import FACTORIAL, write_answer_report
from unet.ablation.grid import load_ablation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CELLS = [{"norm": "group", "lr": 0.01}, {"norm": "group", "lr": 0.03}]
SPEC = {"name": "zero against standard", "measure": "final_loss", "arms": ["zero", "standard"],
        "pairs": [["zero", "standard"]], "cells": [{"norm": "group", "lr": [0.01, 0.03]}]}
BRANCHES = {"name": "branch ends", "measure": "final_loss", "arms": ["zero", "zero-output"],
            "pairs": [["zero", "zero-output"], ["zero-branches", "standard"]],
            "cells": [{"norm": "group", "lr": [0.01, 0.03]}]}


def run(cell, arm, seed, final, start, stopped=None):
    checks = [start, (start + final) / 2, final, final, final]
    return {"run_id": f"{arm}_{cell['lr']}_{seed}", "cell_id": "c", "cell": cell, "arm": arm, "seed": seed,
            "invocation": "inv-1", "stopped": stopped, "final_loss": None if stopped else final,
            "verdicts": {"diverged": bool(stopped), "late_rise": bool(stopped), "spike": bool(stopped),
                         "old_rule": arm.startswith("zero"), "early_progress": arm.startswith("zero")},
            "zero_predictor_loss": 1.0, "steps": 4 if not stopped else 1, "seconds": 1.0,
            "checks": {"steps": [0, 1, 2, 3, 4], "mse": checks if not stopped else checks[:1]},
            "curves": {"mse": [1.0, 0.5, 0.4, 0.3]},
            "mechanism": {"updates": {"1": {"branch_ends": 0.01, "output": 0.02}}, "fp16_overflow": False,
                          "rows": [{"step": 0, "weight_rms": {"branch_ends": 0.0}, "max_abs_activation": 3.0,
                                    "max_block_rms": 1.0, "max_logit": 2.0}]}}


def data(effect, noise=0.001, stop=None):
    """Six seeds of the four factorial arms in two cells: ``zero`` ends ``effect`` above
    ``standard`` (seed-dependent jitter ``noise``), starts 0.1 below it; ``stop``: (arm, seed) stopped."""
    runs = []
    for cell in CELLS:
        for seed in range(6):
            jitter = noise * ((seed * 7 + int(cell["lr"] * 100)) % 5 - 2)
            for arm in FACTORIAL:
                final = 0.1 + (effect + jitter if arm == "zero" else 0.0)
                start = 1.0 if arm in ("zero", "zero-output") else 1.1
                runs.append(run(cell, arm, seed, final, start,
                                stopped="non-finite loss at step 1" if stop == (arm, seed) else None))
    return {"name": "hand", "command": "python ablation.py --config hand.yaml", "report_command": "rebuild",
            "ablation": {"primary": SPEC, "secondary": [BRANCHES], "equivalence_margin": 0.005,
                         "seeds": list(range(6))},
            "symmetry": None, "init_study": None, "runs": runs}


def report(tmp_path, d, name="out"):
    write_answer_report(d, str(tmp_path / name))
    return open(tmp_path / name / "report.md").read()


def primary_line(md):
    return next(line for line in md.splitlines() if line.startswith("- Primary"))


def test_the_verdict_follows_the_numbers(tmp_path):
    higher = primary_line(report(tmp_path, data(+0.02), "a"))
    lower = primary_line(report(tmp_path, data(-0.02), "b"))
    same = primary_line(report(tmp_path, data(0.0, noise=0.0002), "c"))
    # 12 pairs all the same sign: the exact Wilcoxon p is 2 / 2**12
    assert "Wilcoxon p = 0.00049" in higher and "**standard ends lower (p = 0.00049)**" in higher
    assert "**zero ends lower (p = 0.00049)**" in lower
    assert "median +0.0200" in higher and "median -0.0200" in lower
    assert "**equivalent within +-0.005" in same
    # the untrained models' contrast on the same scale, beside the final one
    assert all("the same contrast at step 0: median -0.1000" in line for line in (higher, lower, same))


def test_a_stopped_run_ranks_worst_and_rules_out_equivalence(tmp_path):
    md = report(tmp_path, data(0.0, noise=0.0002, stop=("zero", 3)))
    line = primary_line(md)
    assert "2 stopped run(s) ranked worst" in line and "TOST" not in line and "equivalent" not in line
    assert "46 of 48 runs reached max_steps (4); 2 stopped early" in md
    assert "zero at norm=group, lr=0.01 1x (non-finite loss at step 1)" in md


def test_the_factorial_contrast_and_table(tmp_path):
    md = report(tmp_path, data(+0.02, noise=0.0))
    # zero - zero-output = +0.02, zero-branches - standard = 0: the branch-end contrast is +0.01 per pair
    branch = next(line for line in md.splitlines() if line.startswith("- Secondary"))
    assert "median +0.0100" in branch and "**default ends lower" in branch
    assert "| norm=group, lr=0.01 | 0.12 | 0.1 | 0.1 | 0.1 | +0.0100 | +0.0100 |" in md
    # the primary's contrast at every check: a head start of -0.1 turned into +0.02
    assert "| zero against standard | -0.1000 | -0.0400 | +0.0200 | +0.0200 | +0.0200 |" in md


def test_the_same_data_rebuild_the_same_bytes(tmp_path):
    d = data(+0.02)
    write_answer_report(d, str(tmp_path / "one"))
    write_answer_report(json.loads(json.dumps(d)), str(tmp_path / "two"))
    for name in ("report.md", "held_out_curves.png", "final_loss.png"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


FASHION = os.path.join(ROOT, "docs", "ablation", "fashion_runs.json.gz")
SHIPPED = os.path.join(ROOT, "docs", "ablation", "fashion", "report.md")


def test_the_shipped_grid_is_the_preregistered_design():
    """The four factorial arms and the warmup factor at the edge on GroupNorm, the no-norm deep panel
    with kaiming and fixup, on Fashion-MNIST, with the pre-registered primary and five secondaries."""
    from unet.ablation.grid import expand

    ab = load_ablation(os.path.join(ROOT, "configs", "ablation", "fashion.yaml"))
    runs = expand(ab, "out")
    assert {r.cfg.dataset for r in runs} == {"fashion_mnist"} and len(runs) == 176
    a = {(r.cfg.lr, r.cfg.warmup_steps, r.arm) for r in runs if r.cfg.norm == "group"}
    assert {arm for *_, arm in a} == set(FACTORIAL) and {w for _, w, _ in a} == {0, 100}
    b = {r.arm for r in runs if r.cfg.norm == "none" and r.cfg.num_res_blocks == 4}
    assert b == {"kaiming", "fixup", "zero", "standard"}
    assert ab.primary["arms"] == ["zero", "standard"] and len(ab.secondary) == 5
    assert ab.equivalence_margin == 0.0012 and all(r.cfg.max_steps == 500 for r in runs)


@pytest.mark.skipif(not os.path.isfile(SHIPPED), reason="the fashion grid's report is not committed yet")
def test_the_shipped_report_rebuilds_byte_identical_from_its_runs(tmp_path):
    from unet.cli.ablation import main

    with gzip.open(FASHION, "rt") as f:
        runs = json.load(f)["runs"]
    assert all(r["stopped"] or r["steps"] == 500 for r in runs)
    out = tmp_path / "fashion"
    os.chdir(ROOT)  # the report names the pre-registration commits from the repository's history
    assert main(["--report_only", "--results", "docs/ablation/fashion_runs.json.gz", "--output_dir", str(out)]) == 0
    rebuilt = (out / "report.md").read_text().replace(str(out), "docs/ablation/fashion")
    assert rebuilt == open(SHIPPED).read()

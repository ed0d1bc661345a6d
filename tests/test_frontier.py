"""The learning-rate frontier measures on hand-made sweeps with known answers."""

import math

import pytest

from unet.ablation.inference import seed_paired_verdict
from unet.ablation.summary import (
    SweepRun,
    arm_measures,
    best,
    early_losses,
    frontier_summary,
    holm,
    lr_sensitivity,
    max_stable_lr,
    max_trainable_lr,
    paired_test,
    seed_curves,
    sweep_runs,
)

LRS = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
PANEL = (("norm", "none"), ("num_res_blocks", 2))


def sweep(arm, seed, finals, initial=1.0, early=None):
    """One seed's sweep over LRS; a final of None is a failed run."""
    return [SweepRun(PANEL, arm, seed, lr, f is None, f, initial, early or {}) for lr, f in zip(LRS, finals)]


def test_max_stable_lr_is_the_largest_finished_lr():
    assert max_stable_lr(sweep("zero", 0, [0.5, 0.4, 0.3, None, None])) == 1e-3
    assert max_stable_lr(sweep("zero", 0, [0.5, 0.4, 0.3, 0.35, 0.6])) == 1e-2
    assert max_stable_lr(sweep("zero", 0, [None] * 5)) is None
    # a run that finishes above its initial loss (1.0) is stable by the rule but has not trained
    curve = sweep("zero", 0, [0.5, 0.4, 1.3, None, None])
    assert (max_stable_lr(curve), max_trainable_lr(curve)) == (1e-3, 3e-4)
    assert max_trainable_lr(sweep("zero", 0, [1.2, None, None, None, None])) is None


def test_sensitivity_with_one_cap_for_every_arm():
    # An arm whose loss starts higher (1.2) is credited by its own cap; the common cap (the zero
    # predictor's 1.0) scores the same finals alike: min(final, 1.0) = 0.5, 1.0, 1.0 -> 0.8333 - 0.5.
    high_start = sweep("standard", 0, [0.5, 1.1, None, 0.5, 0.5], initial=1.2)
    assert lr_sensitivity(high_start, cap=1.0) == pytest.approx((0.5 + 1.0 + 1.0 + 0.5 + 0.5) / 5 - 0.5, abs=1e-12)
    assert lr_sensitivity(high_start) == pytest.approx((0.5 + 1.1 + 1.2 + 0.5 + 0.5) / 5 - 0.5, abs=1e-12)


def test_sensitivity_follows_wortsman_definition():
    # min(final, initial) per lr: 0.5, 0.4, 0.3, 1.0 (diverged -> initial), 1.0 (1.2 capped at 1.0);
    # mean 3.2 / 5 = 0.64; best 0.3 -> sensitivity 0.34.
    curve = sweep("zero", 0, [0.5, 0.4, 0.3, None, 1.2])
    assert lr_sensitivity(curve) == pytest.approx(0.34, abs=1e-12)
    # A flat curve has sensitivity 0.
    assert lr_sensitivity(sweep("zero", 0, [0.3] * 5)) == pytest.approx(0.0, abs=1e-12)
    assert best(curve) == (1e-3, 0.3)
    assert lr_sensitivity(sweep("zero", 0, [None] * 5)) is None


def test_arm_measures_known_frontier():
    runs = (sweep("zero", 0, [0.5, 0.4, 0.3, 0.35, None]) + sweep("zero", 1, [0.5, 0.4, 0.32, None, None])
            + sweep("zero", 2, [0.5, 0.4, 0.31, 0.36, None]))
    m = arm_measures(seed_curves(runs)[(PANEL, "zero")])
    assert m["max_stable_lr"] == 1e-3  # seed 1 failed at 3e-3
    assert m["per_seed"]["max_stable_lr"] == {0: 3e-3, 1: 1e-3, 2: 3e-3}
    assert m["opt_lr"] == 1e-3
    assert m["failed"][1e-2] == (3, 3) and m["failed"][3e-3] == (1, 3) and m["failed"][1e-4] == (0, 3)
    mean, half = m["best_loss"]
    assert mean == pytest.approx(0.31, abs=1e-12)
    # sd of (0.30, 0.32, 0.31) is 0.01: half = t(0.975, 2) * 0.01 / sqrt(3)
    assert half == pytest.approx(4.302652729911275 * 0.01 / math.sqrt(3), rel=1e-9)
    assert m["log10_opt_lr"][0] == pytest.approx(-3.0)


def test_paired_test_and_holm():
    a = {0: 0.30, 1: 0.32, 2: 0.31, 3: None}
    b = {0: 0.40, 1: 0.41, 2: 0.43, 3: 0.5}
    t = paired_test(a, b)
    assert t["n"] == 3
    assert t["mean"] == pytest.approx(-0.1033333333, abs=1e-9)
    assert 0 < t["p"] < 0.05
    assert paired_test({0: 1.0, 1: 1.0}, {0: 1.0, 1: 1.0})["p"] == 1.0
    # Holm on (0.01, 0.04, 0.03, 0.2): sorted 0.01*4, 0.03*3, 0.04*2, 0.2*1 -> 0.04, 0.09, 0.09 (monotone), 0.2
    assert holm([0.01, 0.04, 0.03, 0.2]) == pytest.approx([0.04, 0.09, 0.09, 0.2])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])


def test_early_losses_pick_the_requested_lr():
    runs = [SweepRun(PANEL, "zero", 0, lr, False, 0.3, 1.0, {10: lr * 100}) for lr in LRS]
    curves = seed_curves(runs)[(PANEL, "zero")]
    assert early_losses(curves, [10, 50], 1e-3) == {10: {0: pytest.approx(0.1)}, 50: {0: None}}


def result_runs(finals_by_arm, initial=1.0, panel=None, lrs=LRS):
    """results.json-style runs: {arm: {seed: [final or None per lr]}}."""
    runs = []
    for arm, seeds in finals_by_arm.items():
        for seed, finals in seeds.items():
            for lr, f in zip(lrs, finals):
                runs.append(dict(cell={**(panel or {"norm": "none"}), "lr": lr}, arm=arm, seed=seed,
                                 config={"lr": lr}, curves={"mse": [initial]},
                                 measures={"failed": f is None, "final_eval_mse": f, "loss_at_10": 0.9}))
    return runs


def test_sweep_runs_read_the_results_and_drop_lr_from_the_panel():
    runs = sweep_runs({"runs": result_runs({"zero": {0: [0.5, None, 0.3, 0.3, 0.3]}})})
    assert [r.lr for r in runs] == LRS and all(r.panel == (("norm", "none"),) for r in runs)
    assert runs[1].failed and runs[1].final_loss is None and runs[0].early == {10: 0.9}


def test_frontier_summary_known_frontier_and_holm_family():
    # zero finishes up to 3e-3 in every seed, standard only up to 1e-3: max stable lr x3 in every
    # seed, an exact shift (p = 0); the best losses differ by noise.
    zero = {s: [0.6, 0.5, 0.4 + 0.01 * s, 0.45, None] for s in range(5)}
    standard = {s: [0.6, 0.45 + 0.02 * (s % 2), 0.5, None, None] for s in range(5)}
    fs = frontier_summary(sweep_runs({"runs": result_runs({"zero": zero, "standard": standard})}),
                          [("zero", "standard")], [10])
    (panel,) = fs["panels"]
    z, st = panel["arms"]["zero"], panel["arms"]["standard"]
    assert (z["max_stable_lr"], st["max_stable_lr"]) == (3e-3, 1e-3)
    assert z["by_lr"][1e-2] == {
        "mean": pytest.approx(float("nan"), nan_ok=True),
        "ci": pytest.approx(float("nan"), nan_ok=True),
        "n": 0,
        "failed": 5,
        "runs": 5,
    }
    tests = {t["measure"]: t for t in panel["tests"]}
    assert (
        tests["log10_max_stable_lr"]["mean"] == pytest.approx(math.log10(3))
        and tests["log10_max_stable_lr"]["p"] == 0.0
    )
    assert tests["log10_max_stable_lr"]["verdict"] == "zero better"
    # every early loss equal (0.9): no evidence, and the family counts only tests with >= 2 pairs
    assert tests["loss_at_10"]["verdict"] == "no detectable difference" and tests["loss_at_10"]["lr"] == 3e-4
    assert (z["max_trainable_lr"], st["max_trainable_lr"]) == (3e-3, 1e-3)  # every final below the initial 1.0
    assert fs["tests"] == len(panel["tests"]) == 6
    # Holm: the adjusted p-values are the raw ones scaled by rank, so never smaller
    assert all(t["p_holm"] >= t["p"] for t in panel["tests"])
    # standard's optimum is 3e-4 (mean 0.458 against 0.5 at 1e-3): the early losses are compared there
    assert tests["best_loss"]["mean"] == pytest.approx(0.42 - 0.458, abs=1e-12)


def test_seed_paired_verdict_reads_direction_and_holm():
    t = {"a": "zero", "n": 5, "mean": -0.1, "better": "lower"}
    assert seed_paired_verdict(t, 0.01) == "zero better" and seed_paired_verdict(t, 0.2) == "no detectable difference"
    assert seed_paired_verdict({**t, "better": "higher"}, 0.01) == "zero worse"
    assert seed_paired_verdict({**t, "better": None}, 0.01) == "zero lower"
    assert seed_paired_verdict({**t, "n": 1}, 0.0) == "too few runs to compare"

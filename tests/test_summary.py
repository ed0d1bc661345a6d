"""The ablation's summary on hand-made results: intervals, verdicts, divergence counts and
conclusions that follow the numbers, and the rules the report states read from the results."""

import math

import pytest

from unet.ablation.report import spike_words
from unet.ablation.summary import MEASURES, ci_words, mean_ci, steps_to_threshold, summarize
from unet.utils.stats import paired_differences


def test_t_interval_on_known_numbers():
    # t_{0.975, 2} = 4.303 (tables): [1, 2, 3] has mean 2, s = 1, half-width 4.303 / sqrt(3) = 2.484
    mean, half, n = mean_ci([1.0, 2.0, 3.0])
    assert (mean, n) == (2.0, 3) and half == pytest.approx(2.484, abs=1e-3)
    # t_{0.975, 4} = 2.776: [2, 4, 4, 4, 6] has mean 4, s = sqrt(2), half-width 2.776 * sqrt(2) / sqrt(5) = 1.756
    mean, half, n = mean_ci([2.0, 4.0, 4.0, 4.0, 6.0, float("nan"), None])
    assert (mean, n) == (4.0, 5) and half == pytest.approx(1.756, abs=1e-3)
    assert mean_ci([5.0])[2] == 1 and math.isnan(mean_ci([5.0])[1])


def test_paired_difference_and_verdicts():
    a = {0: 1.0, 1: 2.0, 2: 4.0, 3: None}
    b = {0: 0.5, 1: 1.0, 2: 3.0, 3: 1.0, 4: 2.0}
    diffs = paired_differences(a, b)
    assert diffs == [0.5, 1.0, 1.0]  # seeds 3 (A diverged) and 4 (no A run) have no pair
    mean, half, n = mean_ci(diffs)  # 0.833 +- 4.303 * 0.2887 / sqrt(3) = 0.833 +- 0.717: excludes 0
    assert mean == pytest.approx(0.8333, abs=1e-4) and half == pytest.approx(0.717, abs=1e-3)
    assert ci_words(mean, half, n, "lower", "zero") == "zero worse"
    assert ci_words(-mean, half, n, "lower", "zero") == "zero better"
    assert ci_words(mean, half, n, None, "zero") == "zero higher"
    assert ci_words(*mean_ci([0.5, -1.0, 1.0]), "lower", "zero") == "indistinguishable"
    assert ci_words(*mean_ci([0.5]), "lower", "zero") == "too few runs to compare"


def test_steps_to_threshold_needs_a_full_window():
    losses = [1.0, 0.1, 0.9, 0.5, 0.4, 0.3, float("nan"), 0.2]
    assert steps_to_threshold(losses, 0.5, window=1) == 2
    assert steps_to_threshold(losses, 0.45, window=2) == 5  # means 0.55, 0.5, 0.7, 0.45 -> step 5
    assert steps_to_threshold(losses, 0.25, window=2) == 8  # the NaN step is left out: mean(0.2) at step 8
    assert steps_to_threshold(losses, 0.01, window=2) is None


def run(cell_id, cell, arm, seed, final=None, diverged=False, **config):
    measures = {key: None for key, _, _ in MEASURES}
    measures.update(final_eval_loss=final, final_eval_mse=final, spike_count=0, failed=diverged, diverged=False)
    return dict(cell_id=cell_id, cell=cell, arm=arm, seed=seed, steps=3 if diverged else 10, measures=measures,
                failed=diverged, diverged=False, curves={"mse": [1.0]},
                config={"divergence_factor": 10.0, "divergence_window": 10, **config})


def results(zero, standard, diverging_cell=True, **config):
    """Cell c00 with the given final losses per seed; c01 where every standard run diverged."""
    runs = [run("c00", {}, arm, s, v, **config) for arm, vals in (("zero", zero), ("standard", standard))
            for s, v in enumerate(vals)]
    if diverging_cell:
        runs += [run("c01", {"lr": 0.01}, "zero", s, 1.0 + s, **config) for s in range(3)]
        runs += [run("c01", {"lr": 0.01}, "standard", s, diverged=True, **config) for s in range(3)]
    return {"ablation": {"comparisons": [["zero", "standard"]], "seeds": [0, 1, 2], "threshold": 0.3, "smooth": 10},
            "runs": runs}


def test_summary_of_hand_made_results():
    # zero - standard per seed: -1, -1, -1.5: mean -1.1667, s = 0.2887, half 4.303 * 0.2887 / sqrt(3) = 0.717
    summary = summarize(results([1.0, 2.0, 3.0], [2.0, 3.0, 4.5]))
    base, lr = summary["cells"]
    assert (base["label"], lr["label"]) == ("base", "lr=0.01")
    assert base["arms"]["zero"]["final_eval_loss"] == {"mean": 2.0, "ci": pytest.approx(2.484, abs=1e-3), "n": 3}
    d = base["comparisons"][0]["final_eval_loss"]
    assert d["mean"] == pytest.approx(-7 / 6) and d["ci"] == pytest.approx(0.717, abs=1e-3) and d["n"] == 3
    assert d["verdict"] == "zero better"
    # every standard run of c01 diverged: counted, left out of the measures, Fisher p = 2 / C(6, 3) = 0.1
    arms = lr["arms"]
    assert (arms["standard"]["failed"], arms["standard"]["failed_at"]) == (3, [3, 3, 3])
    assert arms["standard"]["final_eval_loss"]["n"] == 0
    comp = lr["comparisons"][0]
    assert (
        comp["failed"]["p"] == pytest.approx(0.1) and comp["final_eval_loss"]["verdict"] == "too few runs to compare"
    )


def test_report_states_the_rules_the_runs_used():
    res = results([1.0], [1.0])
    res["rules"] = {"spikes": {"factor": 3.0, "window": 20}}
    assert spike_words(res).startswith("steps whose loss is above 3x the median of the previous 20")


def sweep_results(zero_stable, standard_stable, seeds=5):
    """An lr sweep in two panels (norm none and group) of zero and standard init: each arm
    finishes every lr up to index ``*_stable`` (same final losses) and diverges above it."""
    lrs, runs = [1e-3, 3e-3, 1e-2, 3e-2], []
    for norm in ("none", "group"):
        for arm, top in (
            ("zero", zero_stable if norm == "none" else 3),
            ("standard", standard_stable if norm == "none" else 3),
        ):
            for s in range(seeds):
                for i, lr in enumerate(lrs):
                    ok = i <= top
                    r = run(f"{norm}{i}", {"norm": norm, "lr": lr}, arm, s, 0.5 - 0.05 * i + 0.001 * s if ok else None,
                            diverged=not ok, lr=lr)
                    r["measures"].update(initial_loss=1.0, loss_at_10=0.9 + 0.01 * s + (0.05 if arm == "zero" else 0))
                    runs.append(r)
    return {"ablation": {"comparisons": [["zero", "standard"]], "seeds": list(range(seeds)), "threshold": 0.3,
                         "smooth": 10, "early_steps": [10]}, "runs": runs}


def test_frontier_conclusions_follow_the_numbers():
    helps = summarize(sweep_results(zero_stable=2, standard_stable=1))["descriptive"]
    assert helps[0].startswith("**zero vs standard**: zero init helps in norm=none (max stable lr x3")
    assert "no detectable difference in norm=group" in helps[0]
    # the early-training deficit: zero's loss at step 10 is 0.05 higher in every seed (an exact shift)
    assert helps[1] == ("Early training (zero − standard training loss at standard's optimal lr): step 10: zero higher "
                        "in 2, lower in 0, no detectable difference in 0 of 2 panels.")
    assert helps[2].startswith("Direction of the point estimates across panels (zero − standard, significant or not): "
                               "max stable lr: favours zero in 1, favours standard in 0 of 2; ")
    assert "training loss at step 10: favours zero in 0, favours standard in 2 of 2" in helps[2]
    assert helps[3] == ("Largest learning rate at which every seed finished (zero, standard): norm=none: zero 0.01, "
                        "standard 0.003; norm=group: zero 0.03, standard 0.03.")
    assert "Holm's correction over all 12 tests" in helps[-1]
    hurts = summarize(sweep_results(zero_stable=1, standard_stable=2))["descriptive"]
    assert hurts[0].startswith("**zero vs standard**: zero init hurts in norm=none (max stable lr x0.3")
    same = summarize(sweep_results(zero_stable=2, standard_stable=2))["descriptive"]
    assert same[0] == "**zero vs standard**: no detectable difference in norm=none; norm=group."


def test_conclusions_say_when_only_the_optimum_moves():
    lrs, runs = [1e-3, 3e-3, 1e-2], []
    for arm, finals in (("zero", [0.3, 0.4, 0.5]), ("standard", [0.4, 0.3, 0.5])):
        for s in range(5):
            for lr, f in zip(lrs, finals):
                r = run(f"c{lr}", {"norm": "group", "lr": lr}, arm, s, f + 0.001 * s, lr=lr)
                r["measures"].update(initial_loss=1.0, loss_at_10=0.9)
                runs.append(r)
    res = {"ablation": {"comparisons": [["zero", "standard"]], "seeds": list(range(5)), "threshold": 0.3,
                        "smooth": 10, "early_steps": [10]}, "runs": runs}
    lines = summarize(res)["descriptive"]
    # same frontier, same sensitivity and best loss; the optimum is a half-decade lower in every seed
    assert lines[0] == ("**zero vs standard**: it moves the optimal learning rate, and nothing else detectably, in "
                        "norm=group (optimal lr x0.333 [x0.333, x0.333]).")

"""The stability experiment's design: the one failure rule, the pre-registered tests, and the
conclusions worded from them."""

import math

import pytest
import torch

from unet.ablation.endpoints import endpoint_conclusions, endpoint_tests, failure_fractions
from unet.ablation.inference import mcnemar_exact, paired_difference_interval, verdict
from unet.train.diagnostics import FailureRule, zero_predictor_loss


def rows(mse, held_out=None, loss=None):
    """History rows of a hand-made run: per-step mse (and loss), held-out L_simple at some steps."""
    held_out = held_out or {}
    return [{"step": i + 1, "loss": (loss or mse)[i], "mse": m, **({"eval_mse": held_out[i + 1]} if i + 1 in held_out
                                                                  else {})} for i, m in enumerate(mse)]


def first_failure(history, zero_loss=1.0):
    rule = FailureRule(zero_loss, spike_factor=3.0, spike_window=20)
    for row in history:
        if rule.update(row):
            return rule
    return rule


def test_a_healthy_run_does_not_fail():
    rule = first_failure(rows([0.5 + 0.1 * math.sin(i) for i in range(100)], {25: 0.6, 50: 0.4, 75: 0.3, 100: 0.3}))
    assert rule.reason is None and not rule.diverged and rule.spikes.count == 0


def test_an_mse_spike_fails_the_run_only_after_a_full_window():
    early = [0.5] * 10 + [5.0] + [0.5] * 20  # a spike at step 11: fewer than 20 steps before it, not judged
    assert first_failure(rows(early)).reason is None
    late = [0.5] * 20 + [1.6]  # 1.6 > 3 x 0.5 at step 21
    rule = first_failure(rows(late))
    assert rule.step == 21 and rule.reason.startswith(
        "mse spike at step 21: 1.6 above 3x the median of the previous 20"
    )
    assert not rule.diverged
    assert first_failure(rows([0.5] * 20 + [1.4])).reason is None  # under 3x: no spike


def test_a_held_out_loss_above_the_zero_predictor_fails_the_run():
    rule = first_failure(rows([0.5] * 50, {25: 0.9, 50: 1.02}), zero_loss=0.994)
    assert rule.step == 50 and "held-out L_simple 1.02 above the zero predictor's 0.994 at step 50" == rule.reason
    assert first_failure(rows([0.5] * 50, {25: 0.9, 50: 0.99}), zero_loss=0.994).reason is None


def test_a_non_finite_loss_fails_and_counts_as_diverged():
    rule = first_failure(rows([0.5] * 30 + [float("nan")]))
    assert rule.diverged and rule.reason == "non-finite loss at step 31"
    skipped = rows([0.5] * 5)
    skipped[3]["skipped"] = True
    assert first_failure(skipped).diverged
    assert first_failure(rows([0.5] * 25, {25: float("inf")})).diverged


def test_the_zero_predictor_loss_is_the_mean_squared_noise():
    noise = torch.randn(180, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert zero_predictor_loss(noise) == pytest.approx(float(noise.double().pow(2).mean()), rel=1e-12)
    assert zero_predictor_loss(torch.full((4, 3), 2.0)) == 4.0


def pairs(*strata):
    """[(stratum, seed, A failed, B failed)] from per-stratum lists of (A, B) outcomes."""
    return [(f"s{i}", seed, a, b) for i, outcomes in enumerate(strata) for seed, (a, b) in enumerate(outcomes)]


def test_stratified_mcnemar_pools_the_discordant_pairs_with_an_exact_p():
    # b = 1 (A failed, B not), c = 9 over two strata; concordant pairs carry no information.
    t = mcnemar_exact(pairs([(True, False), (False, True), (True, True)] + [(False, True)] * 4,
                            [(False, True)] * 4 + [(False, False)] * 3))
    assert (t["n"], t["b"], t["c"]) == (14, 1, 9)
    assert t["p"] == pytest.approx(2 * 11 / 1024)  # 2 P(X <= 1), X ~ Binomial(10, 1/2)
    assert t["diff"] == pytest.approx(-8 / 14) and t["low"] < t["diff"] < t["high"] < 0
    assert mcnemar_exact(pairs([(True, True), (False, False)]))["p"] == 1.0


def test_the_paired_interval_does_not_collapse_without_discordant_pairs():
    low, high = paired_difference_interval(0, 0, 0, 36)
    assert low < 0 < high and high == pytest.approx(-low) and 0.05 < high < 0.15
    low, high = paired_difference_interval(36, 0, 0, 36)  # every pair failed in both arms
    assert low < 0 < high
    low, high = paired_difference_interval(0, 18, 0, 36)
    assert 0 < low < 0.5 < high <= 1.0


def results(a_fails, b_fails, margin=0.25):
    """A one-stratum primary test with the given per-seed failures of zero (A) and standard (B)."""
    runs = [{"cell": {"norm": "group", "lr": 0.04}, "arm": arm, "seed": s, "failed": f, "diverged": False,
             "config": {"lr": 0.04}, "measures": {"final_eval_mse": None if f else 0.3}}
            for arm, fails in (("zero", a_fails), ("standard", b_fails)) for s, f in enumerate(fails)]
    spec = {
        "name": "edge",
        "measure": "failure",
        "arms": ["zero", "standard"],
        "cells": [{"norm": "group", "lr": [0.04]}],
    }
    return {"runs": runs, "ablation": {"primary": spec, "secondary": [], "equivalence_margin": margin}}


def test_conclusions_follow_the_numbers():
    fewer = endpoint_tests(results([False] * 12, [True] * 10 + [False] * 2))
    assert verdict(fewer["primary"], 0.25) == "zero fails less often than standard"
    assert "**zero fails less often than standard**" in endpoint_conclusions(fewer)[0]
    same = endpoint_tests(results([False] * 40, [False] * 40))
    assert "**equivalent within ±0.25 in failure fraction**" in endpoint_conclusions(same)[0]
    unclear = endpoint_tests(results([True, False, False, False], [False, True, True, False]))
    assert "**not resolved**" in endpoint_conclusions(unclear)[0]
    assert "**not resolved**" in endpoint_conclusions(endpoint_tests(results([False] * 40, [False] * 40, 0.05)))[0]


def test_failure_fractions_carry_exact_intervals():
    f = failure_fractions(results([True] * 3 + [False] * 9, [True] * 12)["runs"])
    zero = next(x for x in f if x["arm"] == "zero")
    assert (zero["failed"], zero["n"]) == (3, 12) and zero["low"] < 0.25 < zero["high"]
    std = next(x for x in f if x["arm"] == "standard")
    assert std["fraction"] == 1.0 and std["high"] == 1.0 and std["low"] == pytest.approx(0.025 ** (1 / 12))

"""The training loop's rules, called directly: counting steps, when to stop, what a log line holds."""

import math

import pytest

from unet.config import TrainConfig
from unet.train.diagnostics import DivergenceMonitor
from unet.train.state import StepRecord, TrainState, finite_mean, log_window, should_stop

NAN = float("nan")


def cfg(**kw):
    return TrainConfig(**{"max_steps": 100, "max_nan_steps": 3, **kw})


def ok(step, loss, **kw):
    return StepRecord(step=step, lr=1e-3, terms={"loss": loss, "mse": loss / 2}, grad_norm=1.0, **kw)


def skipped(step):
    return StepRecord(step=step, lr=1e-3, skipped=True)


def run(records, config):
    """Observe ``records`` in order; the (step, stop reason) of the first stop, else None."""
    state = TrainState(divergence=DivergenceMonitor(config.divergence_factor, config.divergence_window))
    for r in records:
        state.observe(r)
        stop = should_stop(state, r, config)
        if stop:
            return r.step, stop
    return None


def test_nan_steps_are_skipped_until_max_nan_steps_in_a_row():
    c = cfg()
    assert run([ok(1, 1.0), skipped(2), skipped(3), ok(4, 1.0), skipped(5), skipped(6)], c) is None
    assert run([ok(1, 1.0), skipped(2), skipped(3), skipped(4)], c) == (4, "nan")
    state = TrainState(divergence=DivergenceMonitor(0.0))
    for r in [ok(1, 1.0), skipped(2), ok(3, 1.0), skipped(4)]:
        state.observe(r)
    assert (state.nan_skipped, state.nan_streak) == (2, 1)


def test_divergence_factor_stops_at_once_even_at_step_one():
    assert run([skipped(1)], cfg(divergence_factor=10.0)) == (1, "diverged")
    assert run([ok(1, 1.0), ok(2, 10.5)], cfg(divergence_factor=10.0)) == (2, "diverged")
    assert run([ok(1, 1.0), ok(2, 9.5)], cfg(divergence_factor=10.0)) is None
    assert run([ok(1, 1.0), ok(2, 1e9)], cfg(divergence_factor=0.0)) is None  # 0: no level rule
    # the ablation's rule: one batch far above the level is a spike; ten in a row diverge
    window = cfg(divergence_factor=10.0, divergence_window=10)
    assert run([ok(1, 1.0)] + [ok(i, 50.0 if i == 5 else 1.0) for i in range(2, 30)], window) is None
    assert run([ok(i, 1.0) for i in range(1, 7)] + [ok(i, 20.0) for i in range(7, 20)], window) == (11, "diverged")


def test_stop_rules_in_order():
    c = cfg(max_steps=5, divergence_factor=10.0)
    state = TrainState(divergence=DivergenceMonitor(10.0))
    assert should_stop(state, state.observe(ok(1, 1.0)), c) is None
    assert should_stop(state, state.observe(ok(2, 1.0)), c, hook=True) == "hook"
    assert should_stop(state, state.observe(ok(5, 1.0)), c) == "max_steps"
    assert should_stop(state, ok(5, 1.0), c, hook=True) == "hook"  # a hook's stop is reported as such
    assert should_stop(state, state.observe(ok(5, 20.0)), c, hook=True) == "diverged"
    state.nan_streak = 3
    assert should_stop(state, ok(5, 20.0, divergence="x"), c, hook=True) == "nan"


def test_fp16_non_finite_gradient_is_not_divergence():
    state = TrainState(divergence=DivergenceMonitor(10.0))
    r = state.observe(StepRecord(step=1, lr=1e-3, terms={"loss": 1.0}, grad_norm=math.inf), check_grad_norm=False)
    assert r.divergence is None
    r = state.observe(StepRecord(step=2, lr=1e-3, terms={"loss": 1.0}, grad_norm=math.inf))
    assert r.divergence == "non-finite loss or gradient"


def test_rows_and_spikes():
    state = TrainState(divergence=DivergenceMonitor(0.0))
    rows = [state.observe(ok(i, 1.0)).as_dict() for i in range(1, 21)]
    spike = state.observe(ok(21, 5.0)).as_dict()
    bad = state.observe(skipped(22)).as_dict()
    assert spike["spike"] and spike["spike_count"] == 1 and not rows[-1]["spike"]
    assert bad["skipped"] and math.isnan(bad["loss"]) and "grad_norm" not in bad and "spike" not in bad
    assert bad["nan_skipped"] == 1 and bad["spike_count"] == 1
    assert state.divergence.initial_loss == 1.0


def test_log_window_averages_finite_losses_and_reports_the_last_step():
    state = TrainState(divergence=DivergenceMonitor(0.0))
    first = ok(1, 1.0, measures={"residual_ratios": {"b0": 0.5}, "activation_rms": [("b0", 2.0)],
                                 "update_to_weight": 1e-3})
    rows = [state.observe(r).as_dict() for r in (first, skipped(2), ok(3, 3.0, measures={"eval_loss": 0.7}))]
    logged = log_window(rows, images_per_sec=100.0)
    assert logged["train/loss"] == 2.0 and logged["train/mse"] == 1.0  # the skipped step left out
    assert logged["train/grad_norm"] == 1.0 and logged["train/images_per_sec"] == 100.0
    assert logged["stability/nan_skipped"] == 1 and logged["eval/loss"] == 0.7
    assert logged["stability/residual_ratio/b0"] == 0.5 and logged["stability/activation_rms/00_b0"] == 2.0
    assert "stability/update_to_weight" not in logged  # only the logged step's own
    # a window that ends on a skipped step: the loss terms of that row only, grad norm NaN
    only_bad = log_window(rows[:2], images_per_sec=1.0)
    assert set(k for k in only_bad if k.startswith("train/loss")) == {"train/loss"} and "train/mse" not in only_bad
    assert only_bad["train/loss"] == 1.0 and math.isnan(only_bad["train/grad_norm"])
    assert math.isnan(finite_mean([NAN, None])) and finite_mean([1.0, NAN, 2.0]) == 1.5


def test_state_dict_round_trip():
    state = TrainState(divergence=DivergenceMonitor(10.0, 3))
    for r in (ok(1, 2.0), skipped(2), ok(3, 4.0), ok(4, 1.0)):
        state.observe(r)
    state.step = 4
    saved = state.state_dict()
    assert saved["divergence"]["initial_loss"] == 2.0 and saved["divergence"]["recent"] == [2.0, 4.0, 1.0]
    again = TrainState(divergence=DivergenceMonitor(10.0, 3))
    again.load_state_dict(saved)
    assert again.state_dict() == saved
    # the restored window goes on: the median of 4.0, 1.0, 20.5 is under 10x 2.0; of 1.0, 20.5, 25 it is over
    assert again.observe(ok(5, 20.5)).divergence is None
    assert again.observe(ok(6, 25.0)).divergence == "median of 3 losses above 10x the initial loss"


@pytest.mark.parametrize("loss", [NAN, math.inf])
def test_non_finite_loss_row(loss):
    state = TrainState(divergence=DivergenceMonitor(0.0))
    r = state.observe(StepRecord(step=1, lr=0.1, terms={"loss": loss}, grad_norm=1.0))
    assert r.divergence == "non-finite loss or gradient" and state.divergence.initial_loss is None

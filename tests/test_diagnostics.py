"""The stability measures shared by training and the ablation."""

import math

import pytest
import torch

from unet.core.model import UNetModel
from unet.train.diagnostics import (
    DivergenceMonitor,
    SpikeDetector,
    UpdateRatioTracker,
    block_measures,
    block_stats,
    channel_distinctness,
    grad_norm,
    loss_by_quartile,
    snapshot,
    update_to_weight_ratio,
    zeroed_layer_distinctness,
)


def model_for(init, norm="group"):
    torch.manual_seed(0)
    return UNetModel(1, 32, 2, 1, (2,), channel_mult=(1, 2), init=init, norm=norm)


def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 1, 8, 8, generator=g), torch.randint(0, 1000, (4,), generator=g)


def test_block_stats_zero_vs_standard():
    zero = block_stats(model_for("zero"), *inputs())
    standard = block_stats(model_for("standard"), *inputs())
    assert [s["name"] for s in zero] == [n for n, _ in model_for("zero").res_blocks()]
    assert all(s["branch_skip_ratio"] == 0 for s in zero)
    assert all(s["branch_skip_ratio"] > 0.01 for s in standard)
    # the first block's output under zero init is its input: the input conv's output
    m = model_for("zero")
    x, t = inputs()
    h = m.input_blocks[0](x, None)
    assert zero[0]["rms"] == pytest.approx(h.pow(2).mean().sqrt().item(), rel=1e-6)
    measures = block_measures(model_for("zero"), *inputs())  # what training logs, from the same pass
    assert measures["residual_ratios"] == {s["name"]: 0.0 for s in zero}
    assert measures["activation_rms"] == [(s["name"], s["rms"]) for s in zero]


def test_grad_norm_and_update_ratio():
    m = torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        m.weight.fill_(1.0)
    m.weight.grad = torch.full((2, 3), 2.0)
    assert grad_norm(m) == pytest.approx(math.sqrt(6 * 4))
    before = snapshot(m)
    with torch.no_grad():
        m.weight.add_(0.1)
    assert update_to_weight_ratio(before, m) == pytest.approx(0.1)


def test_channel_distinctness():
    assert channel_distinctness(torch.ones(4, 3, 3, 3)) == 0
    assert channel_distinctness(torch.zeros(4, 3)) == 0
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert channel_distinctness(w) == pytest.approx(math.sqrt(2))
    d = zeroed_layer_distinctness(model_for("standard"))
    assert len(d) == 8 + 4 + 1 and all(v > 0.5 for v in d.values())  # ResBlocks, attention, output conv
    assert set(zeroed_layer_distinctness(model_for("zero")).values()) == {0.0}


def test_spike_detector_and_divergence():
    s = SpikeDetector(window=50, factor=2.0)
    flags = [s.update(v) for v in [1.0] * 20 + [2.5, 1.0, 1.9, 5.0]]
    assert flags[20] and flags[-1] and s.count == 2 and not flags[22]
    s2 = SpikeDetector()
    s2.load_state_dict(s.state_dict())
    assert s2.count == 2 and s2.update(3.0)


def diverged(losses, factor=10.0, window=1, grad_norms=None):
    """The first step (1-based) at which a fresh DivergenceMonitor reports, and its reason."""
    m = DivergenceMonitor(factor, window)
    for i, loss in enumerate(losses):
        why = m.update(loss, None if grad_norms is None else grad_norms[i])
        if why:
            return i + 1, why
    return None


def test_divergence_monitor_single_loss_rule():
    nan, inf = float("nan"), float("inf")
    assert diverged([1.0, nan])[0] == 2 and diverged([1.0, inf])[0] == 2 and diverged([1.0, 10.5])[0] == 2
    assert diverged([1.0, 9.5]) is None
    assert diverged([nan])[0] == 1 and diverged([1e6]) is None  # no finite loss seen yet: only non-finite counts
    assert diverged([1.0, 10.5]) == (2, "loss above 10x the initial loss")
    assert diverged([1.0, 1.0], grad_norms=[1.0, inf]) == (2, "non-finite loss or gradient")
    assert diverged([1.0, 1e9], factor=0.0) is None and diverged([1.0, nan], factor=0.0)[0] == 2


def test_divergence_monitor_median_window():
    # One batch far above the level is a spike, not a divergence; a median above it is.
    assert diverged([1.0] * 9 + [50.0] + [1.0] * 20, window=10) is None
    assert diverged([1.0] * 6 + [20.0] * 5, window=10) == (11, "median of 10 losses above 10x the initial loss")
    assert diverged([30.0] * 9, factor=0.1, window=10) is None  # waits for a full window
    assert diverged([1.0, float("nan")], window=10)[0] == 2  # non-finite: at once, whatever the window
    m = DivergenceMonitor(10.0, 10)
    for loss in [1.0] * 5 + [20.0] * 4:
        m.update(loss)
    m2 = DivergenceMonitor(10.0, 10)
    m2.load_state_dict(m.state_dict())
    assert m2.initial_loss == 1.0 and m2.update(20.0) and m2.update(20.0)


def test_update_ratio_tracker():
    m = torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        m.weight.fill_(1.0)
    tracker = UpdateRatioTracker(m)
    with torch.no_grad():
        m.weight.add_(0.1)
    assert tracker.update(m) == pytest.approx(0.1)
    with torch.no_grad():
        m.weight.mul_(2.0)  # measured from the re-snapshot at 1.1: change 1.1 over 1.1
    assert tracker.update(m) == pytest.approx(1.0)
    assert tracker.update(m) == 0.0


def test_loss_by_quartile():
    t = torch.tensor([0, 10, 30, 60, 99])
    losses = torch.tensor([1.0, 3.0, 5.0, 7.0, 9.0])
    assert loss_by_quartile(t, losses, 100) == {"q0": 2.0, "q1": 5.0, "q2": 7.0, "q3": 9.0}

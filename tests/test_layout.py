"""The layout: the fixed rule training and sampling use (unet.core.model), and the timing in
benchmarks/layout.py that chose it."""

import itertools
import os

import pytest
import torch

from benchmarks.layout import (
    MEASURED,
    MIN_CHANNELS_LAST,
    apply_layout,
    choose_layout,
    describe_measurement,
    fastest,
    layout_key,
    layout_report,
)
from unet.core.model import UNetModel


class FakeClock:
    """A clock that advances by the cost of whatever ran since the last reading."""

    def __init__(self):
        self.now, self.pending = 0.0, 0.0

    def __call__(self):
        self.now += self.pending
        self.pending = 0.0
        return self.now


def costing(clock, seconds, calls, name):
    def run():
        calls.append(name)
        clock.pending += seconds.pop(0) if isinstance(seconds, list) else seconds
    return run


def test_fastest_takes_the_lowest_median_alternating_the_order_and_caches_it():
    clock, calls, cache = FakeClock(), [], {}
    # b is faster in 2 of 3 rounds: the median, not the mean (a's one fast round), decides.
    candidates = {"a": costing(clock, [9, 1.0, 3.0, 3.0], calls, "a"),
                  "b": costing(clock, [9, 2.0, 2.0, 2.0], calls, "b")}
    assert fastest(candidates, key="k", repeats=3, timer=clock, cache=cache) == "b"
    # one untimed call each, then rounds in an order that reverses every round
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert cache == {"k": "b"}
    assert fastest({"a": None, "b": None}, key="k", cache=cache) == "b"  # cached: nothing runs


def test_fastest_breaks_ties_by_order():
    clock, calls = FakeClock(), []
    candidates = {"x": costing(clock, 1.0, calls, "x"), "y": costing(clock, 1.0, calls, "y")}
    assert fastest(candidates, timer=clock, cache={}) == "x"


def test_fastest_leaves_the_switch_out_of_the_timing():
    """A costly switch before every call of "a" (converting the weights, for the layout) must
    not make "a" look slower than it is."""
    clock, calls = FakeClock(), []
    candidates = {"a": costing(clock, 1.0, calls, "a"), "b": costing(clock, 2.0, calls, "b")}
    prepare = {"a": costing(clock, 100.0, calls, "switch to a")}
    assert fastest(candidates, repeats=3, timer=clock, cache={}, prepare=prepare) == "a"
    assert calls == ["switch to a", "a", "b"] + ["switch to a", "a", "b", "b", "switch to a", "a",
                                                  "switch to a", "a", "b"]


def rounds_run(calls):
    return (len(calls) - 2) // 2  # after one untimed call of each of the two


def test_fastest_goes_on_until_the_two_are_told_apart():
    # A clear 2x: resolved after the least rounds.
    clock, calls = FakeClock(), []
    candidates = {"a": costing(clock, 1.0, calls, "a"), "b": costing(clock, 2.0, calls, "b")}
    assert fastest(candidates, repeats=3, max_repeats=12, timer=clock, cache={}) == "a"
    assert rounds_run(calls) == 3
    # Noise far larger than the difference: every round allowed is run, then the median decides.
    clock, calls = FakeClock(), []
    candidates = {"a": costing(clock, 1.0, calls, "a"), "b": costing(clock, [1.0] + [0.8, 1.4] * 20, calls, "b")}
    assert fastest(candidates, repeats=3, max_repeats=12, timer=clock, cache={}) == "a"
    assert rounds_run(calls) == 12
    # Known to be within SAME_WITHIN of each other: stops early, neither is worth more rounds.
    clock, calls = FakeClock(), []
    candidates = {"a": costing(clock, 1.0, calls, "a"), "b": costing(clock, [1.0] + [0.995, 1.005] * 20, calls, "b")}
    fastest(candidates, repeats=3, max_repeats=12, timer=clock, cache={})
    assert 3 <= rounds_run(calls) < 12


def test_a_default_keeps_its_place_unless_another_is_measurably_faster():
    # "b" has the lower median but the rounds do not tell the two apart: "a", the default, stays.
    clock, calls = FakeClock(), []
    candidates = {"a": costing(clock, 1.0, calls, "a"), "b": costing(clock, [1.0] + [0.8, 1.1] * 20, calls, "b")}
    assert fastest(candidates, repeats=5, timer=clock, cache={}) == "b"
    clock, calls = FakeClock(), []
    candidates = {"a": costing(clock, 1.0, calls, "a"), "b": costing(clock, [1.0] + [0.8, 1.1] * 20, calls, "b")}
    assert fastest(candidates, repeats=5, timer=clock, cache={}, default="a") == "a"
    # Measurably faster (every round 10% quicker, with some noise): the default gives way.
    clock, calls = FakeClock(), []
    candidates = {"a": costing(clock, 1.0, calls, "a"), "b": costing(clock, [1.0] + [0.88, 0.92] * 20, calls, "b")}
    assert fastest(candidates, repeats=5, timer=clock, cache={}, default="a") == "b"
    # The default wins outright when its own median is lowest.
    clock, calls = FakeClock(), []
    candidates = {"a": costing(clock, 1.0, calls, "a"), "b": costing(clock, 2.0, calls, "b")}
    assert fastest(candidates, repeats=3, timer=clock, cache={}, default="a") == "a"


def model(channels, dropout=0.0):
    torch.manual_seed(0)
    return UNetModel(in_channels=3, model_channels=channels, out_channels=6, num_res_blocks=1,
                     attention_resolutions=(2,), dropout=dropout, channel_mult=(1, 2), num_classes=3, num_heads=2,
                     use_scale_shift_norm=True)


def test_small_models_stay_contiguous_without_measuring():
    m, cache = model(32), {}
    m.set_channels_last(True)
    assert choose_layout(m, (2, 3, 8, 8), cache=cache) == "contiguous"
    assert not m.channels_last and cache == {}
    assert MIN_CHANNELS_LAST == 64


@pytest.mark.parametrize("train", [True, False])
def test_the_measurement_leaves_no_trace_but_the_layout(train):
    # dropout draws from the global RNG: the measurement must not shift the run's stream
    m, cache = model(64, dropout=0.3), {}
    m.eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    rng = torch.get_rng_state()
    layout = choose_layout(m, (2, 3, 8, 8), train=train, timesteps=100, num_classes=3, repeats=1, cache=cache)
    assert torch.equal(torch.get_rng_state(), rng)
    assert layout in ("channels_last", "contiguous") and list(cache.values()) == [layout]
    assert m.channels_last == (layout == "channels_last")
    assert not m.training  # mode restored
    assert all(p.grad is None for p in m.parameters())
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # no update, standard layout out


def test_fastest_records_what_it_measured():
    clock, calls, record = FakeClock(), [], {}
    candidates = {"a": costing(clock, 1.0, calls, "a"), "b": costing(clock, [1.0] + [1.9, 2.1] * 20, calls, "b")}
    assert fastest(candidates, repeats=4, timer=clock, cache={}, record=record) == "a"
    assert record["rounds"] == 4 and record["seconds"] == {"a": 1.0, "b": 2.0}
    g, lo, hi = record["ratio_to_chosen"]["b"]
    assert lo < g < hi and abs(g - (1.9 * 2.1) ** 0.5) < 1e-12  # the geometric mean of the per-round ratios
    assert describe_measurement(record).startswith(f"b took {g:.3f}x [{lo:.3f}, {hi:.3f}] the time, 4 rounds")
    assert describe_measurement({}) == ""


def test_choose_layout_records_the_measurement():
    m = model(64)
    layout = choose_layout(m, (2, 3, 8, 8), train=False, timesteps=100, num_classes=3, repeats=2, cache={})
    record = MEASURED[layout_key(m, (2, 3, 8, 8), False)]
    assert record["rounds"] == 2 and set(record["seconds"]) == {"channels_last", "contiguous"}
    assert list(record["ratio_to_chosen"]) == [{"channels_last": "contiguous", "contiguous": "channels_last"}[layout]]
    line = layout_report(m, layout, (2, 3, 8, 8), train=False)
    assert line == (f"memory_format auto: {layout} for a sampling step at (2, 3, 8, 8) on this machine "
                    f"({describe_measurement(record)})")


def test_the_layout_report_says_why_nothing_was_measured():
    line = layout_report(model(32), "contiguous", [2, 3, 8, 8], train=True)
    assert line == ("memory_format auto: contiguous for a training step at (2, 3, 8, 8) on this machine "
                    "(32 base channels, under 64: not measured)")
    one_d = UNetModel(in_channels=3, model_channels=64, out_channels=3, num_res_blocks=1, attention_resolutions=(),
                      channel_mult=(1,), dims=1)
    assert choose_layout(one_d, (2, 3, 8), cache={}) == "contiguous"
    assert layout_report(one_d, "contiguous", (2, 3, 8)).endswith("(a 1-D model: not measured)")
    # a layout answered from the cache, with no record of this process's own: said so, not left blank
    assert layout_report(model(64), "contiguous", (5, 3, 8, 8)).endswith("(measured earlier)")


def test_the_choice_is_cached_per_shape_and_mode():
    m = model(64)
    cache = {}
    for shape, train in itertools.product([(2, 3, 8, 8), (4, 3, 8, 8)], [True, False]):
        choose_layout(m, shape, train=train, timesteps=100, num_classes=3, repeats=1, cache=cache)
    assert len(cache) == 4
    # a cached answer is applied without measuring again
    key = next(k for k in cache if k[1] == (2, 3, 8, 8) and k[2])
    cache[key] = "channels_last"
    m.set_channels_last(False)
    assert choose_layout(m, (2, 3, 8, 8), timesteps=100, num_classes=3, cache=cache) == "channels_last"
    assert m.channels_last


def test_fixed_layouts_are_taken_as_given():
    m = model(64)
    assert apply_layout(m, "contiguous", (2, 3, 8, 8)) == "contiguous" and not m.channels_last
    assert apply_layout(m, "channels_last", (2, 3, 8, 8)) == "channels_last" and m.channels_last


def test_training_auto_layout_is_contiguous_and_a_resume_keeps_the_checkpoints(tmp_path, capsys):
    import json

    from unet.config import TrainConfig
    from unet.train.loop import train

    seen = []

    def record_layout(step, record, model):
        seen.append(model.channels_last)

    cfg = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=2, batch_size=4, model_channels=64,
                      num_res_blocks=1, channel_mult=[1], attention_resolutions=[], diffusion_steps=20,
                      report_to="none", progress=False, checkpoint_every=2, diagnostics_every=0, eval_every=0,
                      sample_every=-1, warmup_steps=0)
    first = train(cfg, hooks=[record_layout])
    out = capsys.readouterr().out
    assert "memory_format auto: contiguous for training" in out  # the rule, even at 64 channels
    path = os.path.join(first["checkpoint"], "train_state.json")
    saved = json.load(open(path))["memory_format"]
    assert saved == "contiguous" and seen == [False] * 2
    # The checkpoint says the other layout: an "auto" resume takes it instead of measuring.
    other = "contiguous" if saved == "channels_last" else "channels_last"
    state = {**json.load(open(path)), "memory_format": other}
    with open(path, "w") as f:
        json.dump(state, f)
    from unet.checkpoint.format import read_manifest, write_manifest
    write_manifest(first["checkpoint"], read_manifest(first["checkpoint"])["architecture"])  # an edit it agrees with
    seen.clear()
    train(cfg.replace(max_steps=3, resume="latest"), hooks=[record_layout])
    assert "memory_format auto:" not in capsys.readouterr().out
    assert seen == [other == "channels_last"]
    assert first["steps"] == 2


def test_a_checkpoints_layout_is_read_only_when_it_is_one(tmp_path):
    from unet.train.checkpoint import saved_layout

    state = tmp_path / "train_state.json"
    assert saved_layout(str(tmp_path)) == "auto"  # no file: the resume reports it
    for text, expected in [('{"memory_format": "channels_last"}', "channels_last"), ('{"step": 3}', "auto"),
                           ('{"memory_format": "nchw"}', "auto"), ('{"memory', "auto"), ("[1, 2]", "auto")]:
        state.write_text(text)
        assert saved_layout(str(tmp_path)) == expected, text

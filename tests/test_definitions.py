"""The never-censored ablation: every start-neutral failure definition gives one verdict for
every arm's untrained model (real step-0 records), the descriptive ones are the ones that do
not, the runner stops only at a non-finite loss or the guard, and the primary test's numbers
on hand-made paired outcomes."""

import math

import pytest

from unet.ablation import definitions as defs
from unet.ablation.inference import contrasts, final_loss_test, holm, tost, verdict
from unet.ablation.record import Recorder, stratified_batch
from unet.ablation.runner import init_model
from unet.config import TrainConfig
from unet.train.loop import train

ARMS = ("zero", "standard", "zero-branches", "zero-output", "near-zero", "kaiming", "fixup")


def tiny(arm, **kw):
    return TrainConfig(**{**dict(dataset="digits", image_size=8, model_channels=32, channel_mult=[1, 2],
                                 attention_resolutions=[4], num_res_blocks=1, batch_size=8, max_steps=30,
                                 diffusion_steps=50, eval_batch_size=64, lr=1e-12, warmup_steps=0, grad_clip=0.0,
                                 report_to="none", progress=False, eval_every=0, diagnostics_every=0,
                                 sample_every=-1, fid_every=0, checkpoint_every=0, init=arm,
                                 norm="none" if arm == "fixup" else "group"), **kw})


@pytest.fixture(scope="module")
def untrained_records(tmp_path_factory):
    """Each arm's record of a 30-step run at lr 1e-12 (its weights stay its init: the curves of
    an untrained model), same seed, checked every 10 steps."""
    out = {}
    for arm in ARMS:
        cfg = tiny(arm, output_dir=str(tmp_path_factory.mktemp(arm)))
        rec = Recorder(init_model(cfg), cfg, check_every=10)
        hist = train(cfg, hooks=(rec,))["history"]
        out[arm] = dict(stopped=rec.stopped, checks=rec.checks, zero_predictor_loss=rec.zero_loss,
                        curves={"mse": [r["mse"] for r in hist]})
    return out


def test_start_neutral_definitions_give_one_verdict_for_every_untrained_arm(untrained_records):
    for name in defs.DEFINITIONS:
        verdicts = {arm: defs.failed(r, name) for arm, r in untrained_records.items()}
        if defs.start_neutral(name):
            assert len(set(verdicts.values())) == 1, (name, verdicts)
    # the checks are real: four of them (steps 0, 10, 20, 30), none stopped
    assert all(r["checks"]["steps"] == [0, 10, 20, 30] and r["stopped"] is None for r in untrained_records.values())


def test_the_bar_an_arm_starts_on_is_why_the_old_rule_is_descriptive(untrained_records):
    zero, standard = untrained_records["zero"], untrained_records["standard"]
    # a zero output conv predicts exactly zero noise: its held-out L_simple is the bar itself
    assert zero["checks"]["mse"][0] == pytest.approx(zero["zero_predictor_loss"], rel=1e-6)
    assert standard["checks"]["mse"][0] > standard["zero_predictor_loss"]
    # judged on the step-0 check alone (the untrained models; lr 1e-12 moves zero's output off the bar
    # by ~1e-12 afterwards, to either side)
    at_init = lambda r: {**r, "checks": {"steps": [0], "mse": r["checks"]["mse"][:1]}}  # noqa: E731
    for name in ("old_rule", "early_progress"):
        assert not defs.start_neutral(name)
        assert defs.failed(at_init(standard), name) and not defs.failed(at_init(zero), name)


def test_check_batch_stratifies_t_over_the_whole_schedule():
    x, t, noise, kwargs, zero = stratified_batch(tiny("zero"), 100)
    assert len(x) == 100 and t.tolist() == [int((i + 0.5) * 50 / 100) for i in range(100)]
    assert zero == pytest.approx(noise.double().pow(2).mean().item())


def test_the_runner_does_not_stop_on_a_bar_or_a_spike(tmp_path):
    cfg = tiny("standard", lr=1e-3, output_dir=str(tmp_path / "run"))
    rec = Recorder(init_model(cfg), cfg, check_every=10)
    out = train(cfg, hooks=(rec,))
    assert out["stop_reason"] == "max_steps" and len(out["history"]) == 30 and rec.stopped is None
    assert rec.checks["mse"][0] > rec.zero_loss  # above the old rule's bar at the first check, and ran on
    model = init_model(cfg)
    spike = Recorder(model, cfg, check_every=1000)
    rows = [{"step": s, "loss": 1.0, "mse": 1.0} for s in range(1, 25)] + [{"step": 25, "loss": 8.0, "mse": 8.0}]
    assert not any(spike(r["step"], r, model) for r in rows)  # an 8x spike, below the guard: recorded, not acted on
    record = dict(stopped=None, checks={"steps": [0], "mse": [1.0]}, zero_predictor_loss=1.0,
                  curves={"mse": [r["mse"] for r in rows]})
    assert defs.failed(record, "spike") and not defs.failed(record, "late_rise")


def test_the_guard_and_a_non_finite_loss_stop_a_run(tmp_path):
    cfg = tiny("zero", output_dir=str(tmp_path / "run"))
    model = init_model(cfg)
    guard = Recorder(model, cfg, check_every=1000)
    big = defs.GUARD_FACTOR * guard.zero_loss * 2
    stops = [guard(s, {"step": s, "loss": big, "mse": big}, model) for s in range(1, defs.GUARD_WINDOW + 1)]
    assert stops == [False] * (defs.GUARD_WINDOW - 1) + [True] and guard.stopped.startswith("guard at step 10")
    nan = Recorder(model, cfg, check_every=1000)
    assert nan(1, {"step": 1, "loss": math.nan, "mse": math.nan}, model) and "non-finite" in nan.stopped
    record = dict(stopped=nan.stopped, checks=nan.checks, zero_predictor_loss=1.0, curves={"mse": []})
    assert all(defs.verdicts(record).values()) and defs.final_loss(record) == math.inf


def test_late_rise_is_relative_to_the_run_itself():
    rec = lambda mse: dict(stopped=None, checks={"steps": list(range(len(mse))), "mse": mse},  # noqa: E731
                           zero_predictor_loss=1.0, curves={"mse": []})
    assert not defs.late_rise(rec([1.3, 0.5, 0.7]))  # 0.7 < 1.5 x 0.5
    assert defs.late_rise(rec([1.0, 0.2, 0.31]))  # 0.31 > 1.5 x 0.2
    assert not defs.late_rise(rec([5.0]))  # one check: nothing earlier to rise above


def test_primary_test_on_hand_made_pairs_with_a_known_p():
    # six seeds, A lower in each, distinct differences: the exact two-sided Wilcoxon p is 2/2^6
    blocks = [{"zero": 1.0 + 0.01 * i, "standard": 1.1 + 0.02 * i} for i in range(6)]
    t = final_loss_test(blocks, [["zero", "standard"]], margin=0.05)
    assert t["p"] == pytest.approx(2 / 64) and t["median"] == pytest.approx(-0.125) and t["imputed"] == 0
    assert verdict(t, names=("zero", "standard")).startswith("zero ends lower")
    # a stopped run of A ranks worst: its pair now favours B and the test no longer finds a difference
    blocks[5]["zero"] = math.inf
    d, imputed = contrasts(blocks, [["zero", "standard"]])
    assert imputed == 1 and d[5] == pytest.approx(1.1 + 0.02 * 5 + 1.0 - (1.1 + 0.02 * 5))  # W - B, W = max + 1
    t = final_loss_test(blocks, [["zero", "standard"]], margin=0.05)
    # signed ranks -1..-5 and +6: W+ = 6, and 14 of the 64 sign patterns have W+ <= 6
    assert t["p"] == pytest.approx(2 * 14 / 64) and t["p_equivalence"] is None
    assert verdict(t).startswith("not resolved")


def test_a_factorial_contrast_averages_its_pairs_per_block():
    blocks = [{"zero": 1.0, "zero-output": 1.2, "zero-branches": 2.0, "standard": 2.4}]
    d, _ = contrasts(blocks, [["zero", "zero-output"], ["zero-branches", "standard"]])
    assert d == [pytest.approx(-0.3)]


def test_equivalence_needs_the_interval_inside_the_margin():
    small = [0.001, -0.002, 0.0005, 0.0, 0.001, -0.001]
    assert tost(small, 0.01) < 0.05 and tost(small, 0.001) > 0.05
    t = final_loss_test([{"a": 1 + x, "b": 1.0} for x in small], [["a", "b"]], margin=0.01)
    assert verdict(t).startswith("equivalent within +-0.01")


def test_holm_on_known_numbers():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])

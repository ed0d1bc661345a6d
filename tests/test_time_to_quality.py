"""The wall-clock budget (``max_minutes``) and the time-to-quality benchmark built on it
(benchmarks/time_to_quality.py): the stop rule, the clock kept in checkpoints and continued on
resume, the key's bad values, and a seconds-long run of the benchmark whose JSON must hold the
curve's invariants and whose models must be the ones a straight run gives."""

import importlib.util
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch
from test_training import ROOT, files_equal, subprocess_env, tiny

from unet.cli import train as train_script
from unet.config import TrainConfig, load_config
from unet.train.checkpoint import list_checkpoints
from unet.train.diagnostics import DivergenceMonitor
from unet.train.loop import train
from unet.train.state import StepRecord, TrainState, should_stop

BENCH = os.path.join(ROOT, "benchmarks", "time_to_quality.py")


# --- the stop rule and the saved clock (pure) -------------------------------------------

def state_at(elapsed, step=5):
    state = TrainState(divergence=DivergenceMonitor(0.0), step=step, elapsed=elapsed)
    return state, StepRecord(step=step, lr=1e-3, terms={"loss": 1.0}, grad_norm=1.0)


def test_max_minutes_stops_once_the_clock_reaches_it_and_never_when_off():
    cfg = TrainConfig(max_steps=100, max_minutes=0.5)
    assert should_stop(*state_at(29.999), cfg) is None
    assert should_stop(*state_at(30.0), cfg) == "max_minutes"
    assert should_stop(*state_at(1e9), TrainConfig(max_steps=100)) is None  # 0: off
    # the last step is a complete run whatever the clock says; a budget reached beats a signal
    assert should_stop(*state_at(60.0, step=100), cfg) == "max_steps"
    assert should_stop(*state_at(60.0), cfg, signalled=True) == "max_minutes"
    assert should_stop(*state_at(1.0), cfg, signalled=True) == "preempted"


def test_the_clock_is_saved_and_restored():
    state, _ = state_at(12.5)
    saved = state.state_dict()
    assert saved["elapsed_seconds"] == 12.5
    again = TrainState(divergence=DivergenceMonitor(0.0))
    again.load_state_dict(saved)
    assert again.elapsed == 12.5


# --- the key ----------------------------------------------------------------------------

@pytest.mark.parametrize("value, words", [("-1", ["'max_minutes'", ">= 0"]), ("nan", ["'max_minutes'", "finite"]),
                                          ("inf", ["'max_minutes'", "finite"]), ("two", ["'max_minutes'", "float"])])
def test_bad_max_minutes_is_one_line_exit_2(value, words, tmp_path, capsys):
    rc = train_script.main(["--output_dir", str(tmp_path / "run"), "--max_minutes", value])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert all(w in err for w in words), err
    assert not (tmp_path / "run").exists()


def test_max_minutes_is_a_key_of_files_and_command_lines(tmp_path):
    (tmp_path / "c.yaml").write_text("max_minutes: 1.5\n")
    assert load_config(["--config", str(tmp_path / "c.yaml")]).max_minutes == 1.5
    assert load_config(["--max_minutes", "0.25"]).max_minutes == 0.25
    assert TrainConfig().max_minutes == 0.0
    assert "--max_minutes" in train_script.help_text()


SLEEP = 0.25  # seconds a hook adds to every step: a lower bound on each step's wall time


def sleepy(step, row, model):
    time.sleep(SLEEP)


def test_a_run_stops_after_the_first_step_past_the_budget_and_resumes_the_clock(tmp_path):
    budget = 1.2  # seconds (0.02 min): every step takes >= SLEEP, so the clock passes it by step 5
    cfg = tiny(tmp_path / "run", max_steps=10_000, max_minutes=budget / 60, checkpoint_every=0)
    first = train(cfg, hooks=[sleepy])
    assert first["stop_reason"] == "max_minutes" and not first["diverged"]
    assert 1 <= first["steps"] <= math.ceil(budget / SLEEP)
    assert first["elapsed_seconds"] >= budget
    # the stop is checkpointed with its clock
    ckpt = list_checkpoints(cfg.output_dir)[-1]
    assert ckpt.endswith(f"checkpoint_{first['steps']:08d}") and ckpt == first["checkpoint"]
    with open(os.path.join(ckpt, "train_state.json")) as fh:
        assert json.load(fh)["elapsed_seconds"] == first["elapsed_seconds"]
    # resumed with twice the budget: the clock continues from the checkpoint's, so at most
    # budget/SLEEP more steps (a clock restarted at 0 would need 2 x budget of new steps)
    second = train(cfg.replace(max_minutes=2 * budget / 60, resume="latest"), hooks=[sleepy])
    assert second["stop_reason"] == "max_minutes"
    assert first["steps"] < second["steps"] <= first["steps"] + math.ceil(budget / SLEEP)
    assert second["elapsed_seconds"] >= max(2 * budget, first["elapsed_seconds"] + SLEEP * (second["steps"]
                                                                                                - first["steps"]))


def test_train_py_with_a_budget_exits_0_with_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--output_dir", str(out), "--max_steps",
                        "100000", "--max_minutes", "0.01", "--num_res_blocks", "1", "--diffusion_steps", "20",
                        "--batch_size", "8", "--report_to", "none", "--progress", "false", "--sample_every", "-1",
                        "--eval_every", "0", "--diagnostics_every", "0"],
                       cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "max_minutes: stopped after step" in r.stdout
    (ckpt,) = list_checkpoints(str(out))
    with open(os.path.join(ckpt, "train_state.json")) as fh:
        state = json.load(fh)
    assert 1 <= state["step"] < 100000 and state["elapsed_seconds"] >= 0.6


# --- the benchmark ----------------------------------------------------------------------

def bench_module():
    spec = importlib.util.spec_from_file_location("time_to_quality", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_bench(*argv, cwd=ROOT):
    return subprocess.run([sys.executable, BENCH, *argv], cwd=cwd, env=subprocess_env(), capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("argv, words", [(["--budgets", "0"], ["--budgets", "> 0"]),
                                         (["--budgets", "two"], ["--budgets", "numbers"]),
                                         (["--judge_samples", "1"], ["--judge_samples", "at least 2"]),
                                         (["--judge_sampler", "ddpm"], ["SCHEDULER:STEPS"]),
                                         (["--max_minutes", "3"], ["--max_minutes", "--budgets"]),
                                         (["--lr", "-1"], ["'lr'"])])
def test_benchmark_bad_arguments_are_one_line_exit_2(argv, words, tmp_path, capsys):
    rc = bench_module().main([*argv, "--output_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert all(w in err for w in words), err
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def curve(tmp_path_factory):
    """Budgets of 0.6 s and 1.2 s, then the full run to 40 steps; 20 judged samples, 2 seeds."""
    tmp = tmp_path_factory.mktemp("ttq")
    argv = ["--budgets", "0.02,0.01", "--max_steps", "40", "--judge_samples", "20", "--judge_seeds", "0,1",
            "--judge_sampler", "ddpm:5", "--sample_every", "-1", "--output_dir", str(tmp / "run"),
            "--json", str(tmp / "ttq.json")]
    r = run_bench(*argv)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(tmp / "ttq.json") as fh:
        return json.load(fh), r.stdout, tmp


def test_benchmark_json_holds_the_curve_and_its_invariants(curve):
    d, stdout, _ = curve
    assert d["machine"]["cpu"] and d["machine"]["cores"] >= 1 and d["torch"] == torch.__version__
    assert d["command"].startswith("python -m benchmarks.time_to_quality --budgets 0.02,0.01")
    assert d["budgets_minutes"] == [0.01, 0.02] and d["full"] is True  # sorted
    assert d["config"]["max_steps"] == 40 and d["config"]["lr"] == TrainConfig().lr
    assert d["judge"] == dict(samples=20, seeds=[0, 1], sampler=["ddpm", 5], labels="0-9 in turn",
                              weights="EMA 0.999", judge_seed=0)
    pts = d["points"]
    assert [p["budget_minutes"] for p in pts] == [0.01, 0.02, None]
    steps = [p["steps"] for p in pts]
    assert steps == sorted(steps) and steps[-1] == 40 and pts[-1]["stop_reason"] == "max_steps"
    timed = [p for p in pts if p["stop_reason"] == "max_minutes"]
    for p in pts:  # a budget the run outlasted stops at the budget; else it is the full run's model
        assert p in timed and p["train_seconds"] >= 60 * p["budget_minutes"] or p["steps"] == 40
    # every segment trains at least one step, so steps grow strictly from stop to stop
    assert [p["steps"] for p in timed] == sorted(set(p["steps"] for p in timed)) and all(p["steps"] < 40 for p in timed)
    assert [p["train_seconds"] for p in pts] == sorted(p["train_seconds"] for p in pts)
    for p in pts:
        assert p["checkpoint"].endswith(f"checkpoint_{p['steps']:08d}") and os.path.isdir(p["checkpoint"])  # all kept
        seeds = p["per_seed"]
        assert [s["seed"] for s in seeds] == [0, 1]
        assert all(0 <= s["accuracy"] <= 1 and s["fd"] >= 0 for s in seeds)
        assert p["accuracy"] == pytest.approx(sum(s["accuracy"] for s in seeds) / 2, abs=1e-12)
        assert p["fd"] == pytest.approx(sum(s["fd"] for s in seeds) / 2, rel=1e-12)
        assert p["fd_sd"] == pytest.approx(abs(seeds[0]["fd"] - seeds[1]["fd"]) / math.sqrt(2), rel=1e-9)
        assert p["fd_floor"] == pts[0]["fd_floor"] > 0  # one judge and one floor for all
        assert p["judging_seconds"] > 0
    assert d["wall_seconds"] > pts[-1]["train_seconds"]
    lines = [ln for ln in stdout.splitlines() if ln.startswith("|")]
    assert len(lines) == 2 + len(pts) and lines[1].startswith("|---") and lines[-1].startswith("| full run | 40 |")


def test_benchmark_models_are_a_straight_runs(curve, tmp_path):
    """Stopping at budgets and resuming changes nothing: the full run's weights and EMA are
    bit-identical to one uninterrupted run's."""
    d, _, _ = curve
    straight = train(TrainConfig(output_dir=str(tmp_path / "straight"), max_steps=40, sample_every=-1,
                                 report_to="none", progress=False))
    for name in ("model.safetensors", "ema_0.999.safetensors"):
        assert files_equal(d["points"][-1]["checkpoint"], straight["checkpoint"], name), name


def test_judge_again_pairs_checkpoints_by_seed(curve):
    """``judge`` re-judges kept checkpoints: a seed the curve used gives the curve's numbers
    again (sampling is seeded), and the paired differences are the per-seed differences."""
    d, _, tmp = curve
    first, last = d["points"][0], d["points"][-1]
    r = run_bench("judge", first["checkpoint"], last["checkpoint"], "--judge_samples", "20", "--judge_seeds", "1,2,3",
                  "--judge_sampler", "ddpm:5", "--json", str(tmp / "judged.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    with open(tmp / "judged.json") as fh:
        j = json.load(fh)
    assert j["judge"]["seeds"] == [1, 2, 3] and j["command"].startswith("python -m benchmarks.time_to_quality judge ")
    a, b = j["checkpoints"]
    assert [s["seed"] for s in a["per_seed"]] == [1, 2, 3] and "minus_first" not in a
    for mine, theirs in ((a, first), (b, last)):  # seed 1 again: the same samples, the same judgement
        assert mine["per_seed"][0]["accuracy"] == theirs["per_seed"][1]["accuracy"]
        assert mine["per_seed"][0]["fd"] == pytest.approx(theirs["per_seed"][1]["fd"], rel=1e-9)
    diff = b["minus_first"]["accuracy"]
    assert diff["per_seed"] == [y["accuracy"] - x["accuracy"] for x, y in zip(a["per_seed"], b["per_seed"])]
    assert diff["mean"] == pytest.approx(sum(diff["per_seed"]) / 3, abs=1e-12) and diff["half_width"] >= 0
    assert "minus" in r.stdout and "paired by seed" in r.stdout


def test_judge_refuses_a_missing_checkpoint_before_judging(tmp_path):
    r = run_bench("judge", str(tmp_path / "nowhere"), "--json", str(tmp_path / "j.json"))
    assert r.returncode == 2 and r.stderr.startswith("error: checkpoint not found: ") and r.stderr.count("\n") == 1
    assert not (tmp_path / "j.json").exists()


def test_benchmark_plot_writes_a_png(curve):
    d, _, tmp = curve
    out = tmp / "curve.png"
    r = run_bench("plot", str(tmp / "ttq.json"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

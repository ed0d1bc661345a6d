"""The ablation runner and its report: a tiny grid end to end (every report section, a valid
results.json, a diverging arm recorded without stopping the rest, the same data and noise
for every arm of a seed, wandb group and tags, continuing a finished ablation), the
shipped grids (the statistics on known numbers are in test_stats.py and test_summary.py)."""

import glob
import json
import math
import os

import pytest
import torch
import yaml
from PIL import Image
from wandb_offline import read_run

from unet.ablation import runner as ablation
from unet.ablation.runner import expand, init_model, load_ablation, run_ablation
from unet.cli.ablation import main, parse_args
from unet.config import ConfigError
from unet.core.diffusion import GaussianDiffusion

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {
    "name": "tiny",
    "seeds": 2,
    "threshold": 2.0,
    "smooth": 2,
    "symmetry": {"steps": 3},
    "save_models": False,
    "failure": {"eval_every": 2},  # held-out checks at steps 0, 2 and 4
    "base": dict(dataset="digits", image_size=8, model_channels=32, channel_mult=[1, 2], attention_resolutions=[4],
                 num_res_blocks=1, batch_size=8, max_steps=4, diffusion_steps=20, eval_batch_size=16, lr=1e-3,
                 warmup_steps=0, grad_clip=0.0, report_to="wandb", log_every=2),
    # an lr sweep of two arms x two seeds, whose top learning rate wrecks the weights in one Adam step
    "grid": [{"lr": [1e-3, 1000.0], "init": ["zero", "standard"]}],
    "primary": {"name": "zero against standard", "measure": "final_loss", "arms": ["zero", "standard"],
                "cells": [{"lr": [1e-3, 1000.0]}]},
}


def write_grid(path, grid):
    with open(path, "w") as f:
        yaml.safe_dump(grid, f)
    return str(path)


@pytest.fixture(scope="module")
def tiny_ablation(tmp_path_factory):
    """Run the tiny grid once, recording the (x_start, t, noise) of every loss computation per run."""
    tmp = tmp_path_factory.mktemp("ablation")
    out = str(tmp / "out")
    seen, current = {}, {"run": None}
    real_losses, real_run_one = GaussianDiffusion.training_losses, ablation.run_one

    def recording_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        if current["run"] is not None:
            seen[current["run"]].append((x_start.clone(), t.clone(), noise.clone()))
        return real_losses(self, model, x_start, t, model_kwargs=model_kwargs, noise=noise)

    def tracked_run_one(spec, *args, **kw):
        current["run"] = spec.run_id
        seen[spec.run_id] = []
        try:
            return real_run_one(spec, *args, **kw)
        finally:
            current["run"] = None

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.delenv("WANDB_API_KEY", raising=False)
        mp.setattr(GaussianDiffusion, "training_losses", recording_losses)
        mp.setattr(ablation, "run_one", tracked_run_one)
        ab = load_ablation(write_grid(tmp / "tiny.yaml", TINY))
        lines = []
        results = run_ablation(ab, out, log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    return dict(out=out, results=results, seen=seen, lines=lines, config=str(tmp / "tiny.yaml"))


def test_report_has_every_section_and_results_json_is_valid(tiny_ablation):
    out = tiny_ablation["out"]

    def no_nan(token):
        raise ValueError(f"results.json contains {token}, which is not JSON")

    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f, parse_constant=no_nan)
    assert len(results["runs"]) == 8 and {r["run_id"] for r in results["runs"]} == {
        f"c0{c}_{arm}_s{s}" for c in (0, 1) for arm in ("zero", "standard") for s in (0, 1)}
    for r in results["runs"]:
        assert set(r["measures"]) >= {"initial_loss", "steps_to_threshold", "final_eval_loss", "final_eval_mse",
                                      "max_grad_norm", "median_grad_norm", "spike_count", "failed", "diverged",
                                      "loss_at_10", "loss_at_50", "loss_at_100"}
        assert isinstance(r["failed"], bool) and isinstance(r["diverged"], bool) and "failure_reason" in r
        assert r["config"]["lr"] == r["cell"]["lr"]
        # a 4-step run has no loss at step 10; the training loss of step 1 is the initial loss
        assert r["measures"]["loss_at_10"] is None
    report = open(os.path.join(out, "report.md")).read()
    for heading in (
        "## The pre-registered tests",
        "### Each test cell by cell",
        "## The 2x2 factorial",
        "## Where each arm starts and ends",
        "## Failure definitions, scored from the full records",
        "## Mechanism",
        "## Init memory",
        "## Why zero init is not the all-zero pitfall",
    ):
        assert heading in report, heading
    assert "- Primary: zero against standard. Contrast zero - standard of the final loss over 4 (cell, seed) pairs, " \
           "4 stopped run(s) ranked worst" in report
    for png in ("held_out_curves.png", "final_loss.png"):
        assert f"]({png})" in report
        with Image.open(os.path.join(out, png)) as im:
            assert im.format == "PNG" and im.width > 300
    # the report is rebuilt from the compact results written beside it, byte for byte
    import gzip

    with gzip.open(os.path.join(out, "compact_runs.json.gz"), "rt") as f:
        compact = json.load(f)
    assert [r["run_id"] for r in compact["runs"]] == [r["run_id"] for r in results["runs"]]
    assert compact["symmetry"] == results["symmetry"] and compact["ablation"] == results["ablation"]
    # save_models: false keeps each run's measures and logs, not its checkpoint
    assert os.path.isfile(os.path.join(out, "runs", "c00_zero_s0", "result.json"))
    assert not os.path.exists(os.path.join(out, "runs", "c00_zero_s0", "checkpoints"))
    # one progress line per run, with the count, the elapsed time and (before the last) the time left
    progress = [line for line in tiny_ablation["lines"] if line.startswith("[")]
    assert len(progress) == 8 and "runs 1/8, " in progress[0] and "left" in progress[0]
    assert "runs 8/8, " in progress[-1] and "elapsed" in progress[-1]


def test_failing_arm_is_recorded_and_the_rest_run_on(tiny_ablation):
    runs = {r["run_id"]: r for r in tiny_ablation["results"]["runs"]}
    for seed in (0, 1):
        bad = runs[f"c01_standard_s{seed}"]
        # lr 1000 wrecks the weights: only a non-finite loss (or the guard) stops a run, and says why
        assert bad["failed"] and bad["measures"]["failed"] and bad["steps"] < 4 and bad["stopped"]
        assert bad["measures"]["final_eval_loss"] is None and bad["final_loss"] is None
        assert bad["stop_reason"] == bad["failure_reason"] == bad["stopped"]
        assert bad["failure_reason"].startswith(("non-finite loss", "guard"))
        assert all(bad["verdicts"].values())  # failed under every definition
        for arm in ("zero", "standard"):
            good = runs[f"c00_{arm}_s{seed}"]
            assert not good["failed"] and good["steps"] == 4 and good["stopped"] is None
            assert good["checks"]["steps"] == [0, 2, 4]  # never censored: every check was made
            assert good["final_loss"] == pytest.approx(sum(good["checks"]["mse"]) / 3)
            assert math.isfinite(good["measures"]["final_eval_loss"])
            assert set(good["verdicts"]) == {"diverged", "late_rise", "spike", "old_rule", "early_progress"}
    report = open(os.path.join(tiny_ablation["out"], "report.md")).read()
    assert "4 of 8 runs reached max_steps (4); 4 stopped early" in report
    assert "| lr=1000 | standard | 2/2 | 2/2 | 2/2 | 2/2 | 2/2 |" in report  # failed under every definition


def test_same_seed_same_data_t_and_noise_in_every_arm(tiny_ablation):
    seen = tiny_ablation["seen"]
    # training batches hold 8 images; the held-out check batch and the end-of-run summary's, 16
    train = {r: [c for c in calls if len(c[0]) == 8] for r, calls in seen.items()}
    held = {r: [c for c in calls if len(c[0]) == 16] for r, calls in seen.items()}

    def same(a, b, n=None):
        n = n or max(len(a), len(b))
        return len(a) >= n and len(b) >= n and all(
            all(torch.equal(u, v) for u, v in zip(a[i], b[i])) for i in range(n))

    for seed in (0, 1):
        zero, standard = train[f"c00_zero_s{seed}"], train[f"c00_standard_s{seed}"]
        assert len(zero) == 4 and same(zero, standard)  # four training steps
        # the diverging cell saw the same batches for as long as it ran
        bad = train[f"c01_standard_s{seed}"]
        assert 1 <= len(bad) < 4 and same(bad, zero, n=len(bad))
    # and a different seed sees different data and noise
    assert not torch.equal(train["c00_zero_s0"][0][0], train["c00_zero_s1"][0][0])
    assert not torch.equal(train["c00_zero_s0"][0][2], train["c00_zero_s1"][0][2])
    # while the held-out check batch (images, stratified t, noise) is the same for every run
    first = held["c00_zero_s0"][0]
    assert all(same(calls[:1], [first]) for calls in held.values())
    assert first[1].tolist() == sorted(first[1].tolist())  # t stratified over the schedule


def test_symmetry_zero_breaks_it_all_zero_keeps_it(tiny_ablation):
    sym = {s["arm"]: s for s in tiny_ablation["results"]["symmetry"]}
    zero, allzero = sym["zero"], sym["all-zero"]
    assert zero["steps"] == [0, 1, 2, 3]
    # zero: every zeroed layer starts with identical (zero) channels; the output conv differs
    # after the first step, every zeroed layer after the second
    assert all(v[0] == 0 for v in zero["layers"].values())
    out_conv = [n for n in zero["layers"] if n.startswith("out.")]
    assert zero["first_distinct"][out_conv[0]] == 1
    assert all(zero["first_distinct"][n] == 2 for n in zero["layers"] if n not in out_conv)
    assert zero["moved_fraction"][3] == 1.0
    # all-zero: the channels never differ; only the output conv's bias moves
    assert all(v == 0 for vals in allzero["layers"].values() for v in vals)
    n_params = len(list(init_model(ablation.symmetry_config(load_ablation(tiny_ablation["config"]), "x", "zero"))
                        .parameters()))
    assert allzero["moved_fraction"][1:] == [1 / n_params] * 3


def test_runs_log_to_one_wandb_group_one_run_per_cell_and_arm(tiny_ablation):
    out, group = tiny_ablation["out"], tiny_ablation["results"]["group"]
    assert not glob.glob(os.path.join(out, "runs", "*", "wandb"))  # the training runs log nothing themselves
    runs = {r.name: r for r in map(read_run, glob.glob(os.path.join(out, "wandb", "offline-run-*", "run-*.wandb")))}
    assert set(runs) == {f"cell-c0{c}-{arm}" for c in (0, 1) for arm in ("zero", "standard")} | {"report"}
    assert all(r.group == group for r in runs.values())
    cell = runs["cell-c00-zero"]
    assert {"cell:c00", "init:zero"} <= set(cell.tags)
    assert any("train/loss/s0" in h and "train/loss/s1" in h for h in cell.history)  # the seeds as series
    assert any("held_out_curves" in h for h in runs["report"].history)


def test_running_again_continues_without_redoing_runs(tiny_ablation, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(ablation, "run_one", boom)
    monkeypatch.setattr(ablation, "symmetry_run", boom)
    monkeypatch.setattr(ablation, "_log_report", lambda *a: None)
    again = run_ablation(load_ablation(tiny_ablation["config"]), tiny_ablation["out"], log=lambda *a, **k: None)
    assert again["group"] == tiny_ablation["results"]["group"]
    assert again["runs"] == json.loads(json.dumps(tiny_ablation["results"]["runs"]))
    # the report can be rebuilt from results.json alone
    report = os.path.join(tiny_ablation["out"], "report.md")
    before = open(report).read()
    os.remove(report)
    assert main(["--output_dir", tiny_ablation["out"], "--report_only"]) == 0
    assert open(report).read() == before
    # a changed grid in the same folder is refused rather than mixed in
    changed = dict(TINY, base={**TINY["base"], "batch_size": 16})
    path = write_grid(os.path.join(os.path.dirname(tiny_ablation["config"]), "changed.yaml"), changed)
    with pytest.raises(ConfigError, match="different config"):
        run_ablation(load_ablation(path), tiny_ablation["out"], log=lambda *a, **k: None)


def test_a_chunked_grid_marks_its_invocations_and_writes_compact_results(tmp_path, capsys):
    grid = write_grid(tmp_path / "g.yaml", {**TINY, "base": {**TINY["base"], "report_to": "none"},
                                             "grid": [{"lr": [1e-3], "init": ["zero", "standard"]}],
                                             "primary": {**TINY["primary"], "cells": [{"lr": [1e-3]}]}})
    out = str(tmp_path / "out")
    # --stop_after 1e-9: the process runs one run and starts no other; the same command continues
    assert main(["--config", grid, "--output_dir", out, "--stop_after", "1e-9", "--processes", "1"]) == 0
    import gzip

    with gzip.open(os.path.join(out, "compact_runs.json.gz"), "rt") as f:
        first = json.load(f)["runs"]
    assert len(first) == 1 and first[0]["run_id"] == "c00_zero_s0" and first[0]["checks"]["steps"] == [0, 2, 4]
    assert not os.path.exists(os.path.join(out, "results.json"))
    assert main(["--config", grid, "--output_dir", out, "--processes", "1"]) == 0
    with open(os.path.join(out, "results.json")) as f:
        runs = json.load(f)["runs"]
    invocations = {r["run_id"]: r["invocation"] for r in runs}
    assert len(runs) == 4 and len(set(invocations.values())) == 2
    assert sum(v == invocations["c00_zero_s0"] for v in invocations.values()) == 1


def test_bad_sweep_is_one_line_error_before_any_run(tmp_path, capsys):
    cases = [({"lr": [], "init": ["zero"]}, "'lr' lists no values"),
             ({"lr": [0.001, -0.01], "init": ["zero"]}, "got -0.01"),
             ({"lr": [0.0], "init": ["zero"]}, "got 0.0"),
             ({"lr": ["fast"], "init": ["zero"]}, "'fast'"),
             ({"num_res_blocks": [0, 2], "init": ["zero"]}, "num_res_blocks"),
             ]
    for i, (grid, words) in enumerate(cases):
        path = write_grid(tmp_path / f"bad{i}.yaml", {**TINY, "grid": [grid]})
        assert main(["--config", path, "--output_dir", str(tmp_path / "o")]) == 2, grid
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and words in err, err
    path = write_grid(tmp_path / "one_seed.yaml", {**TINY, "seeds": 1})
    assert main(["--config", path, "--output_dir", str(tmp_path / "o")]) == 2
    assert "at least 2 seeds" in capsys.readouterr().err
    assert main(["--config", write_grid(tmp_path / "g.yaml", TINY), "--seeds", "1", "--output_dir",
                 str(tmp_path / "o")]) == 2
    assert "at least 2 seeds" in capsys.readouterr().err
    for key, value in (("processes", "0"), ("early_steps", "10,x")):
        assert main(["--config", write_grid(tmp_path / "g.yaml", TINY), f"--{key}", value, "--output_dir",
                     str(tmp_path / "o")]) == 2
        assert f"'{key}'" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")  # nothing started


def test_combine_pools_two_ablations_with_different_seeds(tiny_ablation, tmp_path, capsys):
    with open(os.path.join(tiny_ablation["out"], "results.json")) as f:
        first = json.load(f)
    second = json.loads(json.dumps(first))
    for r in second["runs"]:
        r["seed"] += 10
        r["run_id"] = r["run_id"].replace("_s", "_s1")
    second["ablation"]["seeds"] = [10, 11]
    os.makedirs(tmp_path / "b")
    with open(tmp_path / "b" / "results.json", "w") as f:
        json.dump(second, f)
    out = str(tmp_path / "both")
    assert main(["--combine", f"{tiny_ablation['out']},{tmp_path / 'b'}", "--output_dir", out]) == 0
    with open(os.path.join(out, "results.json")) as f:
        both = json.load(f)
    assert len(both["runs"]) == 16 and both["ablation"]["seeds"] == [0, 1, 10, 11]
    report = open(os.path.join(out, "report.md")).read()
    assert "seeds 0, 1, 10, 11" in report and "over 8 (cell, seed) pairs, 8 stopped run(s)" in report
    # the same seeds twice, or different grids, are refused with one line
    assert main(["--combine", f"{tiny_ablation['out']},{tiny_ablation['out']}", "--output_dir", out]) == 2
    assert "different seeds" in capsys.readouterr().err
    second["ablation"]["threshold"] = 9.0
    with open(tmp_path / "b" / "results.json", "w") as f:
        json.dump(second, f)
    assert main(["--combine", f"{tiny_ablation['out']},{tmp_path / 'b'}", "--output_dir", out]) == 2
    assert "same grid" in capsys.readouterr().err


def test_init_model_is_the_model_training_starts_from(tmp_path):
    """The update ratio of step 1 is measured against ``init_model(cfg)``; a warmup makes
    the first update exactly 0, so after step 1 training holds the init weights."""
    ab = load_ablation(write_grid(tmp_path / "g.yaml", {**TINY, "seeds": [3, 4], "failure": {"eval_every": 1}, "base": {
        **TINY["base"], "report_to": "none", "warmup_steps": 5, "max_steps": 1}}))
    spec = expand(ab, str(tmp_path))[1]
    from unet.train.loop import train

    seen = {}
    train(spec.cfg, hooks=(lambda step, rec, model: seen.update(model.state_dict()),))
    ref = init_model(spec.cfg).state_dict()
    assert spec.arm == "standard" and seen.keys() == ref.keys()
    assert all(torch.equal(seen[k], ref[k]) for k in ref)


def test_shipped_stability_grid_is_the_design_docs_ablation_md_states():
    """The digits grid: at least 300 steps, no warmup or clipping, GroupNorm at depths 2 and 4 and
    no norm at depth 2, edge learning rates at most 1.5x apart with at least 12 seeds of every arm
    the tests compare, the paper's lr 4e-4, and a primary test over every edge cell."""
    ab = load_ablation(os.path.join(ROOT, "configs", "ablation", "digits.yaml"))
    runs = expand(ab, "out")
    assert all(r.cfg.max_steps >= 300 and (r.cfg.warmup_steps, r.cfg.grad_clip) == (0, 0.0) for r in runs)
    assert {(r.cfg.norm, r.cfg.num_res_blocks) for r in runs} == {("group", 2), ("group", 4), ("none", 2)}
    assert {r.arm for r in runs} == {"zero", "standard", "zero-branches", "zero-output", "near-zero"}
    assert ab.primary["arms"] == ["zero", "standard"] and len(ab.secondary) == 4
    for spec in [ab.primary, *ab.secondary]:
        for cell in spec["cells"]:
            lrs = sorted(cell["lr"] if isinstance(cell["lr"], list) else [cell["lr"]])
            assert all(b / a <= 1.52 for a, b in zip(lrs, lrs[1:]))  # x1.5, rounded to 2 digits
            for lr in lrs:
                for arm in spec["arms"]:
                    seeds = [r.seed for r in runs if r.arm == arm and r.cfg.lr == lr and r.cfg.norm == cell["norm"]
                             and r.cfg.num_res_blocks == cell["num_res_blocks"]]
                    assert len(seeds) >= 12, (arm, cell, lr)
    assert any(r.cfg.lr == 4e-4 for r in runs) and ab.processes == 2
    base = {k: v for k, v in runs[0].cfg.to_dict().items()
            if k not in ("init", "norm", "num_res_blocks", "lr", "seed", "output_dir", "run_name", "tags")}
    assert all({k: r.cfg.to_dict()[k] for k in base} == base for r in runs)


def test_shipped_first_look_and_gpu_grids():
    """digits_quick and cifar10: log-spaced lr sweeps for every init, depth and norm."""
    for name in ("digits_quick", "cifar10"):
        ab = load_ablation(os.path.join(ROOT, "configs", "ablation", f"{name}.yaml"))
        arms = {}
        for r in expand(ab, "out"):
            arms.setdefault((r.cfg.norm, r.cfg.num_res_blocks), {}).setdefault(r.arm, set()).add(r.cfg.lr)
            assert (r.cfg.warmup_steps, r.cfg.grad_clip) == (0, 0.0)
        for by_arm in arms.values():
            lrs = sorted(next(iter(by_arm.values())))
            assert all(v == set(lrs) for v in by_arm.values()) and len(lrs) >= 3
    c = expand(load_ablation(os.path.join(ROOT, "configs", "ablation", "cifar10.yaml")), "out")[0].cfg
    assert (c.image_size, c.model_channels, c.channels) == (32, 128, 3)


def test_a_primary_test_outside_the_grid_is_refused_before_any_run(tmp_path, capsys):
    primary = {"name": "p", "arms": ["zero", "standard"], "cells": [{"lr": [1e-3]}]}
    cases = [({"primary": {**primary, "arms": ["zero", "near-zero"]}}, "init 'near-zero' at lr=0.001"),
             ({"primary": {**primary, "cells": [{"lr": [0.5]}]}}, "init 'zero' at lr=0.5"),
             ({"primary": {**primary, "arms": ["zero"]}}, "'primary.arms' must be two different init arms"),
             ({"secondary": [{**primary, "measure": "speed"}]}, "'secondary[0].measure'"),
             ({"secondary": [primary] * 6}, "at most 5 tests"),
             ({"primary": {**primary, "measure": "final_loss", "pairs": [["zero", "standard"], ["zero", "kaiming"]],
                           "arms": None}}, "'primary' must be a mapping"),
             ({"primary": {"name": "p", "measure": "final_loss", "cells": [{"lr": [1e-3]}],
                           "pairs": [["zero", "standard"], ["zero-output", "standard"]]}}, "init 'zero-output'"),
             ({"primary": {**primary, "definition": "sometimes"}}, "'primary.definition' must be one of"),
             ({"equivalence_margin": 0}, "'equivalence_margin' must be a number > 0"),
             ({"equivalence_margin": -0.1}, "'equivalence_margin' must be a number > 0"),
             ({"seeds": 1}, "at least 2 seeds"),
             ({"failure": {"eval_every": 3}}, "must be >= 1 and divide every run's max_steps")]
    for extra, message in cases:
        bad = write_grid(tmp_path / "bad.yaml", {**TINY, **extra})
        assert main(["--config", bad, "--output_dir", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err, (extra, err)
    assert not os.path.exists(tmp_path / "o")
    ok = load_ablation(write_grid(tmp_path / "ok.yaml", {**TINY, "primary": primary}))
    assert ok.primary["cells"] == [{"lr": [1e-3]}]


def test_bad_grid_is_one_line_error(tmp_path, capsys):
    bad = write_grid(tmp_path / "bad.yaml", {**TINY, "grid": [{"nrom": ["group"], "init": ["zero"]}]})
    assert main(["--config", bad, "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'nrom'" in err and "norm" in err
    bad = write_grid(tmp_path / "bad2.yaml", {**TINY, "grid": [{"init": ["zero", "ones"]}]})
    assert main(["--config", bad, "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "init" in err and "'ones'" in err
    assert main(["--config", str(tmp_path / "missing.yaml"), "--output_dir", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")  # nothing started


def test_command_line(tmp_path, capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--output_dir DIR" in out and "--report_only" in out and "--KEY VALUE" in out
    grid = write_grid(tmp_path / "g.yaml", TINY)
    for argv, words in ((["--config", grid], ["--output_dir DIR is required"]),
                        (["--output_dir", str(tmp_path / "o")], ["--config FILE is required"]),
                        (["--config", grid, "--output_dir", str(tmp_path / "o"), "--lrr", "1"], ["'--lrr'", "'--lr'"]),
                        (["--config", grid, "--output-dir", str(tmp_path / "o")], ["'--output_dir'"]),
                        (["--config", grid, "--output_dir", str(tmp_path / "o"), "--lr"], ["--lr"]),
                        (["--config", grid, "--output_dir", str(tmp_path / "o"), "--init", "zero"], ["grid varies"]),
                        (["--output_dir", str(tmp_path / "none"), "--report_only"], ["run the ablation first"])):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and all(w in err for w in words), err
    assert not os.path.exists(tmp_path / "o")  # nothing started
    # training keys and ablation keys from the command line reach the grid
    ab = load_ablation(grid, parse_args(["--seeds", "0,3", "--batch_size=16", "--save_models", "true"]))
    assert ab.seeds == [0, 3] and ab.base["batch_size"] == 16 and ab.save_models is True


def test_saved_run_from_before_a_new_config_key_still_counts(tmp_path):
    """A run saved before a TrainConfig key existed is kept (the key's default is the old
    behaviour); a saved run whose values differ is refused."""
    from unet.ablation.store import load_result
    from unet.utils.jsonfile import write_json

    spec = expand(load_ablation(write_grid(tmp_path / "g.yaml", TINY)), str(tmp_path / "out"))[0]
    os.makedirs(spec.cfg.output_dir)
    old = {k: v for k, v in spec.cfg.to_dict().items() if k != "divergence_window"}
    write_json(os.path.join(spec.cfg.output_dir, "result.json"), {"config": old, "steps": 4})
    assert load_result(spec.cfg)["steps"] == 4
    write_json(os.path.join(spec.cfg.output_dir, "result.json"), {"config": {**old, "lr": 0.5}, "steps": 4})
    with pytest.raises(ConfigError, match="different config"):
        load_result(spec.cfg)


def test_shipped_fashion_grid_is_the_preregistered_design():
    """configs/ablation/fashion.yaml: the 2x2 factorial of branch ends x output conv on the same
    seeds, warmup as a factor at the edge, the practical lrs, the no-norm deep panel with He and
    Fixup, Fashion-MNIST, final-loss tests with a positive margin, checks that end at max_steps."""
    ab = load_ablation(os.path.join(ROOT, "configs", "ablation", "fashion.yaml"))
    runs = expand(ab, "out")
    assert {r.cfg.dataset for r in runs} == {"fashion_mnist"} and ab.processes == 2
    factorial = {"zero", "zero-branches", "zero-output", "standard"}
    panel_a = [r for r in runs if r.cfg.norm == "group"]
    cells = {(r.cfg.lr, r.cfg.warmup_steps) for r in panel_a}
    for lr, warmup in cells:
        by_arm = {a: sorted(r.seed for r in panel_a if (r.cfg.lr, r.cfg.warmup_steps, r.arm) == (lr, warmup, a))
                  for a in factorial}
        assert all(s == by_arm["zero"] and len(s) >= 6 for s in by_arm.values()), (lr, warmup)
    assert {2e-4, 8e-4} <= {lr for lr, w in cells if w == 0}
    edge = {lr for lr, w in cells if w > 0}
    assert len(edge) == 2 and all((lr, 0) in cells for lr in edge)  # warmup crossed with the edge lrs
    panel_b = [r for r in runs if r.cfg.norm == "none"]
    assert {r.cfg.num_res_blocks for r in panel_b} == {4} and {r.arm for r in panel_b} == {
        "kaiming", "fixup", "zero", "standard"}
    assert ab.primary["measure"] == "final_loss" and ab.primary["arms"] == ["zero", "standard"]
    assert len(ab.secondary) == 5 and ab.equivalence_margin > 0
    assert all(r.cfg.max_steps % ab.failure["eval_every"] == 0 and r.cfg.grad_clip == 0.0 for r in runs)

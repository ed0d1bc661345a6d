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

from unet import ablation
from unet.ablation import expand, init_model, load_ablation, main, run_ablation
from unet.config import ConfigError
from unet.diffusion import GaussianDiffusion
from wandb_offline import read_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {
    "name": "tiny",
    "seeds": 2,
    "threshold": 2.0,
    "smooth": 2,
    "symmetry": {"steps": 3},
    "save_models": False,
    "base": dict(dataset="digits", image_size=8, model_channels=32, channel_mult=[1, 2], attention_resolutions=[4],
                 num_res_blocks=1, batch_size=8, max_steps=4, diffusion_steps=20, eval_batch_size=16, lr=1e-3,
                 warmup_steps=0, grad_clip=0.0, report_to="wandb", log_every=2),
    # two arms x two seeds, and one arm whose learning rate wrecks the weights in one Adam step
    "grid": [{"init": ["zero", "standard"]}, {"lr": 1000.0, "init": ["standard"]}],
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
    assert len(results["runs"]) == 6 and {r["run_id"] for r in results["runs"]} == {
        "c00_zero_s0", "c00_standard_s0", "c00_zero_s1", "c00_standard_s1", "c01_standard_s0", "c01_standard_s1"}
    for r in results["runs"]:
        assert set(r["measures"]) >= {"initial_loss", "steps_to_threshold", "final_eval_loss", "max_grad_norm",
                                      "median_grad_norm", "median_update_ratio", "spike_count", "diverged"}
        assert r["cell_id"] in ("c00", "c01") and r["seed"] in (0, 1)
    report = open(os.path.join(out, "report.md")).read()
    for heading in ("## Main result", "## Conclusions", "## Training loss", "## Gradient norm",
                    "## Activation RMS by depth at init", "## Per-cell tables", "## Symmetry"):
        assert heading in report, heading
    for png in ("loss_curves.png", "loss_difference.png", "grad_norm.png", "update_ratio.png", "activation_rms_init.png", "symmetry.png"):
        assert f"]({png})" in report
        with Image.open(os.path.join(out, png)) as im:
            assert im.format == "PNG" and im.width > 300
    # the zero - standard line of the main table carries the verdict computed from its CI
    comp = results["summary"]["cells"][0]["comparisons"][0]
    d = comp["final_eval_loss"]
    assert (comp["a"], comp["b"], d["n"]) == ("zero", "standard", 2)
    covers = d["mean"] - d["ci"] <= 0 <= d["mean"] + d["ci"]
    assert (d["verdict"] == "indistinguishable") == covers
    assert f"| base | zero vs standard |" in report and d["verdict"] in report
    # save_models: false keeps each run's measures and logs, not its checkpoint
    assert os.path.isfile(os.path.join(out, "runs", "c00_zero_s0", "result.json"))
    assert not os.path.exists(os.path.join(out, "runs", "c00_zero_s0", "checkpoints"))
    # one progress line per run
    assert sum(line.startswith("[") for line in tiny_ablation["lines"]) == 6


def test_diverging_arm_is_recorded_and_the_rest_run_on(tiny_ablation):
    runs = {r["run_id"]: r for r in tiny_ablation["results"]["runs"]}
    for seed in (0, 1):
        bad = runs[f"c01_standard_s{seed}"]
        assert bad["measures"]["diverged"] and bad["steps"] < 4
        assert bad["measures"]["final_eval_loss"] is None
        for arm in ("zero", "standard"):
            good = runs[f"c00_{arm}_s{seed}"]
            assert not good["measures"]["diverged"] and good["steps"] == 4
            assert math.isfinite(good["measures"]["final_eval_loss"])
    cell = tiny_ablation["results"]["summary"]["cells"][1]
    assert cell["arms"]["standard"]["diverged"] == 2
    assert "| diverged | 2/2 |" in open(os.path.join(tiny_ablation["out"], "report.md")).read()


def test_same_seed_same_data_t_and_noise_in_every_arm(tiny_ablation):
    seen = tiny_ablation["seen"]

    def same(a, b, n=None):
        n = n or max(len(a), len(b))
        return len(a) >= n and len(b) >= n and all(
            all(torch.equal(u, v) for u, v in zip(a[i], b[i])) for i in range(n))

    for seed in (0, 1):
        zero, standard = seen[f"c00_zero_s{seed}"], seen[f"c00_standard_s{seed}"]
        assert len(zero) == 5  # four training steps and the held-out batch
        assert same(zero, standard)
        # the diverging cell saw the same batches for as long as it ran
        bad = seen[f"c01_standard_s{seed}"]
        assert same(bad, zero, n=len(bad))
    # and a different seed sees different data and noise
    assert not torch.equal(seen["c00_zero_s0"][0][0], seen["c00_zero_s1"][0][0])
    assert not torch.equal(seen["c00_zero_s0"][0][2], seen["c00_zero_s1"][0][2])
    # while the held-out batch, t and noise are the same for every run
    assert all(same([seen[r][-1]], [seen["c00_zero_s0"][-1]]) for r in ("c00_standard_s1", "c00_zero_s1"))


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


def test_runs_log_to_one_wandb_group_with_cell_and_seed_tags(tiny_ablation):
    out, group = tiny_ablation["out"], tiny_ablation["results"]["group"]
    files = glob.glob(os.path.join(out, "runs", "c01_standard_s1", "wandb", "offline-run-*", "run-*.wandb"))
    run = read_run(files[0])
    assert run.group == group and run.name == "c01_standard_s1"
    assert {"cell:c01", "init:standard", "seed:1", "lr:1000"} <= set(run.tags)
    report_run = read_run(glob.glob(os.path.join(out, "wandb", "offline-run-*", "run-*.wandb"))[0])
    assert report_run.group == group and report_run.name == "report"
    assert any("loss_curves" in h for h in report_run.history)


def test_running_again_continues_without_redoing_runs(tiny_ablation, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(ablation, "run_one", boom)
    monkeypatch.setattr(ablation, "symmetry_run", boom)
    monkeypatch.setattr(ablation, "_log_report", lambda *a: None)
    again = run_ablation(load_ablation(tiny_ablation["config"]), tiny_ablation["out"], log=lambda *a, **k: None)
    assert again["group"] == tiny_ablation["results"]["group"]
    assert again["summary"] == json.loads(json.dumps(tiny_ablation["results"]["summary"]))
    # the report can be rebuilt from results.json alone
    os.remove(os.path.join(tiny_ablation["out"], "report.md"))
    assert main(["--output_dir", tiny_ablation["out"], "--report_only"]) == 0
    assert "## Main result" in open(os.path.join(tiny_ablation["out"], "report.md")).read()
    # a changed grid in the same folder is refused rather than mixed in
    changed = dict(TINY, base={**TINY["base"], "batch_size": 16})
    path = write_grid(os.path.join(os.path.dirname(tiny_ablation["config"]), "changed.yaml"), changed)
    with pytest.raises(ConfigError, match="different config"):
        run_ablation(load_ablation(path), tiny_ablation["out"], log=lambda *a, **k: None)


def test_init_model_is_the_model_training_starts_from(tmp_path):
    """The update ratio of step 1 is measured against ``init_model(cfg)``; a warmup makes
    the first update exactly 0, so after step 1 training holds the init weights."""
    ab = load_ablation(write_grid(tmp_path / "g.yaml", {**TINY, "seeds": [3, 4], "base": {
        **TINY["base"], "report_to": "none", "warmup_steps": 5, "max_steps": 1}}))
    spec = expand(ab, str(tmp_path))[1]
    from unet.training import train

    seen = {}
    train(spec.cfg, hooks=(lambda step, rec, model: seen.update(model.state_dict()),))
    ref = init_model(spec.cfg).state_dict()
    assert spec.arm == "standard" and seen.keys() == ref.keys()
    assert all(torch.equal(seen[k], ref[k]) for k in ref)


def test_shipped_grids():
    digits = load_ablation(os.path.join(ROOT, "configs", "ablation", "digits.yaml"))
    runs = expand(digits, "out")
    assert len(digits.seeds) >= 3
    cells = {(r.cfg.norm, r.cfg.num_res_blocks, r.cfg.lr): set() for r in runs}
    for r in runs:
        cells[(r.cfg.norm, r.cfg.num_res_blocks, r.cfg.lr)].add(r.arm)
    group = [k for k in cells if k[0] == "group" and {"zero", "standard"} <= cells[k]]
    assert len({k[1] for k in group}) >= 2 and len({k[2] for k in group}) >= 2
    assert any(k[0] == "none" and {"zero", "standard", "kaiming", "fixup"} <= v for k, v in cells.items())
    # every run differs from the others only in grid keys and seed
    base = {k: v for k, v in runs[0].cfg.to_dict().items()
            if k not in ("init", "norm", "num_res_blocks", "lr", "seed", "output_dir", "run_name", "tags")}
    assert all({k: r.cfg.to_dict()[k] for k in base} == base for r in runs)
    cifar = load_ablation(os.path.join(ROOT, "configs", "ablation", "cifar10.yaml"))
    c = expand(cifar, "out")[0].cfg
    assert (c.image_size, c.model_channels, c.channels) == (32, 128, 3) and len(cifar.seeds) >= 3


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
    ab = load_ablation(grid, ablation.parse_args(["--seeds", "0,3", "--batch_size=16", "--save_models", "true"]))
    assert ab.seeds == [0, 3] and ab.base["batch_size"] == 16 and ab.save_models is True


def test_saved_run_from_before_a_new_config_key_still_counts(tmp_path):
    """A run saved before a TrainConfig key existed is kept (the key's default is the old
    behaviour); a saved run whose values differ is refused."""
    from unet.ablation_store import load_result, write_json

    spec = expand(load_ablation(write_grid(tmp_path / "g.yaml", TINY)), str(tmp_path / "out"))[0]
    os.makedirs(spec.cfg.output_dir)
    old = {k: v for k, v in spec.cfg.to_dict().items() if k != "divergence_window"}
    write_json(os.path.join(spec.cfg.output_dir, "result.json"), {"config": old, "steps": 4})
    assert load_result(spec.cfg)["steps"] == 4
    write_json(os.path.join(spec.cfg.output_dir, "result.json"), {"config": {**old, "lr": 0.5}, "steps": 4})
    with pytest.raises(ConfigError, match="different config"):
        load_result(spec.cfg)

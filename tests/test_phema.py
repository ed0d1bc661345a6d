"""Post-hoc EMA (issue 26; Karras et al. 2024, EDM2): the power-function EMA and its profile
widths, reconstruction of an EMA length between the stored two against the closed form, the
snapshots through training, rotation and resume, the reconstructed checkpoint through
sample.py, the sweep, and one-line errors."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_training import ROOT, files_equal, subprocess_env
from test_training import tiny as _tiny

from unet.checkpoint import phema as posthoc
from unet.checkpoint.load import load_checkpoint
from unet.cli import phema as phema_script
from unet.config import FIELDS
from unet.train import phema
from unet.train.checkpoint import list_checkpoints
from unet.train.loop import train

T, EVERY = 2000, 100


def tiny(out, **kw):
    """test_training's seconds-long run, without the in-training sample-quality measurement."""
    return _tiny(out, **{**({"fid_every": 0} if "fid_every" in FIELDS else {}), **kw})


def trajectory(k):
    """A known weight trajectory: the weights after step k."""
    return torch.tensor([k / T, (k / T) ** 2, np.sin(3 * k / T), 1.0], dtype=torch.float64)


def closed_form(gamma, t):
    """The power EMA at step t of a trajectory held constant within each step: the weights
    after step k carry the profile's mass over [k-1, k], (k^(g+1) - (k-1)^(g+1)) / t^(g+1)."""
    k = np.arange(1, t + 1, dtype=np.float64)
    w = (k ** (gamma + 1) - (k - 1) ** (gamma + 1)) / t ** (gamma + 1)
    return sum(float(wk) * trajectory(int(kk)) for wk, kk in zip(w, k))


def test_sigma_rel_and_gamma_are_inverse_and_match_the_papers_pairs():
    # EDM2 quotes gamma 16.97 for sigma_rel 0.05 and 6.94 for 0.10
    assert phema.gamma_of_sigma_rel(0.05) == pytest.approx(16.97, abs=5e-3)
    assert phema.gamma_of_sigma_rel(0.10) == pytest.approx(6.94, abs=5e-3)
    for s in (0.01, 0.05, 0.08, 0.2, 0.28):
        assert phema.sigma_rel_of_gamma(phema.gamma_of_sigma_rel(s)) == pytest.approx(s, rel=1e-12)


def test_power_ema_updates_equal_the_closed_form():
    p = torch.nn.Parameter(trajectory(0).float())
    ema = phema.PowerEMA([p], [0.05, 0.10])
    for k in range(1, 201):
        p.data = trajectory(k).float()
        ema.update([p])
    for avg, gamma in zip(ema.averages, ema.gammas):
        # float32 lerps over 200 steps: a few float32 ulps of values up to 1
        assert torch.allclose(avg[0].double(), closed_form(gamma, 200), atol=1e-6)


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """Snapshots every 100 of 2000 steps of the known trajectory, at sigma_rel 0.05 and 0.10."""
    out = str(tmp_path_factory.mktemp("phema"))
    p = torch.nn.Parameter(trajectory(0).float())
    ema = phema.PowerEMA([p], [0.05, 0.10])
    for k in range(1, T + 1):
        p.data = trajectory(k).float()
        ema.update([p])
        if k % EVERY == 0:
            phema.save_snapshot(out, ["w"], ema)
    return out


@pytest.mark.parametrize("sigma_rel", [0.06, 0.08, 0.09])
def test_a_length_between_the_stored_two_is_reconstructed_to_1e_4(stored, sigma_rel):
    weights, info = posthoc.reconstruct(stored, sigma_rel)
    gamma = phema.gamma_of_sigma_rel(sigma_rel)
    err = (weights["w"].double() - closed_form(gamma, T)).abs().max().item()
    # Cauchy-Schwarz: |<fit - target, theta>| <= |fit - target| |theta|, |theta| <= 1 per element
    # on the unit time interval, plus float32 rounding of the snapshots
    bound = info["profile_error"] * np.sqrt(posthoc.profile_inner(1.0, gamma, 1.0, gamma)) + 1e-6
    assert err < 1e-4 and err <= bound
    assert info["step"] == T and info["snapshots"] == T // EVERY and info["profiles"] == 2 * T // EVERY


def test_a_stored_length_is_reconstructed_as_itself(stored):
    weights, info = posthoc.reconstruct(stored, 0.05)
    assert info["profile_error"] < 1e-6
    assert torch.allclose(weights["w"].double(), closed_form(phema.gamma_of_sigma_rel(0.05), T), atol=1e-6)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """6 steps with snapshots every 2, once straight and once as 3 + resume + 3, one checkpoint kept."""
    root = tmp_path_factory.mktemp("phema_runs")
    cfg = tiny(root / "straight", phema_every=2, keep_checkpoints=1, checkpoint_every=3)
    train(cfg)
    half = cfg.replace(output_dir=str(root / "resumed"), max_steps=3)
    train(half)
    train(half.replace(max_steps=6, resume="latest"))
    return cfg, half.replace(max_steps=6)


def test_snapshots_survive_rotation_and_resume_bit_exactly(runs):
    straight, resumed = runs
    assert [os.path.basename(c) for c in list_checkpoints(straight.output_dir)] == ["checkpoint_00000006"]
    steps = sorted(phema.list_snapshots(straight.output_dir))
    assert steps == [2, 4, 6] == sorted(phema.list_snapshots(resumed.output_dir))
    for s in steps:
        a, b = phema.list_snapshots(straight.output_dir)[s], phema.list_snapshots(resumed.output_dir)[s]
        assert files_equal(os.path.dirname(a), os.path.dirname(b), os.path.basename(a))
    # the sigma_rel 0.05 profile at step 6 is the power EMA of the run's own weights
    snap = load_file(phema.list_snapshots(straight.output_dir)[6])
    assert set(k.split("/")[0] for k in snap) == {"0.05", "0.1"}


def test_the_reconstructed_checkpoint_samples_through_sample_py(runs, tmp_path, capsys):
    straight, _ = runs
    out = str(tmp_path / "phema_0.07")
    phema_script.main(["--checkpoint", straight.output_dir, "--sigma_rel", "0.07", "--out", out])
    assert "wrote" in capsys.readouterr().out
    ld = load_checkpoint(out)
    weights, _ = posthoc.reconstruct(straight.output_dir, 0.07)
    assert all(torch.equal(ld.model.state_dict()[k], v) for k, v in weights.items())
    r = subprocess.run([sys.executable, "sample.py", "--checkpoint", out, "--num_samples", "4", "--steps", "5",
                        "--out", str(tmp_path / "samples")], cwd=ROOT, env=subprocess_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    images = np.load(tmp_path / "samples" / "samples.npz")["arr_0"]
    assert images.shape == (4, 8, 8, 1) and images.dtype == np.uint8


def test_the_sweep_writes_the_length_with_the_lowest_frechet_distance(runs, tmp_path, capsys):
    straight, _ = runs
    out = str(tmp_path / "best")
    phema_script.main(["--checkpoint", straight.output_dir, "--sweep", "0.05,0.1", "--out", out,
                       "--num_samples", "20", "--steps", "5"])
    lines = capsys.readouterr().out.splitlines()
    scores = {float(ln.split()[1].rstrip(":")): float(ln.split()[4]) for ln in lines if ln.startswith("sigma_rel")}
    best = min(scores, key=scores.get)
    assert len(scores) == 2 and lines[-1].startswith(f"best sigma_rel {best:g}")
    weights, _ = posthoc.reconstruct(straight.output_dir, best)
    assert all(torch.equal(load_checkpoint(out).model.state_dict()[k], v) for k, v in weights.items())


@pytest.mark.parametrize("argv, words", [
    (["--sigma_rel", "0.2"], ["sigma_rel 0.2", "reconstruct sigma_rel in [0.05, 0.1]"]),
    (["--sigma_rel", "0.01"], ["sigma_rel 0.01", "[0.05, 0.1]"]),
    (["--sweep", "0.06,0.3"], ["sigma_rel 0.3"]),
    ([], ["one of --sigma_rel"]),
])
def test_bad_input_is_one_line_exit_2_before_work(runs, tmp_path, argv, words, capsys):
    straight, _ = runs
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as e:
        phema_script.main(["--checkpoint", straight.output_dir, "--out", str(out), *argv])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert e.value.code == 2 and len(err) == 1 and all(w in err[0] for w in words), err
    assert not out.exists()


def test_a_run_without_snapshots_is_one_line(tmp_path, capsys):
    cfg = tiny(tmp_path / "plain", max_steps=2)
    train(cfg)
    with pytest.raises(SystemExit) as e:
        phema_script.main(["--checkpoint", cfg.output_dir, "--sigma_rel", "0.07", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--phema_every" in err[0]


def test_phema_keys_are_checked_and_fixed_on_resume(tmp_path):
    from unet.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match="phema_sigma_rels"):
        TrainConfig(phema_sigma_rels=[0.05, 0.3])
    cfg = tiny(tmp_path / "r", max_steps=2, phema_every=1)
    train(cfg)
    with pytest.raises(ConfigError, match="'phema_sigma_rels': the checkpoint"):
        train(cfg.replace(max_steps=4, resume="latest", phema_sigma_rels=[0.05, 0.08]))

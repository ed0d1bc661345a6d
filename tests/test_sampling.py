"""Sampling through diffusers' schedulers: the respaced ``ddpm`` scheduler against the core
diffusion and against improved-diffusion's own numbers, learned-variance channels for any C,
seeds independent of batching and processes, and what ``sample.py`` writes and refuses."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from checkpoint_files import write_checkpoint
from cli_errors import refused
from diffusers import DDPMScheduler

from unet.checkpoint.load import load_checkpoint
from unet.cli.sample import main
from unet.config import TrainConfig
from unet.core.diffusion import create_diffusion
from unet.core.model import UNetModel
from unet.sample.sampling import (
    generate,
    make_scheduler,
    model_timesteps,
    sample_batch,
    sample_generators,
    scheduler_kwargs,
)

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "iddpm_reference.pt"


def tiny_model(channels=1, learn_sigma=True, num_classes=None, seed=0):
    """A random-weight model whose output is far from zero (init="standard")."""
    torch.manual_seed(seed)
    return UNetModel(channels, 32, 2 * channels if learn_sigma else channels, 1, (2,), channel_mult=(1, 2),
                     num_classes=num_classes, num_heads=2, use_scale_shift_norm=True, init="standard").eval()


def ddpm_step(scheduler, out, t, x, seed):
    """One diffusers DDPM step with the noise it draws, regenerated from the same seed."""
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    prev = scheduler.step(out, t, x, generator=torch.Generator().manual_seed(seed)).prev_sample
    return prev, noise


@pytest.mark.parametrize("T,K", [(100, 2), (100, 7), (100, 10), (100, 100), (1000, 50), (1000, 250), (4000, 100)])
def test_linspace_spacing_keeps_the_cores_respaced_steps(T, K):
    sched = make_scheduler("ddpm", dict(steps=T, learn_sigma=True, noise_schedule="cosine"))
    sched.set_timesteps(K)
    core = create_diffusion(steps=T, noise_schedule="cosine", timestep_respacing=str(K))
    assert sorted(sched.timesteps.tolist()) == core.timestep_map.tolist()


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("T", [100, 1000])
def test_diffusers_named_schedules_equal_the_cores(schedule, T):
    """diffusers' own betas for the names we give (ddim and dpm-solver++ use them as built;
    ddpm swaps in the core's float64 copy of the same schedule)."""
    core = create_diffusion(steps=T, noise_schedule=schedule)
    dk = dict(steps=T, noise_schedule=schedule)
    for sched in (
        DDPMScheduler(**scheduler_kwargs(dk)),
        make_scheduler("ddim", dk),
        make_scheduler("dpm-solver++", dk),
    ):
        np.testing.assert_allclose(sched.betas.double().numpy(), core.betas, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(sched.alphas_cumprod.double().numpy(), core.alphas_cumprod, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("dk", [
    dict(steps=100, learn_sigma=True, noise_schedule="cosine", rescale_timesteps=True),
    dict(steps=200, learn_sigma=True, noise_schedule="linear"),
    dict(steps=100, noise_schedule="cosine"),  # fixed_large
    dict(steps=100, sigma_small=True, noise_schedule="linear", predict_xstart=True),  # fixed_small, x0-prediction
    dict(steps=1000, learn_sigma=True, noise_schedule="cosine", K=1000),  # unrespaced, down to t=0
], ids=["learned-cosine-rescaled", "learned-linear", "fixed-large", "fixed-small-xstart", "learned-cosine-full"])
def test_respaced_ddpm_step_equals_core_p_mean_variance(dk):
    """At every step of a K-step schedule (the first and last 10 of a long one), for a fixed
    x_t, the diffusers step's mean and variance equal the core's respaced ``p_mean_variance``.
    The scheduler returns only mean + std * noise, so this compares that sample for two
    different noises: equal for both means equal mean and equal std wherever the noises
    differ (all but measure zero)."""
    dk = dict(dk)
    K = dk.pop("K", 10)
    model = tiny_model(learn_sigma=dk.get("learn_sigma", False))
    sched = make_scheduler("ddpm", dk)
    sched.set_timesteps(K)
    core = create_diffusion(**dk, timestep_respacing=str(K))
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    for i, t in enumerate(sched.timesteps):
        if 10 <= i < K - 10:
            continue
        idx = torch.full((3,), K - 1 - i, dtype=torch.long)  # the core's respaced index of step t
        assert core.timestep_map[idx[0]] == t
        with torch.no_grad():
            out = model(x, model_timesteps(t, dk, 3))
            ref = core.p_mean_variance(model, x, idx)
            assert torch.equal(model(x, core.model_timesteps(idx)), out)  # same timesteps seen
        for seed in (2, 3):
            prev, noise = ddpm_step(sched, out, t, x, seed)
            if t > 0:
                expected = ref["mean"] + ref["variance"].sqrt() * noise
            else:  # the last step adds no noise in either implementation
                expected = ref["mean"]
            torch.testing.assert_close(prev, expected, atol=1e-5, rtol=0)


def test_ddpm_step_matches_improved_diffusion_reference():
    """The respaced step against numbers from openai/improved-diffusion itself (fixture:
    3-channel class-conditional model, T=100 cosine, learned range, respaced to 10)."""
    d = torch.load(FIXTURE, weights_only=True)
    case, inp, exp = json.loads(d["case"]), d["inputs"], d["expected"]
    model = UNetModel(**case["model"])
    model.load_state_dict(d["state_dict"])
    model.eval()
    dk = case["diffusion"]
    K = int(case["respacing"])
    sched = make_scheduler("ddpm", dk)
    sched.set_timesteps(K)
    assert sorted(sched.timesteps.tolist()) == exp["respaced_timestep_map"].tolist()
    x_t = exp["respaced_x_t"]
    for j in range(x_t.shape[0]):
        t = exp["respaced_timestep_map"][exp["respaced_t"][j]]
        x = x_t[j:j + 1]
        with torch.no_grad():
            out = model(x, model_timesteps(t, dk, 1), y=inp["y"][j:j + 1])
        for seed in (2, 3):
            prev, noise = ddpm_step(sched, out, t, x, seed)
            std = exp["respaced_pmv_variance"][j:j + 1].sqrt() if t > 0 else 0
            expected = exp["respaced_pmv_mean"][j:j + 1] + std * noise
            # relative to the largest value, as tests/test_fixture.py compares the core; diffusers
            # keeps the schedule in float32 where the original used float64, hence 3e-5, not 1e-5
            assert (prev - expected).abs().max() / expected.abs().max() < 3e-5


class WithGarbageVariance(torch.nn.Module):
    """A learned-sigma model whose variance channels are replaced by huge values: a sampler
    that ignores them must not notice."""

    def __init__(self, model, scale):
        super().__init__()
        self.model, self.scale = model, scale
        self.in_channels, self.num_classes = model.in_channels, model.num_classes

    def forward(self, x, t, **kw):
        out = self.model(x, t, **kw)
        c = x.shape[1]
        return torch.cat([out[:, :c], self.scale * torch.ones_like(out[:, c:])], dim=1)


@pytest.mark.parametrize("scheduler", ["ddim", "dpm-solver++"])
@pytest.mark.parametrize("channels", [1, 4])
def test_fast_samplers_drop_variance_channels_for_any_channel_count(scheduler, channels):
    dk = dict(steps=100, learn_sigma=True, noise_schedule="cosine")
    base = tiny_model(channels=channels)
    a, _ = generate(WithGarbageVariance(base, 0.0), dk, 8, 2, scheduler, 5, seed=0, progress=False)
    b, _ = generate(WithGarbageVariance(base, 1e3), dk, 8, 2, scheduler, 5, seed=0, progress=False)
    assert a.shape == (2, 8, 8, channels)
    assert np.array_equal(a, b)
    assert a.std() > 0


def test_seed_gives_same_images_whatever_the_batching():
    model = tiny_model(num_classes=10)
    dk = dict(steps=100, learn_sigma=True, noise_schedule="cosine")
    a, ya = generate(model, dk, 8, 5, "ddpm", 10, batch_size=5, seed=3, progress=False)
    b, yb = generate(model, dk, 8, 5, "ddpm", 10, batch_size=2, seed=3, progress=False)
    c, _ = generate(model, dk, 8, 5, "ddpm", 10, batch_size=5, seed=4, progress=False)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # float noise of the batch size at most
    assert np.array_equal(ya, yb) and len(set(ya.tolist())) > 1
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 10  # another seed, other images


# --- the command line ----------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    cfg = TrainConfig(image_size=8, channel_mult=[1, 2], attention_resolutions=[4], num_res_blocks=1,
                      num_heads=2, diffusion_steps=50, init="standard", report_to="none")
    torch.manual_seed(0)
    model = UNetModel(**cfg.model_kwargs()).eval()
    root = tmp_path_factory.mktemp("run")
    write_checkpoint(root, cfg, model, ema_scale=0)
    return root


def test_sample_cli_writes_grid_npz_and_pngs(run_dir, tmp_path):
    out = tmp_path / "s"
    main(["--checkpoint", str(run_dir), "--num_samples", "6", "--batch_size", "4", "--steps", "5", "--raw",
          "--scheduler", "dpm-solver++", "--class_labels", "3", "--png", "--out", str(out)])
    npz = np.load(out / "samples.npz")
    assert npz["arr_0"].shape == (6, 8, 8, 1) and npz["arr_0"].dtype == np.uint8
    assert npz["arr_1"].tolist() == [3] * 6
    assert (out / "grid.png").exists() and len(os.listdir(out / "images")) == 6


def test_sample_cli_says_which_layout_auto_took(run_dir, tmp_path, capsys):
    common = ["--checkpoint", str(run_dir), "--num_samples", "2", "--steps", "2", "--scheduler", "ddim"]
    main([*common, "--out", str(tmp_path / "a")])
    assert "memory_format auto: contiguous for sampling" in capsys.readouterr().out  # 32 base channels
    main([*common, "--memory_format", "channels_last", "--out", str(tmp_path / "c")])
    assert "memory_format" not in capsys.readouterr().out  # a fixed layout is what the user asked for


def test_sample_cli_loads_ema_by_default(run_dir, tmp_path):
    """The hand-written EMA weights (all zero) differ from the raw ones, so the same seed
    gives other images; naming the EMA rate gives the default's."""
    common = ["--checkpoint", str(run_dir), "--num_samples", "2", "--steps", "3", "--scheduler", "ddim"]
    main([*common, "--out", str(tmp_path / "e")])
    main([*common, "--ema_rate", "0.999", "--out", str(tmp_path / "e2")])
    main([*common, "--raw", "--out", str(tmp_path / "r")])
    ema, ema2, raw = (np.load(tmp_path / d / "samples.npz")["arr_0"] for d in ("e", "e2", "r"))
    assert np.array_equal(ema, ema2) and not np.array_equal(ema, raw)


@pytest.mark.parametrize("args,message", [
    (["--checkpoint", "/nonexistent/run"], "checkpoint not found: /nonexistent/run"),
    (["--steps", "51"], "out of range: this model was trained with 50 diffusion steps"),
    (["--class_labels", "12"], "out of range for a model with 10 classes"),
    (["--class_labels", "3,x"], "--class_labels takes integers such as '3' or '0,1,2', got '3,x'"),
    (["--steps", "0"], "--steps 0 is out of range"),  # it used to mean all T steps, silently
    (["--seed", "-1"], "--seed -1 is out of range"),  # it used to be numpy's traceback
    (["--num_samples", "0"], "--num_samples and --batch_size must be at least 1"),
])
def test_sample_cli_errors_are_one_line(run_dir, tmp_path, capsys, args, message):
    argv = ["--checkpoint", str(run_dir), "--out", str(tmp_path / "x"), *args]
    assert message in refused(main, argv, capsys)
    assert not (tmp_path / "x").exists()


def test_improved_diffusion_pt_loads_from_its_flags(tmp_path, capsys):
    """The fixture's state dict, saved as an original ``.pt`` file and described by
    improved-diffusion's flags, gives the original's model output."""
    d = torch.load(FIXTURE, weights_only=True)
    torch.save(d["state_dict"], tmp_path / "ema_0.9999_000010.pt")
    flags = dict(image_size=16, num_channels=32, num_res_blocks=1, attention_resolutions="8", channel_mult="1,2",
                 class_cond=True, num_classes=10, num_heads=2, learn_sigma=True, diffusion_steps=100,
                 noise_schedule="cosine", use_scale_shift_norm=True)
    (tmp_path / "flags.yaml").write_text(yaml.safe_dump(flags))
    loaded = load_checkpoint(str(tmp_path / "ema_0.9999_000010.pt"), config=str(tmp_path / "flags.yaml"))
    i = d["inputs"]
    dk = loaded.diffusion_kwargs
    with torch.no_grad():
        out = loaded.model(i["x_start"], i["t"].float() * (1000.0 / dk["steps"]), y=i["y"])
    torch.testing.assert_close(out, d["expected"]["model_out"], atol=1e-5, rtol=1e-5)
    # and sample.py takes it, with the flags as a string too
    main(
        [
            "--checkpoint",
            str(tmp_path / "ema_0.9999_000010.pt"),
            "--config",
            " ".join(f"--{k} {v}" for k, v in flags.items()),
            "--num_samples",
            "2",
            "--steps",
            "2",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert np.load(tmp_path / "o" / "samples.npz")["arr_0"].shape == (2, 16, 16, 3)
    # wrong architecture: one line naming the mismatch
    bad = {**flags, "num_channels": 64}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    message = refused(
        main,
        [
            "--checkpoint",
            str(tmp_path / "ema_0.9999_000010.pt"),
            "--config",
            str(tmp_path / "bad.yaml"),
            "--out",
            str(tmp_path / "b"),
        ],
        capsys,
    )
    assert re.match(r"^error: checkpoint .* does not match the model config: .*wrong shape", message)


def test_corrupt_pt_is_one_line_error(tmp_path, capsys):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    message = refused(main, ["--checkpoint", str(tmp_path / "bad.pt"), "--config", "--image_size 32",
                             "--out", str(tmp_path / "o")], capsys)
    assert message.startswith("error: cannot read checkpoint")


def test_same_seed_same_images_with_two_processes(run_dir, tmp_path):
    """Real 2-process DDP on CPU (accelerate's MULTI_CPU): each process samples its share,
    and the gathered result equals a 1-process run."""
    common = ["--checkpoint", str(run_dir), "--num_samples", "5", "--batch_size", "2", "--steps", "4", "--raw",
              "--seed", "7"]
    main([*common, "--out", str(tmp_path / "one")])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                        str(ROOT / "sample.py"), *common, "--out", str(tmp_path / "two")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "(2 processes)" in r.stdout  # really two, not accelerate's silent single process
    one, two = (np.load(tmp_path / d / "samples.npz") for d in ("one", "two"))
    assert np.abs(one["arr_0"].astype(int) - two["arr_0"].astype(int)).max() <= 1
    assert np.array_equal(one["arr_1"], two["arr_1"])


class Wild(torch.nn.Module):
    """Predicts a huge noise everywhere: an x_0 estimate far outside the data range."""

    in_channels, num_classes = 1, None

    def forward(self, x, t, **kw):
        return torch.full_like(x, -50.0)


@pytest.mark.parametrize("scheduler", ["ddim", "dpm-solver++"])
def test_fast_samplers_clip_the_x0_estimate_like_ddpm(scheduler):
    """All three samplers clip x_0 to [-1, 1] (the original's clip_denoised); the last step of
    ddim and dpm-solver++ returns that estimate, so their output stays in range. Without the
    clip, dpm-solver++ turns the digits model's samples into saturated noise at 20 steps."""
    dk = dict(steps=1000, noise_schedule="cosine")
    gens = sample_generators(0, range(2))
    x = sample_batch(Wild(), make_scheduler(scheduler, dk), dk, 10, (2, 1, 8, 8), gens)
    assert x.abs().max() <= 1.0 + 1e-6 and x.abs().max() > 0.99


# --- the output folder: checked before any sampling -------------------------------------

def no_sampling(*args, **kwargs):
    raise AssertionError("sampling started before the output folder was checked")


@pytest.mark.parametrize("below", ["", "sub"], ids=["out-is-a-file", "out-below-a-file"])
def test_sample_cli_refuses_an_out_it_cannot_write_before_sampling(run_dir, tmp_path, capsys, monkeypatch, below):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / below if below else tmp_path / "file"
    monkeypatch.setattr("unet.cli.sample.generate", no_sampling)
    message = refused(main, ["--checkpoint", str(run_dir), "--out", str(out)], capsys)
    assert message.startswith(f"error: --out {out}: cannot create the output folder")
    assert (tmp_path / "file").read_text() == "x"


def test_sample_cli_refuses_a_read_only_out_before_sampling(run_dir, tmp_path, capsys, monkeypatch):
    """A folder this user may not write (simulated through os.access: root, who runs the CI
    here, may write anywhere)."""
    (tmp_path / "ro").mkdir()
    monkeypatch.setattr("unet.cli.sample.generate", no_sampling)
    monkeypatch.setattr("unet.cli.sample.os.access", lambda path, mode: os.path.abspath(path) != str(tmp_path / "ro"))
    message = refused(main, ["--checkpoint", str(run_dir), "--out", str(tmp_path / "ro")], capsys)
    assert message == f"error: --out {tmp_path / 'ro'}: the output folder is not writable"


def test_reused_out_keeps_no_stale_pngs(run_dir, tmp_path):
    common = ["--checkpoint", str(run_dir), "--steps", "2", "--scheduler", "ddim", "--out", str(tmp_path / "o")]
    main([*common, "--num_samples", "5", "--png"])
    (tmp_path / "o" / "images" / "notes.txt").write_text("mine")
    main([*common, "--num_samples", "2", "--png"])
    assert sorted(os.listdir(tmp_path / "o" / "images")) == ["000000.png", "000001.png", "notes.txt"]
    main([*common, "--num_samples", "3"])  # no --png: the last run's PNGs would no longer match samples.npz
    assert os.listdir(tmp_path / "o" / "images") == ["notes.txt"]
    assert np.load(tmp_path / "o" / "samples.npz")["arr_0"].shape[0] == 3

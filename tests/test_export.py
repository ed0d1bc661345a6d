"""Export to a stock diffusers pipeline: the converted UNet2DModel computes what ours does,
the pipeline runs where this package cannot be imported and samples what sample.py samples,
and models UNet2DModel cannot express are refused in one line."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoint_files import write_checkpoint
from cli_errors import refused
from PIL import Image

from unet.checkpoint.load import Loaded
from unet.cli.export import main
from unet.config import TrainConfig
from unet.core.diffusion import create_diffusion
from unet.core.model import UNetModel
from unet.sample.export import ExportError, export_scheduler, max_output_difference, to_unet2d
from unet.sample.sampling import generate, sample_generators

FIXTURE = Path(__file__).parent / "fixtures" / "iddpm_reference.pt"


def loaded(seed=0, image_size=16, steps=1000, **overrides):
    kw = dict(in_channels=1, model_channels=32, out_channels=2, num_res_blocks=1, attention_resolutions=(2,),
              channel_mult=(1, 2, 2), num_classes=10, num_heads=2, use_scale_shift_norm=True, init="standard")
    kw.update(overrides)
    torch.manual_seed(seed)
    return Loaded(
        UNetModel(**kw).eval(),
        kw,
        dict(steps=steps, learn_sigma=kw["out_channels"] == 2 * kw["in_channels"]),
        image_size,
    )


@pytest.mark.parametrize("overrides", [
    dict(),  # class-conditional, scale-shift, learned sigma, attention at one level + middle
    dict(use_scale_shift_norm=False, num_classes=None, num_res_blocks=2),
    dict(in_channels=3, out_channels=3, attention_resolutions=(2, 4), channel_mult=(1, 2, 2), num_heads=2),
    dict(attention_resolutions=(), num_heads=1, channel_mult=(1, 2), dropout=0.1),  # attention in the middle only
], ids=["cond-scale-shift", "uncond-additive", "rgb-two-attention-levels", "mid-attention-only"])
def test_unet2d_output_equals_ours(overrides):
    ld = loaded(**overrides)
    unet = to_unet2d(ld)
    with torch.no_grad():
        x = torch.randn(2, ld.model.in_channels, 16, 16)
        typical = ld.model(x, torch.tensor([10, 900]), **({"y": torch.tensor([1, 2])} if ld.model.num_classes else {}))
    assert typical.abs().mean() > 0.1  # a random-weight model whose output is far from zero
    assert max_output_difference(ld, unet, batch=3) < 1e-5


def test_improved_diffusion_weights_convert():
    """The fixture's model (weights from openai/improved-diffusion's layout) converts exactly;
    its diffusion rescales timesteps by 1000/100, which a DDPMPipeline cannot, so export refuses it."""
    d = torch.load(FIXTURE, weights_only=True)
    case = json.loads(d["case"])
    model = UNetModel(**case["model"])
    model.load_state_dict(d["state_dict"])
    ld = Loaded(model.eval(), case["model"], {**case["diffusion"], "rescale_timesteps": False}, case["image_size"])
    assert max_output_difference(ld, to_unet2d(ld), batch=4) < 1e-5
    with pytest.raises(ExportError, match="rescale_timesteps"):
        to_unet2d(Loaded(model, case["model"], case["diffusion"], case["image_size"]))


def test_rescaled_4000_step_model_exports_respaced_to_1000_steps():
    """A T=4000 model with rescale_timesteps (the shipped CIFAR-10 and ImageNet-64 configs)
    sees t/4. The exported scheduler is the process respaced to every 4th step, so the
    pipeline's step index j is the timestep the model expects, and each pipeline step equals
    the core's ``timestep_respacing="ddim1000"`` step (mean and variance, to 1e-5; within
    the last few steps to 1e-3, as the stock scheduler keeps 1 - alpha-bar in float32)."""
    dk = dict(steps=4000, learn_sigma=True, noise_schedule="cosine", rescale_timesteps=True)
    sched = export_scheduler(dk)
    core = create_diffusion(**dk, timestep_respacing="ddim1000")
    assert core.timestep_map.tolist() == list(range(0, 4000, 4))
    np.testing.assert_allclose(sched.betas.double().numpy(), core.betas, rtol=1e-6)
    sched.set_timesteps(1000)  # DDPMPipeline's default
    model = loaded(seed=1).model
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([3, 4])
    for j in (999, 400, 3, 0):
        idx = torch.full((2,), j)
        assert torch.equal(core.model_timesteps(idx), idx.float())  # the step index is the model's timestep
        with torch.no_grad():
            ref = core.p_mean_variance(model, x, idx, model_kwargs={"y": y})
            out = model(x, idx, y=y)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(j))
        prev = sched.step(out, j, x, generator=torch.Generator().manual_seed(j)).prev_sample
        expected = ref["mean"] + (ref["variance"].sqrt() * noise if j > 0 else 0)
        torch.testing.assert_close(prev, expected, atol=1e-5 if j > 100 else 1e-3, rtol=0)


@pytest.mark.parametrize("overrides,message", [
    (dict(attention_resolutions=(1, 2), channel_mult=(1, 2), num_heads=1), r"one attention head width .* 32 .* 64"),
    (dict(num_heads_upsample=4), r"one attention head width"),
    (dict(norm="none", init="standard"), "GroupNorm"),
    (dict(init="fixup"), "Fixup"),
    (dict(conv_resample=False), "conv_resample=False"),
])
def test_unexpressible_models_are_refused(overrides, message):
    with pytest.raises(ExportError, match=message):
        to_unet2d(loaded(**overrides))


# A subprocess in which this package cannot be imported, even though it is installed: what
# runs there needs only stock torch and diffusers.
WITHOUT_UNET = textwrap.dedent("""
    import sys
    sys.modules["unet"] = None
    try:
        import unet
    except ImportError:
        unet = None
    assert unet is None, "unet is importable"
""")


def run_without_unet(script, args, cwd, timeout):
    """Run ``script`` with ``args`` where ``unet`` is unimportable: (its stdout, its last stdout line as JSON)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                       env=env, timeout=timeout)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout, json.loads(r.stdout.strip().splitlines()[-1])


PIPELINE_SCRIPT = WITHOUT_UNET + textwrap.dedent("""
    import json
    import numpy as np, torch
    from diffusers import DDPMPipeline
    pipe = DDPMPipeline.from_pretrained(sys.argv[1])
    g = torch.Generator().manual_seed(int(sys.argv[2]))
    img = pipe(batch_size=1, generator=g, num_inference_steps=int(sys.argv[3]), output_type="np").images
    np.save(sys.argv[4], img)
    print(json.dumps(dict(variance_type=pipe.scheduler.config.variance_type, shape=list(img.shape))))
""")


def test_export_cli_pipeline_runs_without_this_package(tmp_path):
    """``python -m unet.export`` on a training checkpoint; stock ``DDPMPipeline`` loads the
    result in a process where ``unet`` cannot be imported, and samples the same image as
    ``sample.py``'s ddpm sampler for the same noise."""
    cfg = TrainConfig(image_size=8, channel_mult=[1, 2], attention_resolutions=[4], num_res_blocks=1, num_heads=2,
                      diffusion_steps=50, class_cond=False, init="standard", report_to="none")
    torch.manual_seed(0)
    model = UNetModel(**cfg.model_kwargs()).eval()
    write_checkpoint(tmp_path / "run", cfg, model)
    main([str(tmp_path / "run"), str(tmp_path / "pipe")])
    assert (tmp_path / "pipe" / "model_index.json").exists()

    seed, steps = 5, 4
    g_seed = sample_generators(seed, [0])[0].initial_seed()  # sample 0's generator in sample.py
    _, info = run_without_unet(PIPELINE_SCRIPT, [tmp_path / "pipe", g_seed, steps, tmp_path / "img.npy"], tmp_path, 300)
    assert info == dict(variance_type="learned_range", shape=[1, 8, 8, 1])
    theirs = np.load(tmp_path / "img.npy")[0] * 255
    ours, _ = generate(model, cfg.diffusion_kwargs(), 8, 1, "ddpm", steps, seed=seed, progress=False)
    assert np.abs(theirs - ours[0].astype(np.float64)).max() <= 1.0  # rounding to uint8 at most


def test_export_cli_errors_are_one_line(tmp_path, capsys):
    message = refused(main, [str(tmp_path / "missing"), str(tmp_path / "out")], capsys)
    assert message == f"error: checkpoint not found: {tmp_path / 'missing'}"
    assert not (tmp_path / "out").exists()


# --- class-conditional models: the copied pipeline, with guidance ----------------------

CONDITIONAL_SCRIPT = WITHOUT_UNET + textwrap.dedent("""
    import json, re
    import numpy as np, torch
    folder, seed, steps, result = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    # the model card's three lines, run as they are written
    code = re.search(r"```python\\n(.*?)```", open(folder + "/README.md").read(), re.S).group(1)
    assert len(code.strip().splitlines()) == 3, code
    exec(code)
    images = {}
    for label in (3, 7):
        for w in (1.0, 2.0):
            try:
                images[f"{label}_{w:g}"] = pipe(class_labels=[label], guidance_scale=w, num_inference_steps=steps,
                                                generator=torch.Generator().manual_seed(seed), output_type="np").images
            except ValueError as e:
                print("refused:", e)
    np.savez(result, **images)
    print(json.dumps(dict(pipeline=type(pipe).__name__, null=pipe.config.null_class_label)))
""")


@pytest.mark.parametrize("dropout", [0.1, 0.0], ids=["label-dropout", "no-label-dropout"])
def test_class_conditional_export_runs_without_this_package(tmp_path, dropout):
    """The default digits architecture (random weights, so that labels matter): exported, it
    loads with stock diffusers and torch in a process where ``unet`` cannot be imported; the
    model card's three lines write a labelled grid; for a label and guidance scale the pipeline
    samples what ``sample.py`` samples for the same noise; guidance is refused without a null label."""
    cfg = TrainConfig(init="standard", class_dropout_prob=dropout, report_to="none")
    torch.manual_seed(0)
    model = UNetModel(**cfg.model_kwargs()).eval()
    write_checkpoint(tmp_path / "run", cfg, model)
    main([str(tmp_path / "run"), str(tmp_path / "pipe")])
    card = (tmp_path / "pipe" / "README.md").read_text()
    assert f"class_dropout_prob: {dropout}" in card and '"model_channels": 32' in card
    assert (tmp_path / "pipe" / "pipeline.py").exists() and (tmp_path / "pipe" / "guidance.py").exists()

    seed, steps = 5, 4
    g_seed = sample_generators(seed, [0])[0].initial_seed()  # sample 0's generator in sample.py
    out, info = run_without_unet(CONDITIONAL_SCRIPT, [tmp_path / "pipe", g_seed, steps, tmp_path / "theirs.npz"],
                                 tmp_path, 600)
    null = 10 if dropout else None
    assert info == dict(pipeline="ClassConditionalDDPMPipeline", null=null)
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (640, 128)  # 2 rows of the 10 classes, 8x8 digits shown at 64x64
    theirs = dict(np.load(tmp_path / "theirs.npz"))
    assert sorted(theirs) == (["3_1", "3_2", "7_1", "7_2"] if dropout else ["3_1", "7_1"])
    assert ("refused: this model was trained without label dropout" in out) == (not dropout)
    for key, img in theirs.items():
        label, w = int(key.split("_")[0]), float(key.split("_")[1])
        ours, _ = generate(model, cfg.diffusion_kwargs(), 8, 1, "ddpm", steps, seed=seed, class_labels=[label],
                           guidance_scale=w, null_label=null, progress=False)
        assert np.abs(img[0] * 255 - ours[0].astype(np.float64)).max() <= 1.0  # rounding to uint8 at most
    assert np.abs(theirs["3_1"] - theirs["7_1"]).max() > 0.1  # the label is used
    if dropout:
        assert np.abs(theirs["3_1"] - theirs["3_2"]).max() > 0.1  # and so is the guidance scale


def test_export_refuses_an_out_that_is_a_file_before_loading(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    message = refused(main, [str(tmp_path / "missing"), str(tmp_path / "file")], capsys)
    assert message == f"error: the output {tmp_path / 'file'} is a file; give a folder (it is created if missing)"
    assert (tmp_path / "file").read_text() == "x"


def test_export_model_card_shows_measured_quality(tmp_path, capsys):
    cfg = TrainConfig(image_size=8, channel_mult=[1, 2], attention_resolutions=[4], num_res_blocks=1, num_heads=2,
                      diffusion_steps=50, class_cond=False, init="standard", report_to="none")
    write_checkpoint(tmp_path / "run", cfg, UNetModel(**cfg.model_kwargs()).eval())
    rows = [dict(scheduler="ddpm", steps=50, guidance_scale=1.0, images_per_s=3.0, fd=1.234, fd_floor=0.987)]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    (tmp_path / "pipe").mkdir()
    for stale in ("pipeline.py", "guidance.py"):  # left by a class-conditional export into the same folder
        (tmp_path / "pipe" / stale).write_text("# stale")
    main([str(tmp_path / "run"), str(tmp_path / "pipe"), "--quality", str(tmp_path / "rows.json")])
    card = (tmp_path / "pipe" / "README.md").read_text()
    assert "| ddpm | 50 | 1 | 1.23 (0.99) | - | 3.0 |" in card and "DDPMPipeline.from_pretrained" in card
    assert not (tmp_path / "pipe" / "pipeline.py").exists() and not (tmp_path / "pipe" / "guidance.py").exists()
    seeds = [dict(rows[0], seed=s, fd=1.0 + s / 10, fd_floor=1.0) for s in range(3)]  # benchmark --seeds 3
    (tmp_path / "seeds.json").write_text(json.dumps(seeds))
    main([str(tmp_path / "run"), str(tmp_path / "pipe3"), "--quality", str(tmp_path / "seeds.json")])
    card = (tmp_path / "pipe3" / "README.md").read_text()
    assert card.count("| ddpm | 50 | 1 |") == 1 and "| ddpm | 50 | 1 | 1.10 (1.00) | - | 3.0 |" in card
    assert "means over 3 seeds" in card
    (tmp_path / "bad.json").write_text("{}")
    message = refused(main, [str(tmp_path / "run"), str(tmp_path / "pipe2"), "--quality", str(tmp_path / "bad.json")],
                      capsys)
    assert "expected the JSON rows of 'evaluate.py benchmark --json'" in message

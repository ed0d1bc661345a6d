"""Classifier-free guidance: the rule (``guidance.guided_output``), the sampler's one batched
pass over [cond; null], labels never drawn from the null class, every scheduler, and what
``sample.py --guidance_scale`` refuses."""

import numpy as np
import pytest
import torch
from checkpoint_files import write_checkpoint
from cli_errors import refused

from unet.cli.sample import main
from unet.config import TrainConfig
from unet.core.model import UNetModel
from unet.sample.guidance import guided_output
from unet.sample.sampling import SCHEDULERS, generate, model_output, null_class_label

DK = dict(steps=100, learn_sigma=True, noise_schedule="cosine")


def cfg_model(num_classes=10, learn_sigma=True, seed=0):
    """A random-weight model with ``num_classes`` label embeddings (the last is the null
    label when the model stands for one trained with label dropout)."""
    torch.manual_seed(seed)
    return UNetModel(1, 32, 2 if learn_sigma else 1, 1, (2,), channel_mult=(1, 2), num_classes=num_classes,
                     num_heads=2, use_scale_shift_norm=True, init="standard").eval()


# --- the rule --------------------------------------------------------------------------

def test_guided_output_is_classifier_free_guidance_on_the_mean_channels():
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)  # C = 2 + 2 variance
    for w in (0.0, 0.5, 2.0, 7.5):
        out = guided_output(cond, uncond, w, channels=2)
        # Ho & Salimans' uncond + w (cond - uncond): the same value, rounded another way (|values| < 40: 1e-5)
        torch.testing.assert_close(out[:, :2], uncond[:, :2] + w * (cond[:, :2] - uncond[:, :2]), atol=1e-5, rtol=0)
        assert torch.equal(out[:, 2:], cond[:, 2:])  # learned variance: the conditional pass's own
    assert torch.equal(guided_output(cond, uncond, 1.0, 2), cond)  # w = 1: exactly the conditional output
    for w in (0.0, 3.0):
        assert torch.equal(guided_output(cond, cond.clone(), w, 2), cond)  # nothing to extrapolate
    torch.testing.assert_close(guided_output(cond, uncond, 0.0, 2)[:, :2], uncond[:, :2], atol=1e-6, rtol=0)


class CountingModel(torch.nn.Module):
    """Counts forward passes and the batch sizes they see."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []
        self.in_channels, self.num_classes = model.in_channels, model.num_classes

    def forward(self, x, t, **kw):
        self.calls.append(len(x))
        return self.model(x, t, **kw)


def test_guided_model_output_is_one_batched_pass_over_cond_and_null():
    model = cfg_model(num_classes=11)
    counting = CountingModel(model)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t, y = torch.tensor([5, 50, 99]), torch.tensor([0, 4, 9])
    with torch.no_grad():
        out = model_output(counting, x, t, y, null_label=10, guidance_scale=3.0)
        cond, uncond = model(x, t, y=y), model(x, t, y=torch.full_like(y, 10))
    assert counting.calls == [6]
    # the two halves of one batch of 6 against two batches of 3: the same numbers up to float
    # reassociation in the convolutions (outputs are O(1): 1e-5)
    torch.testing.assert_close(out, guided_output(cond, uncond, 3.0, 1), atol=1e-5, rtol=0)
    assert (cond - uncond)[:, :1].abs().max() > 1e-2  # the null label changes the prediction
    with torch.no_grad():
        assert torch.equal(model_output(counting, x, t, y, null_label=10, guidance_scale=1.0), cond)
    assert counting.calls == [6, 3]  # w = 1: the conditional pass alone


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler_guides(scheduler):
    """w = 1 is plain conditional sampling, bit for bit; another w changes the images, with the
    same labels; the labels are drawn from the 10 real classes only."""
    model = cfg_model(num_classes=11)
    common = dict(scheduler=scheduler, steps=4, seed=0, progress=False)
    plain, y_plain = generate(model, DK, 8, 6, class_labels=[1, 7], **common)
    one, y_one = generate(model, DK, 8, 6, class_labels=[1, 7], null_label=10, **common)
    three, y_three = generate(model, DK, 8, 6, class_labels=[1, 7], null_label=10, guidance_scale=3.0, **common)
    assert np.array_equal(plain, one) and y_one.tolist() == y_three.tolist() == [1, 7] * 3
    assert np.abs(one.astype(int) - three.astype(int)).mean() > 5


def test_random_labels_never_use_the_null_class():
    model = cfg_model(num_classes=11)
    _, y = generate(model, DK, 8, 200, "ddim", 1, batch_size=200, seed=0, null_label=10, progress=False)
    assert y.max() == 9 and set(y.tolist()) == set(range(10))


def test_learned_variance_of_the_guided_ddpm_step_comes_from_the_conditional_pass():
    """A model whose variance channels depend on the label only through the null class: with
    guidance, ddpm must sample as with the conditional variance, whatever the null pass says."""

    class NullVariance(torch.nn.Module):
        in_channels, num_classes = 1, 11

        def __init__(self, v_null):
            super().__init__()
            self.v_null = v_null

        def forward(self, x, t, y):
            mean = 0.1 * x + 0.01 * y[:, None, None, None]
            var = torch.where(y[:, None, None, None] == 10, torch.full_like(x, self.v_null), torch.zeros_like(x))
            return torch.cat([mean, var], dim=1)

    a, _ = generate(NullVariance(-1.0), DK, 8, 4, "ddpm", 5, class_labels=[3], null_label=10, guidance_scale=2.0,
                    progress=False)
    b, _ = generate(NullVariance(1.0), DK, 8, 4, "ddpm", 5, class_labels=[3], null_label=10, guidance_scale=2.0,
                    progress=False)
    assert np.array_equal(a, b) and a.std() > 0


# --- the command line ------------------------------------------------------------------

def run_dir(root, **overrides):
    cfg = TrainConfig(image_size=8, channel_mult=[1, 2], attention_resolutions=[4], num_res_blocks=1, num_heads=2,
                      diffusion_steps=50, init="standard", report_to="none", **overrides)
    torch.manual_seed(0)
    write_checkpoint(root, cfg, UNetModel(**cfg.model_kwargs()).eval())
    return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    cfgs = {name: run_dir(root / name, **kw) for name, kw in
            dict(cfg=dict(class_dropout_prob=0.1), cond=dict(), uncond=dict(class_cond=False)).items()}
    return root, cfgs


def test_null_label_is_the_extra_last_embedding(runs):
    _, cfgs = runs
    assert null_class_label(cfgs["cfg"]) == 10 and cfgs["cfg"].model_kwargs()["num_classes"] == 11
    assert null_class_label(cfgs["cond"]) is None and null_class_label(cfgs["uncond"]) is None
    assert null_class_label(None) is None  # an original .pt described by explicit kwargs


def test_sample_cli_guides_a_label_dropout_model(runs, tmp_path):
    root, _ = runs
    common = ["--checkpoint", str(root / "cfg"), "--num_samples", "4", "--steps", "3", "--raw", "--scheduler", "ddim"]
    main([*common, "--out", str(tmp_path / "w1")])
    main([*common, "--guidance_scale", "2.5", "--out", str(tmp_path / "w2")])
    w1, w2 = (np.load(tmp_path / d / "samples.npz") for d in ("w1", "w2"))
    assert np.array_equal(w1["arr_1"], w2["arr_1"]) and w1["arr_1"].max() < 10  # same labels, real classes only
    assert not np.array_equal(w1["arr_0"], w2["arr_0"])


@pytest.mark.parametrize("run,args,message", [
    ("cfg", ["--guidance_scale", "-1"], "--guidance_scale must be a finite number >= 0"),
    ("cfg", ["--guidance_scale", "nan"], "--guidance_scale must be a finite number >= 0"),
    ("cfg", ["--class_labels", "10"], "out of range for a model with 10 classes"),  # the null label is no class
    ("cond", ["--guidance_scale", "2"], "was trained without label dropout"),
    ("uncond", ["--guidance_scale", "2"], "this one is unconditional"),
])
def test_sample_cli_refuses_guidance_it_cannot_do(runs, tmp_path, capsys, run, args, message):
    root, _ = runs
    text = refused(main, ["--checkpoint", str(root / run), "--out", str(tmp_path / "x"), *args], capsys)
    assert message in text
    assert not (tmp_path / "x").exists()


def test_guidance_scale_one_is_accepted_for_any_model(runs, tmp_path):
    root, _ = runs
    for run in ("cond", "uncond"):
        main(["--checkpoint", str(root / run), "--num_samples", "2", "--steps", "2", "--guidance_scale", "1",
              "--out", str(tmp_path / run)])
        assert (tmp_path / run / "samples.npz").exists()

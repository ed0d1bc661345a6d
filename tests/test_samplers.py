"""Every offered sampler, wired to this model's output: on data that is a single image x0 the exact
noise prediction is known in closed form, eps(x_t, t) = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t),
so every sampler's x_0 prediction is x0 at every step and a correctly wired sampler (its timesteps,
the learned-variance channels sliced off for any channel count, its noise) ends at x0. A sampler
fed the wrong timesteps, channels or noise scale ends elsewhere. The samplers' quality on a trained
model is measured in docs/sampling.md; ``test_samplers_reach_the_judges_band`` (slow) checks it."""

import math

import numpy as np
import pytest
import torch

from unet.core.diffusion import get_named_beta_schedule
from unet.sample.sampling import SCHEDULERS, generate, make_scheduler, sample_batch, sample_generators

T = 1000


class PointMass(torch.nn.Module):
    """The exact noise prediction for data that is one image ``x0`` (float64 inside)."""

    num_classes = None

    def __init__(self, x0, schedule, learn_sigma):
        super().__init__()
        self.abar = torch.from_numpy(np.cumprod(1 - get_named_beta_schedule(schedule, T)))
        self.x0, self.learn_sigma, self.in_channels = x0, learn_sigma, x0.shape[1]

    def forward(self, x, t, y=None):
        abar = self.abar[t].view(-1, 1, 1, 1)
        eps = ((x.double() - abar.sqrt() * self.x0) / (1 - abar).sqrt()).float()
        # the variance channels hold 0: the middle of the learned range, any value would do
        return torch.cat([eps, torch.zeros_like(eps)], 1) if self.learn_sigma else eps


def tolerance(schedule, noise_bound):
    """In uint8 units: rounding (0.5), plus the noise still in an image that a sampler ends at t = 0
    rather than at abar = 1 (sqrt(1 - abar_0) times the largest noise value), plus float32
    arithmetic on values of order 1 divided by sqrt(1 - abar) >= sqrt(beta_0) (1e-3 of a unit)."""
    abar0 = 1 - get_named_beta_schedule(schedule, T)[0]
    return 0.5 + 127.5 * (math.sqrt(1 - abar0) * noise_bound + 1e-3)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("schedule,learn_sigma,channels", [("cosine", True, 1), ("linear", False, 3),
                                                           ("cosine", True, 3)])
def test_every_sampler_lands_on_the_one_image_the_data_holds(scheduler, schedule, learn_sigma, channels):
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(1, channels, 8, 8, generator=g, dtype=torch.float64) * 1.6 - 0.8
    model = PointMass(x0, schedule, learn_sigma)
    kwargs = dict(steps=T, noise_schedule=schedule, learn_sigma=learn_sigma)
    images, _ = generate(model, kwargs, 8, 6, scheduler, 10, batch_size=3, seed=1, progress=False)
    target = (x0[0].permute(1, 2, 0).numpy() + 1) * 127.5
    # the initial noise is N(0, 1): of at most 6 x 3 x 64 values, one exceeds 5 with probability < 1e-3
    noise = 5.0
    err = np.abs(images.astype(np.float64) - target).max()
    assert err <= tolerance(schedule, noise), (scheduler, err)


@pytest.mark.parametrize("scheduler", [s for s in SCHEDULERS if s not in ("ddpm", "ddim")])
def test_a_model_given_the_wrong_timesteps_does_not_land(scheduler):
    # the check above can fail: a model that reads its timestep as half what it is (the slip of
    # a timestep rescaled twice, or not at all) does not reach x0 with the multistep solvers.
    # (DDPM and DDIM re-derive x_0 from scratch at every step and still land on a point mass.)
    x0 = torch.full((1, 1, 8, 8), 0.5, dtype=torch.float64)

    class Halved(PointMass):
        def forward(self, x, t, y=None):
            return super().forward(x, t // 2)

    model = Halved(x0, "cosine", True)
    kwargs = dict(steps=T, noise_schedule="cosine", learn_sigma=True)
    x = sample_batch(model, make_scheduler(scheduler, kwargs), kwargs, 10, (2, 1, 8, 8), sample_generators(0, [0, 1]))
    assert (x.double() - x0).abs().max() > 0.05


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_samples_do_not_depend_on_the_batch_size(scheduler):
    x0 = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    model = PointMass(x0, "cosine", True)

    class Noisy(torch.nn.Module):  # an imperfect prediction: stochastic samplers' noise shows
        num_classes, in_channels = None, 1

        def forward(self, x, t, y=None):
            return model(x, t) * 0.9

    kwargs = dict(steps=T, noise_schedule="cosine", learn_sigma=True)
    a, _ = generate(Noisy(), kwargs, 8, 5, scheduler, 6, batch_size=5, seed=3, progress=False)
    b, _ = generate(Noisy(), kwargs, 8, 5, scheduler, 6, batch_size=2, seed=3, progress=False)
    assert np.array_equal(a, b)


# The step counts docs/sampling.md measured for each sampler, and the band it found there: on 2,000
# samples (two seeds) every one of these drew the requested digit at least 96.5% of the time, at a
# Frechet distance in the judge's features within 0.3 of the real digits' own floor.
MEASURED = [("ddim", 50), ("dpm-solver++", 20), ("dpm-solver++", 10), ("dpm-solver++-sde", 20), ("unipc", 20),
            ("unipc", 10), ("deis", 20), ("deis", 10)]


@pytest.mark.slow
def test_samplers_reach_the_judges_band(tmp_path):
    """The digits default trained (about 4 minutes on 2 cores), then each sampler at its measured
    step count on 500 samples: accuracy >= 0.90 and Frechet distance <= floor + 1 (a wider band than
    the measured one, for 500 samples and another training run)."""
    from unet.checkpoint.load import load_checkpoint
    from unet.config import TrainConfig
    from unet.evaluation.quality import digit_reference
    from unet.evaluation.samplers import benchmark
    from unet.train.loop import train

    cfg = TrainConfig(output_dir=str(tmp_path / "digits"), report_to="none", progress=False, fid_every=0,
                      sample_every=-1, eval_every=0, diagnostics_every=0)
    assert train(cfg)["steps"] == cfg.max_steps
    loaded = load_checkpoint(cfg.output_dir)
    rows = benchmark(loaded, MEASURED, 500, reference=digit_reference(cfg.image_size))
    for r in rows:
        assert r["accuracy"] >= 0.90 and r["fd"] <= r["fd_floor"] + 1.0, r

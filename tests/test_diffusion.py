"""Diffusion math beyond the fixture: schedules, respacing, the three objectives, samplers."""

import itertools
import math

import numpy as np
import pytest
import torch

from unet.core.diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    create_diffusion,
    discretized_gaussian_log_likelihood,
    get_named_beta_schedule,
    normal_kl,
    space_timesteps,
)
from unet.core.model import UNetModel
from unet.core.resample import LossSecondMomentResampler, create_named_schedule_sampler


def test_space_timesteps_forms():
    assert space_timesteps(100, "10") == list(range(0, 100, 11))
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    # "a,b": the first half keeps 10 steps, the second 1 (its first step).
    steps = space_timesteps(100, "10,1")
    assert len(steps) == 11 and steps[-1] == 50 and max(steps[:10]) == 49
    assert space_timesteps(10, [10]) == list(range(10))
    with pytest.raises(ValueError, match="cannot create exactly 30 steps"):
        space_timesteps(100, "ddim30")
    with pytest.raises(ValueError, match="cannot divide a section of 50 steps into 60"):
        space_timesteps(100, "60,1")
    with pytest.raises(ValueError, match="at least 2 steps, got 1"):
        create_diffusion(steps=100, timestep_respacing="1")


def test_respacing_keeps_alpha_bar():
    full = create_diffusion(steps=1000, noise_schedule="cosine")
    for spacing in ("50", "ddim25", "10,20,5"):
        r = create_diffusion(steps=1000, noise_schedule="cosine", timestep_respacing=spacing)
        np.testing.assert_allclose(r.alphas_cumprod, full.alphas_cumprod[r.timestep_map.numpy()], rtol=1e-9)
        # and the model sees the original, rescaled timesteps
        r2 = create_diffusion(steps=1000, noise_schedule="cosine", timestep_respacing=spacing, rescale_timesteps=True)
        assert torch.equal(r2.model_timesteps(torch.arange(r.num_timesteps)), r.timestep_map.float())


def test_schedules():
    lin = get_named_beta_schedule("linear", 1000)
    assert lin[0] == pytest.approx(1e-4) and lin[-1] == pytest.approx(0.02)
    assert get_named_beta_schedule("linear", 100)[-1] == pytest.approx(0.2)  # scaled with T
    cos = get_named_beta_schedule("cosine", 1000)
    abar = np.cumprod(1 - cos)
    # Eq. 17: alpha-bar(t) = f(t)/f(0), f(t) = cos^2((t/T + s)/(1+s) pi/2)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    assert abar[499] == pytest.approx(f(500) / f(0), rel=1e-9)
    assert cos.max() == pytest.approx(0.999)
    with pytest.raises(ValueError, match="unknown noise_schedule 'quadratic'"):
        get_named_beta_schedule("quadratic", 10)


def test_gaussian_helpers():
    m, lv = torch.tensor([0.3]), torch.tensor([-0.5])
    assert normal_kl(m, lv, m, lv).item() == 0
    # KL(N(0,1) || N(1, e^2)) = log(e) + (1 + 1)/(2 e^2) - 1/2
    kl = normal_kl(torch.zeros(1), torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)).item()
    assert kl == pytest.approx(1 + 2 / (2 * math.e ** 2) - 0.5, rel=1e-5)
    # The 256 bins of a narrow Gaussian centred on a bin hold almost all its mass.
    x = torch.linspace(-1, 1, 256)
    ll = discretized_gaussian_log_likelihood(x, x, torch.full_like(x, math.log(1e-3)))
    assert ll.exp().min() > 0.99


def small_model(out_channels, num_classes=None):
    torch.manual_seed(0)
    return UNetModel(
        3, 32, out_channels, 1, (2,), channel_mult=(1, 2), num_heads=2, num_classes=num_classes, init="standard"
    )


@pytest.mark.parametrize("kwargs,loss_type,keys", [
    (dict(), LossType.MSE, {"loss", "mse"}),
    (dict(learn_sigma=True, rescale_learned_sigmas=True), LossType.RESCALED_MSE, {"loss", "mse", "vb"}),
    (dict(learn_sigma=True, use_kl=True), LossType.RESCALED_KL, {"loss"}),
    (dict(predict_xstart=True, sigma_small=True), LossType.MSE, {"loss", "mse"}),
])
def test_objectives(kwargs, loss_type, keys):
    d = create_diffusion(steps=50, noise_schedule="cosine", **kwargs)
    assert d.loss_type == loss_type
    model = small_model(6 if kwargs.get("learn_sigma") else 3)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    t = torch.tensor([0, 20, 49])
    noise = torch.randn_like(x)
    terms = d.training_losses(model, x, t, noise=noise)
    assert set(terms) == keys and terms["loss"].shape == (3,) and torch.isfinite(terms["loss"]).all()
    if "vb" in terms:
        assert torch.allclose(terms["loss"], terms["mse"] + terms["vb"])


# improved-diffusion's create_gaussian_diffusion (script_util.py), as three tables by enum name:
# use_kl wins over rescale_learned_sigmas; learn_sigma wins over sigma_small.
ORIGINAL_LOSS = {(False, False): "MSE", (False, True): "RESCALED_MSE", (True, False): "RESCALED_KL",
                 (True, True): "RESCALED_KL"}  # (use_kl, rescale_learned_sigmas)
ORIGINAL_VAR = {(False, False): "FIXED_LARGE", (False, True): "FIXED_SMALL", (True, False): "LEARNED_RANGE",
                (True, True): "LEARNED_RANGE"}  # (learn_sigma, sigma_small)
ORIGINAL_MEAN = {False: "EPSILON", True: "START_X"}  # predict_xstart


@pytest.mark.parametrize("use_kl,rescale,learn_sigma,sigma_small,predict_xstart",
                         list(itertools.product((False, True), repeat=5)))
def test_flags_map_as_the_original(use_kl, rescale, learn_sigma, sigma_small, predict_xstart):
    d = create_diffusion(steps=100, learn_sigma=learn_sigma, sigma_small=sigma_small, use_kl=use_kl,
                         predict_xstart=predict_xstart, rescale_learned_sigmas=rescale)
    assert (d.loss_type.name, d.model_var_type.name, d.model_mean_type.name) == (
        ORIGINAL_LOSS[use_kl, rescale], ORIGINAL_VAR[learn_sigma, sigma_small], ORIGINAL_MEAN[predict_xstart])
    # "" means no respacing: every one of the T steps, each its own original step
    assert d.num_timesteps == 100 and d.timestep_map.tolist() == list(range(100)) and not d.rescale_timesteps


def test_respacing_and_timestep_flags_pass_through():
    d = create_diffusion(steps=100, timestep_respacing="5", rescale_timesteps=True)
    assert d.timestep_map.tolist() == space_timesteps(100, "5") == [0, 25, 50, 74, 99]
    assert d.num_timesteps == 5 and d.original_num_steps == 100 and d.rescale_timesteps


def test_vlb_is_the_posterior_kl_in_bits():
    """L_vlb at t > 0 by hand: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) between two Gaussians,
    in bits, averaged over pixels; RESCALED_KL (what use_kl gives) is T times that."""
    T = 40
    betas = np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T)  # the linear schedule, scaled to T
    abar = np.cumprod(1 - betas)
    g = torch.Generator().manual_seed(0)
    x0, noise, eps_pred = (torch.randn(2, 1, 2, 2, generator=g) for _ in range(3))
    v = torch.tensor([-0.6, 0.8])[:, None, None, None].expand(2, 1, 2, 2)
    t = np.array([3, 27])
    output = torch.cat([eps_pred, v], dim=1)  # a fixed model output: predicted noise, then v
    noise64, eps64, v = noise.double(), eps_pred.double(), v.double()
    expected = []
    for i, s in enumerate(t):
        beta, ab, ab_prev = betas[s], abar[s], abar[s - 1]
        var_q = beta * (1 - ab_prev) / (1 - ab)  # beta-tilde_t
        log_var_p = (v[i] + 1) / 2 * math.log(beta) + (1 - v[i]) / 2 * math.log(var_q)  # Eq. 15
        # mean_q - mean_p = coef1 (x0 - pred_x0), and x0 - pred_x0 = sqrt((1 - abar)/abar) (eps_pred - noise)
        coef1 = beta * math.sqrt(ab_prev) / (1 - ab)
        mean_diff = coef1 * math.sqrt((1 - ab) / ab) * (eps64[i] - noise64[i])
        kl = 0.5 * (log_var_p - math.log(var_q) + (var_q + mean_diff ** 2) / log_var_p.exp() - 1)
        expected.append(kl.mean().item() / math.log(2))
    expected = torch.tensor(expected)
    d = create_diffusion(steps=T, learn_sigma=True, use_kl=True)
    assert d.loss_type == LossType.RESCALED_KL
    model = lambda x, ts: output
    t = torch.from_numpy(t)
    rescaled = d.training_losses(model, x0, t, noise=noise)["loss"]
    plain = GaussianDiffusion(d.betas, ModelMeanType.EPSILON, ModelVarType.LEARNED_RANGE, LossType.KL)
    unscaled = plain.training_losses(model, x0, t, noise=noise)["loss"]
    # float32 inside vs float64 here: measured 3e-7 relative (x_0 recovered from x_t cancels at t=27)
    assert torch.allclose(unscaled, expected, rtol=1e-5, atol=0)
    assert torch.allclose(rescaled, T * expected, rtol=1e-5, atol=0)


def test_hybrid_vb_trains_only_the_variance():
    """L_hybrid: the vb term's gradient reaches the variance channels, never the mean."""
    d = create_diffusion(steps=50, noise_schedule="cosine", learn_sigma=True, rescale_learned_sigmas=True)
    x, t = torch.rand(2, 3, 8, 8) * 2 - 1, torch.tensor([3, 30])
    out = torch.randn(2, 6, 8, 8, requires_grad=True)
    d.training_losses(lambda *_: out, x, t)["vb"].sum().backward()
    assert torch.count_nonzero(out.grad[:, :3]) == 0 and torch.count_nonzero(out.grad[:, 3:]) > 0


def test_learned_range_variance_spans_the_bounds():
    d = create_diffusion(steps=100, noise_schedule="cosine", learn_sigma=True)
    assert d.model_var_type == ModelVarType.LEARNED_RANGE
    t = torch.tensor([10, 10])
    v = torch.stack([-torch.ones(3, 2, 2), torch.ones(3, 2, 2)])
    _, log_var = d.model_variance(v, t, v.shape)
    assert log_var[0].flatten()[0].item() == pytest.approx(
        math.log(d._consts["posterior_variance"][10].item()), rel=1e-5
    )
    assert log_var[1].flatten()[0].item() == pytest.approx(math.log(d.betas[10]), rel=1e-5)


def test_wrong_channel_count_is_a_clear_error():
    d = create_diffusion(steps=10, learn_sigma=True, noise_schedule="cosine")
    with pytest.raises(ValueError, match="learned variance needs 6 output channels, got 3"):
        d.training_losses(lambda x, t: x, torch.zeros(1, 3, 4, 4), torch.tensor([1]))


def test_loss_second_moment_sampler():
    d = create_diffusion(steps=4, noise_schedule="cosine")
    s = create_named_schedule_sampler("loss-second-moment", d)
    g = torch.Generator().manual_seed(0)
    t, w = s.sample(1000, "cpu", generator=g)
    assert torch.allclose(w, torch.ones(1000))  # uniform until warmed up
    for _ in range(10):  # step 3's losses are 10x the others'
        s.update_with_local_losses(torch.arange(4), torch.tensor([1.0, 1.0, 1.0, 10.0]))
    assert s.warmed_up()
    t, w = s.sample(20000, "cpu", generator=g)
    frac = (t == 3).float().mean().item()
    assert frac == pytest.approx(10 / 13, abs=0.02)
    # importance weights make the estimate unbiased: E[w * L_t] = mean_t L_t
    losses = torch.tensor([1.0, 1.0, 1.0, 10.0])
    assert (w * losses[t]).mean().item() == pytest.approx(losses.mean().item(), rel=0.03)
    # its state round-trips, for exact resume
    s2 = LossSecondMomentResampler(4)
    s2.load_state_dict(s.state_dict())
    assert torch.equal(s2.weights(), s.weights())
    with pytest.raises(ValueError, match="valid: uniform, loss-second-moment"):
        create_named_schedule_sampler("importance", d)


def test_sampler_gathers_across_processes():
    s = LossSecondMomentResampler(2, history_per_term=1)
    s.update_with_local_losses(
        torch.tensor([0]),
        torch.tensor([2.0]),
        gather=lambda v: torch.cat([v, v + 1 if v.dtype == torch.long else v * 3]),
    )
    assert s.loss_counts.tolist() == [1, 1] and s.loss_history[:, 0].tolist() == [2.0, 6.0]

"""
Gaussian diffusion as in improved-DDPM (Nichol & Dhariwal, 2021): noise schedules,
q(x_t | x_0), the posterior, p(x_{t-1} | x_t) with learned-range variance, L_simple,
L_hybrid, L_vlb, bits/dim, and timestep respacing. Equation numbers are the paper's.

The math lives in small pure functions; ``GaussianDiffusion`` holds the schedule's
constants (float64, cast to float32 after indexing, as the original does) and composes them.
"""

import enum
import math
from collections.abc import Iterable

import numpy as np
import torch

from .nn import mean_flat
from .respace import space_timesteps  # noqa: F401 (unet.core.diffusion.space_timesteps, as in the original)


class ModelMeanType(enum.Enum):
    PREVIOUS_X = "previous_x"  # the model predicts x_{t-1}
    START_X = "start_x"  # the model predicts x_0
    EPSILON = "epsilon"  # the model predicts the noise


class ModelVarType(enum.Enum):
    LEARNED = "learned"  # the model outputs log-variance directly
    FIXED_SMALL = "fixed_small"  # the posterior variance beta-tilde_t
    FIXED_LARGE = "fixed_large"  # beta_t (beta-tilde_1 at t=0)
    LEARNED_RANGE = "learned_range"  # interpolate log beta-tilde_t and log beta_t (Eq. 15)


class LossType(enum.Enum):
    MSE = "mse"  # L_simple, plus the vb term when the variance is learned
    RESCALED_MSE = "rescaled_mse"  # L_hybrid: vb scaled by T/1000 (lambda = 0.001 at T=1000, Eq. 16)
    KL = "kl"  # L_vlb
    RESCALED_KL = "rescaled_kl"  # L_vlb times T

    def is_vb(self):
        return self in (LossType.KL, LossType.RESCALED_KL)


# --- schedules -----------------------------------------------------------------------

def cosine_alpha_bar(t, s=0.008):
    """The cosine schedule's alpha-bar at t in [0, 1] (Eq. 17)."""
    return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2


def betas_for_alpha_bar(num_steps, alpha_bar, max_beta=0.999):
    """Betas whose cumulative product follows ``alpha_bar``, clipped at ``max_beta`` to avoid
    the singularity at t = T (Section 3.2)."""
    return np.array([min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
                     for i in range(num_steps)], dtype=np.float64)


def linear_beta_range(num_steps: int) -> tuple[float, float]:
    """(beta_1, beta_T) of Ho et al.'s linear schedule, scaled by 1000/T so that any step
    count covers the same noise range (improved-DDPM's generalisation of it)."""
    scale = 1000 / num_steps
    return scale * 0.0001, scale * 0.02


def scale_timesteps(t: torch.Tensor, num_steps: int, rescale: bool) -> torch.Tensor:
    """The timesteps the model sees for original-process steps ``t``: scaled to [0, 1000)
    when the model was trained with ``rescale_timesteps`` (so its embedding does not depend
    on T), else ``t`` itself."""
    return t.float() * (1000.0 / num_steps) if rescale else t


def get_named_beta_schedule(name: str, num_steps: int) -> np.ndarray:
    """
    :param name: "linear" (Ho et al., scaled so any step count covers the same range) or "cosine".
    :param num_steps: T.
    """
    if name == "linear":
        return np.linspace(*linear_beta_range(num_steps), num_steps, dtype=np.float64)
    if name == "cosine":
        return betas_for_alpha_bar(num_steps, cosine_alpha_bar)
    raise ValueError(f"unknown noise_schedule {name!r}; valid: 'linear', 'cosine'")


# --- respacing (the kept steps: unet.core.respace) -----------------------------------

def respaced_betas(alphas_cumprod: np.ndarray, use_timesteps: Iterable[int]) -> np.ndarray:
    """Betas of the process that visits only ``use_timesteps``, with the same alpha-bar there."""
    betas, last = [], 1.0
    for i in use_timesteps:
        betas.append(1 - alphas_cumprod[i] / last)
        last = alphas_cumprod[i]
    return np.array(betas, dtype=np.float64)


# --- Gaussian helpers ----------------------------------------------------------------

def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """A fast approximation of the standard normal CDF (tanh form)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """
    Log-likelihood of 8-bit images ``x`` (rescaled to [-1, 1]) under a Gaussian discretised to
    their 256 bins, the edge bins open-ended: the decoder L_0 (Section 2, after Ho et al.).
    """
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def learned_range_log_variance(v, min_log, max_log):
    """Eq. 15: the model's v in [-1, 1] interpolates log beta-tilde_t (v=-1) and log beta_t (v=1)."""
    frac = (v + 1) / 2
    return frac * max_log + (1 - frac) * min_log


# --- the process ---------------------------------------------------------------------

class GaussianDiffusion:
    """
    A diffusion process over ``betas``, possibly a respacing of a longer one.

    :param betas: float64 betas of this process.
    :param model_mean_type: a ``ModelMeanType``.
    :param model_var_type: a ``ModelVarType``.
    :param loss_type: a ``LossType``.
    :param rescale_timesteps: show the model timesteps scaled to [0, 1000) whatever T.
    :param timestep_map: for a respaced process, the original step of each of its steps.
    :param original_num_steps: T of the original process.
    """

    def __init__(self, betas, model_mean_type, model_var_type, loss_type, rescale_timesteps=False,
                 timestep_map=None, original_num_steps=None):
        self.model_mean_type, self.model_var_type, self.loss_type = model_mean_type, model_var_type, loss_type
        self.rescale_timesteps = rescale_timesteps
        self.betas = betas = np.asarray(betas, dtype=np.float64)
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError(
                f"betas must lie in (0, 1], got {betas.min():.3g}..{betas.max():.3g} (a linear schedule needs T >= 20)"
            )
        self.num_timesteps = len(betas)
        if self.num_timesteps < 2:  # beta-tilde_1, which clips log beta-tilde_0, must exist
            raise ValueError(f"a diffusion process needs at least 2 steps, got {self.num_timesteps}")
        self.original_num_steps = original_num_steps or self.num_timesteps
        self.timestep_map = torch.as_tensor(
            timestep_map if timestep_map is not None else range(self.num_timesteps), dtype=torch.long
        )

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        ac, ac_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)  # beta-tilde_t (Eq. 10)
        # log beta-tilde is -inf at t = 0: the original clips it to beta-tilde_1 there.
        posterior_log_variance_clipped = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
        consts = dict(
            sqrt_alphas_cumprod=np.sqrt(ac),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
            one_minus_alphas_cumprod=1.0 - ac,
            log_one_minus_alphas_cumprod=np.log(1.0 - ac),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1),
            posterior_variance=posterior_variance,
            posterior_log_variance_clipped=posterior_log_variance_clipped,
            posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
            posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
            log_betas=np.log(betas),
            fixed_large_variance=np.append(posterior_variance[1], betas[1:]),
            fixed_large_log_variance=np.log(np.append(posterior_variance[1], betas[1:])),
        )
        self._consts = {k: torch.from_numpy(v) for k, v in consts.items()}

    def _extract(self, name, t, shape):
        """Constant ``name`` at steps ``t``, as float32 broadcastable to ``shape``."""
        v = self._consts[name].to(t.device)[t].float()
        return v.reshape(-1, *([1] * (len(shape) - 1)))

    def model_timesteps(self, t):
        """The timesteps the model is called with for this process's steps ``t``: mapped to
        the original process and, with ``rescale_timesteps``, scaled to [0, 1000)."""
        return scale_timesteps(self.timestep_map.to(t.device)[t], self.original_num_steps, self.rescale_timesteps)

    def q_mean_variance(self, x_start, t):
        """Mean, variance and log-variance of q(x_t | x_0) (Eq. 8)."""
        mean = self._extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
        return (mean, self._extract("one_minus_alphas_cumprod", t, x_start.shape),
                self._extract("log_one_minus_alphas_cumprod", t, x_start.shape))

    def q_sample(self, x_start, t, noise=None):
        """Draw x_t ~ q(x_t | x_0) (Eq. 9)."""
        noise = torch.randn_like(x_start) if noise is None else noise
        return (self._extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
                + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start.shape) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (Eqs. 10-12)."""
        mean = (self._extract("posterior_mean_coef1", t, x_t.shape) * x_start
                + self._extract("posterior_mean_coef2", t, x_t.shape) * x_t)
        return (mean, self._extract("posterior_variance", t, x_t.shape),
                self._extract("posterior_log_variance_clipped", t, x_t.shape))

    def predict_xstart_from_eps(self, x_t, t, eps):
        """x_0 from x_t and the predicted noise (Eq. 9 inverted)."""
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t
            - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.shape) * eps
        )

    def predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t - pred_xstart) / self._extract(
            "sqrt_recipm1_alphas_cumprod", t, x_t.shape
        )

    def predict_xstart_from_xprev(self, x_t, t, xprev):
        """x_0 from the posterior mean (Eq. 11 inverted)."""
        return (xprev - self._extract("posterior_mean_coef2", t, x_t.shape) * x_t) / self._extract(
            "posterior_mean_coef1", t, x_t.shape
        )

    def model_variance(self, model_var_values, t, shape):
        """Variance and log-variance of p(x_{t-1} | x_t), from the model's extra channels if learned."""
        if self.model_var_type == ModelVarType.LEARNED:
            return torch.exp(model_var_values), model_var_values
        if self.model_var_type == ModelVarType.LEARNED_RANGE:
            log_var = learned_range_log_variance(
                model_var_values,
                self._extract("posterior_log_variance_clipped", t, shape),
                self._extract("log_betas", t, shape),
            )
            return torch.exp(log_var), log_var
        if self.model_var_type == ModelVarType.FIXED_LARGE:
            names = ("fixed_large_variance", "fixed_large_log_variance")
        else:
            names = ("posterior_variance", "posterior_log_variance_clipped")
        return tuple(self._extract(n, t, shape).expand(shape) for n in names)

    def split_model_output(self, model_output, channels):
        """The mean part and, for learned variances, the variance part of the model's output."""
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            if model_output.shape[1] != 2 * channels:
                raise ValueError(
                    f"a learned variance needs {2 * channels} output channels, got {model_output.shape[1]}"
                )
            return model_output.split(channels, dim=1)
        return model_output, None

    def p_mean_variance(self, model, x, t, clip_denoised=True, model_kwargs=None):
        """
        p(x_{t-1} | x_t) and the model's x_0 prediction.

        :param model: the raw model, called as ``model(x, model_timesteps(t), **model_kwargs)``.
        :param x: x_t, [N x C x ...].
        :param t: [N] step indices of this process.
        :param clip_denoised: clip the x_0 prediction to [-1, 1].
        :return: dict with ``mean``, ``variance``, ``log_variance``, ``pred_xstart``.
        """
        model_output = model(x, self.model_timesteps(t), **(model_kwargs or {}))
        return self.p_mean_variance_from_output(model_output, x, t, clip_denoised)

    def p_mean_variance_from_output(self, model_output, x, t, clip_denoised=True):
        """``p_mean_variance`` given the model's output for (x, t)."""
        mean_out, var_values = self.split_model_output(model_output, x.shape[1])
        variance, log_variance = self.model_variance(var_values, t, x.shape)
        clip = (lambda v: v.clamp(-1, 1)) if clip_denoised else (lambda v: v)
        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            pred_xstart = clip(self.predict_xstart_from_xprev(x, t, mean_out))
            return dict(mean=mean_out, variance=variance, log_variance=log_variance, pred_xstart=pred_xstart)
        if self.model_mean_type == ModelMeanType.START_X:
            pred_xstart = clip(mean_out)
        else:
            pred_xstart = clip(self.predict_xstart_from_eps(x, t, mean_out))
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return dict(mean=mean, variance=variance, log_variance=log_variance, pred_xstart=pred_xstart)

    def vb_terms_bpd(self, model_output, x_start, x_t, t, clip_denoised=True):
        """
        One term of the variational bound in bits/dim: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))
        for t > 0 (L_t, Eq. 5) and the discretised decoder NLL at t = 0 (L_0).

        :return: dict with ``output`` ([N] bits/dim) and ``pred_xstart``.
        """
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance_from_output(model_output, x_t, t, clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return dict(output=torch.where(t == 0, nll, kl), pred_xstart=out["pred_xstart"])

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """
        Per-sample training loss at steps ``t``.

        :return: dict with ``loss`` and, where they apply, ``mse`` and ``vb``. Under MSE losses
            with a learned variance, ``vb`` trains only the variance: the mean is detached so
            that L_vlb does not disturb it (L_hybrid, Section 3.1).
        """
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self.q_sample(x_start, t, noise)
        model_output = model(x_t, self.model_timesteps(t), **(model_kwargs or {}))
        terms = {}
        if self.loss_type.is_vb():
            terms["loss"] = self.vb_terms_bpd(model_output, x_start, x_t, t, clip_denoised=False)["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms
        mean_out, var_values = self.split_model_output(model_output, x_start.shape[1])
        if var_values is not None:
            frozen = torch.cat([mean_out.detach(), var_values], dim=1)
            terms["vb"] = self.vb_terms_bpd(frozen, x_start, x_t, t, clip_denoised=False)["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                # Divide by 1000 for equivalence with the T=1000 weighting of the paper.
                terms["vb"] = terms["vb"] * self.num_timesteps / 1000.0
        target = {ModelMeanType.PREVIOUS_X: lambda: self.q_posterior_mean_variance(x_start, x_t, t)[0],
                  ModelMeanType.START_X: lambda: x_start,
                  ModelMeanType.EPSILON: lambda: noise}[self.model_mean_type]()
        terms["mse"] = mean_flat((target - mean_out) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def prior_bpd(self, x_start):
        """KL(q(x_T | x_0) || N(0, I)) in bits/dim: the prior term L_T, independent of the model."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, dtype=torch.long, device=x_start.device)
        mean, _, log_var = self.q_mean_variance(x_start, t)
        kl = normal_kl(mean, log_var, torch.zeros_like(mean), torch.zeros_like(log_var))
        return mean_flat(kl) / math.log(2.0)

    @torch.no_grad()
    def calc_bpd_loop(self, model, x_start, clip_denoised=True, model_kwargs=None, noise_fn=None):
        """
        The full variational bound in bits/dim, one term per step (Eq. 4).

        :param noise_fn: ``noise_fn(t) -> noise`` for step ``t``; default ``torch.randn_like``.
        :return: dict with ``total_bpd``, ``prior_bpd`` ([N]) and ``vb``, ``xstart_mse``, ``mse``
            ([N x T], column i for step T-1-i, the loop's order, as in the original).
        """
        vb, xstart_mse, mse = [], [], []
        for step in reversed(range(self.num_timesteps)):
            t = torch.full((x_start.shape[0],), step, dtype=torch.long, device=x_start.device)
            noise = noise_fn(step) if noise_fn else torch.randn_like(x_start)
            x_t = self.q_sample(x_start, t, noise)
            out = self.vb_terms_bpd(
                model(x_t, self.model_timesteps(t), **(model_kwargs or {})), x_start, x_t, t, clip_denoised
            )
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            mse.append(mean_flat((self.predict_eps_from_xstart(x_t, t, out["pred_xstart"]) - noise) ** 2))
        vb, xstart_mse, mse = (torch.stack(v, dim=1) for v in (vb, xstart_mse, mse))
        prior = self.prior_bpd(x_start)
        return dict(total_bpd=vb.sum(dim=1) + prior, prior_bpd=prior, vb=vb, xstart_mse=xstart_mse, mse=mse)


def create_diffusion(
    steps: int = 1000,
    learn_sigma: bool = False,
    sigma_small: bool = False,
    noise_schedule: str = "linear",
    use_kl: bool = False,
    predict_xstart: bool = False,
    rescale_timesteps: bool = False,
    rescale_learned_sigmas: bool = False,
    timestep_respacing: str = "",
) -> GaussianDiffusion:
    """
    A diffusion process from the original ``create_gaussian_diffusion`` arguments.

    :param steps: T.
    :param learn_sigma: the model outputs a learned-range variance (2C channels).
    :param sigma_small: with fixed variance, beta-tilde rather than beta.
    :param noise_schedule: "linear" or "cosine".
    :param use_kl: train on L_vlb, times T (``LossType.RESCALED_KL``), as the original does;
        plain ``LossType.KL`` is reachable only by building ``GaussianDiffusion`` directly.
    :param predict_xstart: the model predicts x_0 rather than the noise.
    :param rescale_timesteps: the model sees timesteps scaled to [0, 1000).
    :param rescale_learned_sigmas: without ``use_kl``, L_hybrid's vb weighting (T/1000); ignored with it.
    :param timestep_respacing: "", "N", "a,b,c" or "ddimN" (see ``space_timesteps``).
    """
    betas = get_named_beta_schedule(noise_schedule, steps)
    # As the original: use_kl always trains on L_vlb times T, whatever rescale_learned_sigmas says.
    if use_kl:
        loss_type = LossType.RESCALED_KL
    else:
        loss_type = LossType.RESCALED_MSE if rescale_learned_sigmas else LossType.MSE
    if learn_sigma:
        var_type = ModelVarType.LEARNED_RANGE
    else:
        var_type = ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE
    use_timesteps = space_timesteps(steps, timestep_respacing or [steps])
    alphas_cumprod = np.cumprod(1.0 - betas)
    return GaussianDiffusion(respaced_betas(alphas_cumprod, use_timesteps),
                             ModelMeanType.START_X if predict_xstart else ModelMeanType.EPSILON, var_type, loss_type,
                             rescale_timesteps=rescale_timesteps, timestep_map=use_timesteps, original_num_steps=steps)

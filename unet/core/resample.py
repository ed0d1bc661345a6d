"""Timestep samplers: uniform, and importance sampling by the loss's second moment
(improved-DDPM Section 3.3, Eq. 18), which lowers the variance of L_vlb's gradient."""

import torch

from .choices import SCHEDULE_SAMPLERS  # noqa: F401 (read here by callers)
from .diffusion import GaussianDiffusion


class ScheduleSampler:
    """
    Draws timesteps t with probabilities p_t and returns importance weights 1/(T p_t), so
    that the weighted loss is an unbiased estimate of the uniform-t objective.
    """

    def __init__(self, num_timesteps):
        self.num_timesteps = num_timesteps

    def weights(self):
        """Unnormalised sampling weight of each step."""
        return torch.ones(self.num_timesteps, dtype=torch.float64)

    def sample(self, batch_size, device, generator=None):
        """
        :param batch_size: how many timesteps to draw.
        :param device: where to put them.
        :param generator: a ``torch.Generator`` for reproducible draws.
        :return: (timesteps [N] long, weights [N] float).
        """
        p = self.weights()
        p = p / p.sum()
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (self.num_timesteps * p[t])
        return t.to(device), weights.float().to(device)

    def update_with_local_losses(self, t, losses, gather=None):
        """Record this process's per-sample losses; ``gather`` (e.g. ``accelerator.gather``)
        collects every process's, so that all processes keep the same state."""

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class UniformSampler(ScheduleSampler):
    """Every step equally likely."""


class LossSecondMomentResampler(ScheduleSampler):
    """
    p_t proportional to sqrt(E[L_t^2]) over the last ``history_per_term`` losses of each step
    (Eq. 18), uniform until every step has that many, and mixed with a little uniform mass.

    :param history_per_term: losses remembered per step.
    :param uniform_prob: probability mass spread uniformly over all steps.
    """

    def __init__(self, num_timesteps, history_per_term=10, uniform_prob=0.001):
        super().__init__(num_timesteps)
        self.history_per_term, self.uniform_prob = history_per_term, uniform_prob
        self.loss_history = torch.zeros(num_timesteps, history_per_term, dtype=torch.float64)
        self.loss_counts = torch.zeros(num_timesteps, dtype=torch.long)

    def warmed_up(self):
        return bool((self.loss_counts == self.history_per_term).all())

    def weights(self):
        if not self.warmed_up():
            return torch.ones(self.num_timesteps, dtype=torch.float64)
        w = self.loss_history.pow(2).mean(dim=-1).sqrt()
        w = w / w.sum()
        return w * (1 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def update_with_local_losses(self, t, losses, gather=None):
        t, losses = t.detach(), losses.detach().float()
        if gather is not None:
            t, losses = gather(t), gather(losses)
        for step, loss in zip(t.cpu().tolist(), losses.cpu().double().tolist()):
            n = int(self.loss_counts[step])
            if n == self.history_per_term:
                self.loss_history[step] = torch.roll(self.loss_history[step], -1)
                self.loss_history[step, -1] = loss
            else:
                self.loss_history[step, n] = loss
                self.loss_counts[step] = n + 1

    def state_dict(self):
        return {"loss_history": self.loss_history.clone(), "loss_counts": self.loss_counts.clone()}

    def load_state_dict(self, state):
        self.loss_history.copy_(state["loss_history"])
        self.loss_counts.copy_(state["loss_counts"])




def create_named_schedule_sampler(name: str, diffusion: GaussianDiffusion) -> ScheduleSampler:
    """
    :param name: "uniform" or "loss-second-moment".
    :param diffusion: the process whose steps are sampled.
    """
    if name == "uniform":
        return UniformSampler(diffusion.num_timesteps)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion.num_timesteps)
    raise ValueError(f"unknown schedule sampler {name!r}; valid: {', '.join(SCHEDULE_SAMPLERS)}")

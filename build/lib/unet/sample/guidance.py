"""
The two sampling rules that the package and its exported pipelines share: classifier-free
guidance (``guided_output``) and what a diffusers scheduler's ``step`` takes from the model
output (``scheduler_input``).

``python -m unet.export`` copies this file beside ``pipeline.py`` (``hub_pipeline``), which
imports it relatively; diffusers copies relatively imported files along with a custom
pipeline. So it may import nothing from ``unet``. It is a module of its own so that
``unet.sample.sampling`` gets the rules without importing ``DiffusionPipeline`` (about 0.6 s).
"""

import torch
from diffusers import DDPMScheduler


def guided_output(cond, uncond, scale, channels):
    """
    Classifier-free guidance (Ho & Salimans 2022; their ``(1 + w) cond - w uncond`` with
    ``scale = 1 + w``): the mean channels ``uncond + scale * (cond - uncond)``, any further
    (learned-variance) channels from ``cond``.

    Written as ``cond + (scale - 1) * (cond - uncond)``, the same value, so that ``scale = 1``
    returns ``cond`` exactly and equal predictions give ``cond`` for any scale.

    :param cond: [N x K x ...] output for the requested labels.
    :param uncond: the same for the null label.
    :param channels: C, the image channels (the mean part of a K = 2C output).
    """
    mean = cond[:, :channels] + (scale - 1) * (cond[:, :channels] - uncond[:, :channels])
    return torch.cat([mean, cond[:, channels:]], dim=1)


def scheduler_input(model_output, channels, scheduler):
    """The model output a scheduler's ``step`` expects: DDPM with learned variance takes all
    2C channels; the others (DDIM, DPM-Solver) take the mean part only, whatever C is
    (diffusers' DPM-Solver would keep ``[:, :3]``, wrong for 1- or 4-channel images)."""
    if isinstance(scheduler, DDPMScheduler) and scheduler.config.variance_type in ("learned", "learned_range"):
        return model_output
    return model_output[:, :channels]

"""Small building blocks of the improved-DDPM U-Net: layers by dimension, the fp32
GroupNorm, ``zero_module`` and the sinusoidal timestep embedding."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype: fp16 statistics over
    large groups lose precision, which the original guards against the same way."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


class Dropout(nn.Dropout):
    """
    ``nn.Dropout`` with a cheaper mask on CPU. PyTorch's CPU dropout draws its mask with
    ``bernoulli_``, about 3x slower than drawing uniforms and comparing them with ``p``
    (5% of a CIFAR-10 training step; docs/performance.md). The mask is the same Bernoulli
    (keep with probability ``1 - p``, kept values scaled by ``1 / (1 - p)``), drawn from the
    same global generator, so seeding and resuming behave as before. On other devices the
    native kernel is already fused and is used as it is.
    """

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu" or self.p == 1:
            return super().forward(x)
        keep = torch.rand_like(x).ge_(self.p).mul_(1 / (1 - self.p))  # 0 or 1/(1-p), in place: one buffer
        return x.mul_(keep) if self.inplace else x * keep


def _fold_taps(weight, dim):
    """Fold a 3-tap axis of ``weight`` into the two 2-tap kernels it becomes on a x2 nearest
    upsampled input: even outputs see taps (0 | 1+2), odd outputs (0+1 | 2). Returns the
    axis with 4 entries, even phase first."""
    t0, t1, t2 = weight.unbind(dim)
    return torch.stack([t0, t1 + t2, t0 + t1, t2], dim)


def upsample_conv2d(x, weight, bias=None):
    """
    ``conv2d(interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)`` for a
    3x3 ``weight``, computed without building the upsampled image. Each output pixel of a
    given parity (row and column even or odd) sees the same 2x2 input window through the same
    summed taps (``_fold_taps``), so the four parities are one 2x2 conv with four times the
    output channels on the original grid, interleaved afterwards: 16 (H+1)(W+1) multiplies per
    channel pair instead of 36 HW, the same function up to float rounding. Gradients reach
    ``weight`` through the folding, so the parameters (and checkpoints) are the 3x3 ones.
    The result keeps ``x``'s memory format.

    :param x: (B, C, H, W).
    :param weight: (O, C, 3, 3).
    :param bias: (O,) or None.
    """
    (b, _, h, w), o = x.shape, weight.shape[0]
    kernels = rearrange(_fold_taps(_fold_taps(weight, 2), 3), "o i (a y) (c x) -> (a c o) i y x", a=2, c=2)
    # Parity (a, c)'s window for output (2i+a, 2j+c) starts at padded-grid position (i+a, j+c).
    z = F.conv2d(x, kernels, None if bias is None else bias.repeat(4), padding=1)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        z = z.permute(0, 2, 3, 1).unflatten(3, (2, 2, o))  # b, h+1, w+1, a, c, o
        rows = [torch.stack([z[:, a:a + h, c:c + w, a, c] for c in (0, 1)], 3) for a in (0, 1)]
        return torch.stack(rows, 2).reshape(b, 2 * h, 2 * w, o).permute(0, 3, 1, 2)
    z = z.unflatten(1, (2, 2, o))  # b, a, c, o, h+1, w+1
    rows = [torch.stack([z[:, a, c, :, a:a + h, c:c + w] for c in (0, 1)], -1) for a in (0, 1)]
    return torch.stack(rows, 3).reshape(b, o, 2 * h, 2 * w)


def normalization(channels, norm="group"):
    """
    The normalisation layer used throughout the U-Net.

    :param channels: number of channels.
    :param norm: "group" for GroupNorm(32 groups) in fp32, "none" for the identity,
        which lets each init scheme be studied without normalisation.
    """
    if norm == "group":
        return GroupNorm32(32, channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {norm!r}; valid: 'group', 'none'")


def conv_nd(dims, *args, **kwargs):
    """A 1D, 2D or 3D convolution."""
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](*args, **kwargs)


def avg_pool_nd(dims, *args, **kwargs):
    """A 1D, 2D or 3D average pooling."""
    return {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}[dims](*args, **kwargs)


def zero_module(module):
    """Zero every parameter of ``module`` and return it (the Fixup rule: the last layer
    of each residual branch starts at zero, so the branch starts as the identity)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def timestep_embedding(timesteps, dim, max_period=10000):
    """
    Sinusoidal embedding of (possibly fractional) timesteps, as in the Transformer and
    DDPM: ``[cos(t * f_i), sin(t * f_i)]`` with ``f_i = max_period^(-i / (dim/2))``.

    :param timesteps: a 1-D tensor of N timesteps, one per batch element.
    :param dim: the embedding width.
    :return: an [N x dim] float tensor.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def mean_flat(x):
    """Mean over every dimension but the batch one."""
    return x.mean(dim=tuple(range(1, x.ndim)))

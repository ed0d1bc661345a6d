"""Small building blocks of the improved-DDPM U-Net: layers by dimension, the fp32
GroupNorm, ``zero_module`` and the sinusoidal timestep embedding."""

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


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


@functools.cache
def _fold_matrix(device, dtype):
    """(16, 9): row (a, c, y, x) sums the taps (p, q) of a 3x3 kernel that output parity
    (a, c) sees through tap (y, x) of its 2x2 window on a x2 nearest-upsampled input. Along
    one axis, even outputs see taps (0 | 1+2), odd ones (0+1 | 2)."""
    fold = torch.tensor([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], dtype=dtype)  # parity, tap, 3x3 tap
    return torch.einsum("ayp,cxq->acyxpq", fold, fold).reshape(16, 9).to(device)


def upsample_conv2d(x, weight, bias=None):
    """
    ``conv2d(interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)`` for a
    3x3 ``weight``, computed without building the upsampled image. Each output pixel of a
    given parity (row and column even or odd) sees the same 2x2 input window through the same
    summed taps (``_fold_matrix``), so the four parities are one 2x2 conv with four times the
    output channels on the original grid, interleaved afterwards: 16 (H+1)(W+1) multiplies per
    channel pair instead of 36 HW, the same function up to float rounding. Gradients reach
    ``weight`` through the folding, so the parameters (and checkpoints) are the 3x3 ones.
    The result keeps ``x``'s memory format.

    :param x: (B, C, H, W).
    :param weight: (O, C, 3, 3).
    :param bias: (O,) or None.
    """
    (b, _, h, w), (o, c) = x.shape, weight.shape[:2]
    with torch.autocast(x.device.type, enabled=False):  # the folded taps in the weights' own precision
        # Under torch.compile the 16x9 constant is built inside the graph: dynamo cannot use the cache.
        fold = (_fold_matrix.__wrapped__ if torch.compiler.is_compiling() else _fold_matrix)(
            weight.device, weight.dtype
        )
        folded = fold @ weight.reshape(o * c, 9).t()  # (a c y x), (o i)
    # One transposing copy; a rearrange of the (o, i, 4, 4) form straight away was 8x slower.
    kernels = folded.view(4, 4, o * c).transpose(1, 2).reshape(4 * o, c, 2, 2)
    z = F.conv2d(x, kernels, None if bias is None else bias.repeat(4), padding=1).unflatten(1, (2, 2, o))
    # Parity (a, c)'s output (2i+a, 2j+c) is z[:, a, c, :, i+a, j+c], which is linear in (i, a)
    # and (j, c): the interleaved image is a strided view of z (whose backward is ~3x cheaper
    # than stacking the four crops). The view starts where z does (no offset argument: an
    # explicit z.storage_offset() is an int torch.compile cannot trace, and broke the graph).
    sb, sa, sc, so, sh, sw = z.stride()
    y = z.as_strided((b, o, h, 2, w, 2), (sb, so, sh, sa + sh, sw, sc + sw))
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return y.permute(0, 2, 3, 4, 5, 1).reshape(b, 2 * h, 2 * w, o).permute(0, 3, 1, 2)
    return y.reshape(b, o, 2 * h, 2 * w)


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

"""The improved-DDPM U-Net (Nichol & Dhariwal, 2021), with the original module and
parameter names so that checkpoints of openai/improved-diffusion load strictly."""

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from .choices import LAYOUTS, NORMS  # noqa: F401 (read here by callers)
from .init import apply_init
from .nn import Dropout, avg_pool_nd, conv_nd, normalization, timestep_embedding, upsample_conv2d

# Below this many base channels GroupNorm has one or two channels per group, where PyTorch's
# channels-last GroupNorm kernel is far slower than its NCHW one (docs/performance.md).
MIN_CHANNELS_LAST = 64


def resolve_layout(model, layout, train):
    """
    The memory format ``model`` runs in for ``layout`` ("auto", "channels_last" or
    "contiguous"), as a name. "auto" is the rule the benchmarks settled on: training stays
    contiguous (the two layouts tie there, and the standard one is what every checkpoint
    reader expects); sampling runs channels-last for 2-D models of ``MIN_CHANNELS_LAST`` base
    channels or more, where oneDNN's convolutions and the attention's (B, T, C) view gain from
    it; smaller or non-2-D models stay contiguous. ``benchmarks/layout.py`` measures both.

    :param train: a training step (True) or a sampling forward pass (False).
    """
    if layout != "auto":
        return layout
    wide = model.dims == 2 and model.model_channels >= MIN_CHANNELS_LAST
    return "channels_last" if wide and not train else "contiguous"


def apply_layout(model: "UNetModel", layout: str, train: bool) -> str:
    """Put ``model`` in the memory format ``resolve_layout`` gives and return its name."""
    layout = resolve_layout(model, layout, train)
    model.set_channels_last(layout == "channels_last")
    return layout


def _silu(x, inplace=True):
    """SiLU, in place when autograd is off (sampling) and the caller passes a fresh
    intermediate that nothing else sees: no new buffer, one pass over memory fewer."""
    return F.silu(x, inplace=inplace and not torch.is_grad_enabled())


class TimestepEmbedSequential(nn.Sequential):
    """A sequential container that passes the timestep embedding to the blocks that take it."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """
    Nearest-neighbour x2 upsampling (the inner two dims for 3-D data), optionally followed by
    a 3x3 conv. In 2-D, from ``SUBPIXEL_MIN_SIZE`` pixels up, the two run fused as
    ``upsample_conv2d`` (the same function in under half the multiplies); below it the 2x2
    convs' extra border row and the interleave cost more than they save (docs/performance.md).
    """

    SUBPIXEL_MIN_SIZE = 8

    def __init__(self, channels, use_conv, dims=2):
        super().__init__()
        self.channels, self.use_conv, self.dims = channels, use_conv, dims
        if use_conv:
            self.conv = conv_nd(dims, channels, channels, 3, padding=1)

    def forward(self, x):
        if self.use_conv and self.dims == 2 and min(x.shape[2:]) >= self.SUBPIXEL_MIN_SIZE:
            return upsample_conv2d(x, self.conv.weight, self.conv.bias)
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """x2 downsampling by a strided 3x3 conv (``op``) or by average pooling."""

    def __init__(self, channels, use_conv, dims=2):
        super().__init__()
        stride = (1, 2, 2) if dims == 3 else 2
        if use_conv:
            self.op = conv_nd(dims, channels, channels, 3, stride=stride, padding=1)
        else:
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x):
        return self.op(x)


class ResBlock(nn.Module):
    """
    A residual block ``skip(x) + out_layers(in_layers(x) + emb)``; its last conv
    (``out_layers[-1]``) is the one improved-DDPM wraps in ``zero_module``.

    :param channels: input channels.
    :param emb_channels: timestep-embedding channels.
    :param dropout: dropout rate before the last conv.
    :param out_channels: output channels (default: ``channels``).
    :param use_conv: with a channel change, a 3x3 rather than 1x1 skip conv.
    :param use_scale_shift_norm: the embedding gives a scale and shift applied after
        the second norm (FiLM) instead of being added before it.
    :param dims: 1, 2 or 3 for the data's spatial dimensions.
    :param use_checkpoint: recompute activations in the backward pass to save memory.
    :param norm: "group" or "none".
    :param fixup: add Fixup's scalar biases and branch multiplier (Zhang et al., 2019).
    """

    def __init__(self, channels, emb_channels, dropout, out_channels=None, use_conv=False,
                 use_scale_shift_norm=False, dims=2, use_checkpoint=False, norm="group", fixup=False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm, self.use_checkpoint = use_scale_shift_norm, use_checkpoint
        self.in_layers = nn.Sequential(normalization(channels, norm), nn.SiLU(),
                                       conv_nd(dims, channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(normalization(out_channels, norm), nn.SiLU(), Dropout(p=dropout),
                                        conv_nd(dims, out_channels, out_channels, 3, padding=1))
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = conv_nd(
                dims, channels, out_channels, 3 if use_conv else 1, padding=1 if use_conv else 0
            )
        # Fixup's scalars exist only under that scheme, so other schemes keep the original keys.
        self.fixup = fixup
        if fixup:
            self.fixup_bias = nn.Parameter(torch.zeros(5))
            self.fixup_scale = nn.Parameter(torch.ones(1))

    def _bias(self, h, i):
        return h + self.fixup_bias[i] if self.fixup else h

    def branch_layers(self):
        """(the weighted layers inside the residual branch, its last layer), for the init schemes."""
        return [self.in_layers[-1], self.emb_layers[-1]], self.out_layers[-1]

    def branch(self, x, emb):
        """The residual branch alone (``f`` in ``x + f(x)``); diagnostics measure it."""
        norm1, _, conv1 = self.in_layers  # the SiLU modules stay for the original's layout
        h = self._bias(norm1(x), 0)
        h = conv1(self._bias(_silu(h, inplace=h is not x), 1))  # h is x under norm="none"
        emb_out = self.emb_layers(emb).type(h.dtype)
        emb_out = emb_out.reshape(*emb_out.shape, *([1] * (h.ndim - 2)))
        norm2, _, drop, conv2 = self.out_layers
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = torch.addcmul(shift, norm2(h), 1 + scale)  # norm(h) * (1 + scale) + shift in one pass
        else:
            h = norm2(h + emb_out)
        h = conv2(self._bias(drop(_silu(self._bias(h, 2))), 3))
        return h * self.fixup_scale + self.fixup_bias[4] if self.fixup else h

    def _forward(self, x, emb):
        h = self.branch(x, emb)
        # Without autograd the branch's output is ours to overwrite: no new buffer for the sum.
        return self.skip_connection(x) + h if torch.is_grad_enabled() else h.add_(self.skip_connection(x))

    def forward(self, x, emb):
        if self.use_checkpoint and self.training:
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)


class AttentionBlock(nn.Module):
    """
    Multi-head self-attention over all spatial positions, ``x + proj_out(attn(qkv(norm(x))))``.
    ``qkv`` keeps the original per-head ``[q_h; k_h; v_h]`` channel layout; the attention
    itself runs in ``scaled_dot_product_attention``, whose default 1/sqrt(d) scale equals the
    original's 1/d^(1/4) applied to both q and k.

    :param channels: channels in and out.
    :param num_heads: attention heads; ``channels`` must divide evenly.
    """

    def __init__(self, channels, num_heads=1, use_checkpoint=False, norm="group", fixup=False):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention channels {channels} not divisible by num_heads {num_heads}")
        self.num_heads, self.use_checkpoint = num_heads, use_checkpoint
        self.norm = normalization(channels, norm)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.proj_out = conv_nd(1, channels, channels, 1)
        self.fixup = fixup
        if fixup:
            self.fixup_bias = nn.Parameter(torch.zeros(3))
            self.fixup_scale = nn.Parameter(torch.ones(1))

    def branch_layers(self):
        """(the weighted layers inside the residual branch, its last layer), for the init schemes."""
        return [self.qkv], self.proj_out

    def heads(self, x):
        """q, k and v of the positions of ``x`` (B, C, ...), each (B, heads, T, d)."""
        h = self.norm(x)
        if self.fixup:
            h = h + self.fixup_bias[0]
        # Positions first, (B, T, C), a free view of a channels-last input: q, k and v then
        # come out with a unit-stride head dim, which SDPA's fused kernels need; from the
        # (B, C, T) layout SDPA silently falls back to its math path (explicit bmm's, the
        # T x T matrix kept for backward), which trains slower. The 1x1 convs run as the
        # linear layers they are (same weights, kernel dim dropped).
        qkv = F.linear(h.flatten(2).transpose(1, 2), self.qkv.weight.squeeze(-1), self.qkv.bias)
        return rearrange(qkv, "b t (h three d) -> three b h t d", h=self.num_heads, three=3)

    def branch(self, x):
        """The residual branch on (B, C, ...) positions, any spatial shape; returns that shape."""
        q, k, v = self.heads(x)
        h = rearrange(F.scaled_dot_product_attention(q, k, v), "b h t d -> b t (h d)")
        if self.fixup:
            h = h + self.fixup_bias[1]
        h = F.linear(h, self.proj_out.weight.squeeze(-1), self.proj_out.bias)
        if self.fixup:
            h = h * self.fixup_scale + self.fixup_bias[2]
        return h.transpose(1, 2).unflatten(2, x.shape[2:])

    def _forward(self, x):
        return x + self.branch(x) if torch.is_grad_enabled() else self.branch(x).add_(x)

    def forward(self, x):
        if self.use_checkpoint and self.training:
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


def _contiguous_state(module, state_dict, prefix, local_metadata):
    """Hand out state_dict tensors in the standard layout whatever the layout inside, so that
    files (safetensors insists on it) and other code see ordinary tensors. Parameters
    themselves (``keep_vars=True``) are left as they are."""
    for k, v in state_dict.items():
        if k.startswith(prefix) and not isinstance(v, nn.Parameter) and not v.is_contiguous():
            state_dict[k] = v.contiguous()


class UNetModel(nn.Module):
    """
    The improved-DDPM U-Net with attention and timestep embedding.

    :param in_channels: channels of the input image.
    :param model_channels: base channel count.
    :param out_channels: output channels (2x ``in_channels`` when the variance is learned).
    :param num_res_blocks: residual blocks per resolution.
    :param attention_resolutions: downsample factors (1, 2, 4, ...) at which to add attention.
    :param dropout: dropout rate inside the residual blocks.
    :param channel_mult: channel multiplier per resolution.
    :param conv_resample: learned 3x3 convs for up/downsampling (else nearest/avg-pool).
    :param dims: 1, 2 or 3 spatial dimensions.
    :param num_classes: if set, the model is class-conditional with that many classes.
    :param use_checkpoint: gradient checkpointing to save memory.
    :param num_heads: attention heads in the encoder and middle.
    :param num_heads_upsample: attention heads in the decoder (-1: ``num_heads``).
    :param use_scale_shift_norm: FiLM-like conditioning in the residual blocks.
    :param init: the init scheme (see ``unet.core.init.INIT_SCHEMES``); "zero" is improved-DDPM's.
    :param norm: "group" (GroupNorm, the original) or "none" (identity, for the ablation).
    """

    def __init__(self, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions,
                 dropout=0, channel_mult=(1, 2, 4, 8), conv_resample=True, dims=2, num_classes=None,
                 use_checkpoint=False, num_heads=1, num_heads_upsample=-1, use_scale_shift_norm=False,
                 init="zero", norm="group"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; valid: {', '.join(NORMS)}")
        num_heads_upsample = num_heads if num_heads_upsample == -1 else num_heads_upsample
        self.in_channels, self.model_channels, self.out_channels = in_channels, model_channels, out_channels
        self.num_classes, self.init_scheme, self.norm, self.dims = num_classes, init, norm, dims
        fixup = init == "fixup"
        emb_dim = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_dim)

        def res(ch_in, ch_out):
            return ResBlock(ch_in, emb_dim, dropout, out_channels=ch_out, dims=dims, use_checkpoint=use_checkpoint,
                            use_scale_shift_norm=use_scale_shift_norm, norm=norm, fixup=fixup)

        def attn(ch, heads):
            return AttentionBlock(ch, num_heads=heads, use_checkpoint=use_checkpoint, norm=norm, fixup=fixup)

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, in_channels, model_channels, 3, padding=1))]
        )
        skip_chans, ch, ds = [model_channels], model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attn(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch, conv_resample, dims)))
                skip_chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch, num_heads), res(ch, ch))
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attn(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch, conv_resample, dims))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(
            normalization(ch, norm), nn.SiLU(), conv_nd(dims, model_channels, out_channels, 3, padding=1)
        )
        apply_init(self, init)
        self.register_state_dict_post_hook(_contiguous_state)
        self.set_channels_last(False)  # the standard layout until a run chooses (``resolve_layout``)

    def set_channels_last(self, enabled):
        """Run the network channels-last inside (or not): the input is turned channels-last and
        the conv weights are kept so, since a channels-last conv would otherwise copy its weight
        into that layout on every call and copy its gradient back (~4% of a CIFAR-10 step).
        State dicts are unaffected (standard layout either way); outputs are the same."""
        if enabled and self.dims != 2:
            raise ValueError(f"channels-last needs 2-D data; this model has dims={self.dims}")
        self.channels_last = bool(enabled)
        return self.to(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def forward(self, x, timesteps, y=None):
        """
        :param x: an [N x C x ...] batch of inputs.
        :param timesteps: a 1-D batch of timesteps.
        :param y: an [N] batch of labels, if class-conditional.
        :return: an [N x out_channels x ...] tensor.
        """
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("pass y if and only if the model is class-conditional")
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        hs, h = [], x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h).contiguous()

    def res_blocks(self):
        """(name, ResBlock) pairs in forward order: encoder, middle, decoder."""
        return [(n, m) for n, m in self.named_modules() if isinstance(m, ResBlock)]

    def residual_blocks(self):
        """(name, block) pairs of every block of the form ``x + f(x)`` (ResBlocks and
        AttentionBlocks) in forward order; each exposes ``branch_layers()`` and ``fixup``."""
        return [(n, m) for n, m in self.named_modules() if isinstance(m, (ResBlock, AttentionBlock))]

    def output_layer(self):
        """(name, layer) of the final conv, which improved-DDPM zero-initialises."""
        return f"out.{len(self.out) - 1}", self.out[-1]

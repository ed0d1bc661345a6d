"""
The initialisation schemes behind the ablation flag ``UNetModel(init=...)``.

- ``zero``: improved-DDPM's. ``zero_module`` on the last conv of every ResBlock's
  ``out_layers``, every AttentionBlock's ``proj_out`` and the final output conv; all else
  at PyTorch's default. The model outputs 0. Every attention block and every ResBlock that
  keeps its channel count starts as the identity; a ResBlock that changes it (every decoder
  block, and encoder blocks at a new width) starts as its 1x1 skip conv, not the identity.
- ``standard``: the same network without ``zero_module``: PyTorch's default everywhere.
- ``zero-branches``: ``standard`` with the residual branches' last layers zeroed (ResBlock
  ``out_layers[-1]``, attention ``proj_out``) and the output conv at its default init.
- ``zero-output``: ``standard`` with only the output conv zeroed.
- ``near-zero``: ``standard`` with the layers ``zero`` zeroes scaled by ``NEAR_ZERO_SCALE``
  (in the spirit of EDM's DDPM++ init): the same staged start in the forward pass, but every
  layer gets a gradient from step 0 and Adam's first steps act on tiny, not zero, weights.
  These three split ``standard`` from ``zero`` one difference at a time; their other weights
  are bit-identical to ``standard``'s (and so to ``zero``'s).
- ``kaiming``: every conv and linear He-normal (fan-in, ReLU gain), biases zero: the
  "standard method" Fixup compares against.
- ``fixup``: Fixup's rules (Zhang, Dauphin & Ma, 2019) for ``norm="none"``: the layers
  inside each residual branch He-initialised and scaled by L^(-1/(2m-2)) (L branches of m
  layers), the last layer of each branch and the output conv zero, a scalar multiplier
  (init 1) per branch and scalar biases (init 0), which the model creates under this scheme.
- ``all-zero``: every conv, linear and embedding weight and bias zero: the textbook
  pitfall, in which every channel of a layer computes the same thing forever. Norm
  scales stay at 1: they are the same for every channel, so they keep the symmetry.
"""

import torch.nn as nn

from .choices import INIT_SCHEMES  # noqa: F401 (read here by callers)
from .nn import zero_module

_CONV_LINEAR = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
NEAR_ZERO_SCALE = 1e-5


# What a scheme needs of the model, and all it uses (so this module never imports the model):
# ``model.residual_blocks()`` -> [(name, block)], each block's ``branch_layers()`` -> (inner
# layers, last layer) and ``fixup`` flag, ``model.output_layer()`` -> (name, conv), and
# ``model.time_embed``.


def zeroed_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers improved-DDPM wraps in ``zero_module``, as (name, module) pairs: the last
    layer of every residual branch (each ResBlock's ``out_layers[-1]``, each AttentionBlock's
    ``proj_out``), then the output conv."""
    layers = []
    for name, block in model.residual_blocks():
        last = block.branch_layers()[1]
        relative = next(n for n, m in block.named_modules() if m is last)
        layers.append((f"{name}.{relative}", last))
    return layers + [model.output_layer()]


def he_normal_(layer, gain_for="relu", scale=1.0):
    """He-normal weights (fan-in) times ``scale``, zero bias."""
    nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity=gain_for)
    layer.weight.data.mul_(scale)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def fixup_scale(num_branches, layers_per_branch=2):
    """Fixup's rescaling of branch-internal weights, L^(-1/(2m-2)) (Zhang et al., 2019, rule 2)."""
    return num_branches ** (-1.0 / (2 * layers_per_branch - 2))


def _init_fixup(model):
    blocks = [block for _, block in model.residual_blocks()]
    scale = fixup_scale(len(blocks))
    in_branch = set()
    for block in blocks:
        inner, last = block.branch_layers()
        for layer in inner:
            he_normal_(layer, scale=scale)
        zero_module(last)
        in_branch |= {*inner, last}
    for m in model.time_embed:
        if isinstance(m, nn.Linear):
            he_normal_(m)
            in_branch.add(m)
    # Input, skip and resampling convs are not followed by an activation: unit gain keeps
    # the signal's RMS from one resolution to the next.
    for m in model.modules():
        if isinstance(m, _CONV_LINEAR) and m not in in_branch:
            he_normal_(m, gain_for="linear")
    zero_module(model.output_layer()[1])


def _init_split(model, scheme):
    """``standard`` and the arms that split it from ``zero``: every zeroed layer is first
    re-drawn at its default init in one fixed order (so each arm consumes the RNG as
    ``standard`` does and its other weights match standard's bit for bit), then the arm's
    subset is zeroed or scaled."""
    layers = zeroed_layers(model)
    for _, layer in layers:
        layer.reset_parameters()
    branch_ends, output = [layer for _, layer in layers[:-1]], layers[-1][1]
    if scheme == "zero-branches":
        for layer in branch_ends:
            zero_module(layer)
    elif scheme == "zero-output":
        zero_module(output)
    elif scheme == "near-zero":
        for layer in [*branch_ends, output]:
            for p in layer.parameters():
                p.data.mul_(NEAR_ZERO_SCALE)


def apply_init(model, scheme):
    """
    Initialise ``model`` (a ``UNetModel``) in place by the named scheme.

    :param model: the U-Net.
    :param scheme: one of ``INIT_SCHEMES``.
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"unknown init scheme {scheme!r}; valid: {', '.join(INIT_SCHEMES)}")
    if scheme == "zero":
        for _, layer in zeroed_layers(model):
            zero_module(layer)
    elif scheme in ("standard", "zero-branches", "zero-output", "near-zero"):
        _init_split(model, scheme)
    elif scheme == "kaiming":
        for m in model.modules():
            if isinstance(m, _CONV_LINEAR):
                he_normal_(m)
    elif scheme == "fixup":
        if not any(block.fixup for _, block in model.residual_blocks()):
            raise ValueError("init 'fixup' needs the Fixup scalars: build the model with UNetModel(init='fixup')")
        _init_fixup(model)
    else:  # all-zero
        for m in model.modules():
            if isinstance(m, (*_CONV_LINEAR, nn.Embedding)):
                zero_module(m)
    return model

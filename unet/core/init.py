"""
The initialisation schemes behind the ablation flag ``UNetModel(init=...)``.

- ``zero``: improved-DDPM's. ``zero_module`` on the last conv of every ResBlock's
  ``out_layers``, every AttentionBlock's ``proj_out`` and the final output conv; all else
  at PyTorch's default. Every residual block starts as the identity, the model outputs 0.
- ``standard``: the same network without ``zero_module``: PyTorch's default everywhere.
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


# What a scheme needs of the model, and all it uses (so this module never imports the model):
# ``model.residual_blocks()`` -> [(name, block)], each block's ``branch_layers()`` -> (inner
# layers, last layer) and ``fixup`` flag, ``model.output_layer()`` -> (name, conv), and
# ``model.time_embed``.


def zeroed_layers(model):
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
    elif scheme == "standard":
        for _, layer in zeroed_layers(model):
            layer.reset_parameters()
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

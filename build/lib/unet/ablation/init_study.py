"""
Two measurements of the init alone, beside the grid:

- the init-only scaling study (no training): for widths x depths and each arm, per-block
  activation RMS, per-layer-group gradient norms, and how far one Adam step moves the network's
  output per unit learning rate. It tests the prediction that zero and standard init differ in
  where the output starts (a zero output against a random one), not in how fast an Adam step
  moves it: Adam's first step moves every weight by about lr whatever its gradient's scale.
- the init memory (a few short trainings): how many Adam steps until two arms of the same seed
  hold weights that differ by less than their init scale, which sets how long a run must be
  before the init is forgotten and a difference in outcome could no longer be the init's.
"""

import math

import torch

from unet.core.model import UNetModel


def _model(width, depth, arm, seed=0):
    torch.manual_seed(seed)
    return UNetModel(in_channels=1, model_channels=width, out_channels=2, num_res_blocks=depth,
                     attention_resolutions=(), channel_mult=(1, 1), num_classes=10, use_scale_shift_norm=True,
                     init=arm)


def _batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g),
            torch.randint(0, 10, (n,), generator=g), torch.randn(n, 1, 8, 8, generator=g))


def one_model(width, depth, arm, lr=1e-4):
    """The init measures of one (width, depth, arm); the loss is L_simple on a random batch."""
    from unet.train.diagnostics import block_stats, layer_groups

    model = _model(width, depth, arm)
    x, t, y, noise = _batch()
    blocks = block_stats(model, x, t, y)
    out0 = model(x, t, y)[:, :1]
    loss = (out0 - noise).pow(2).mean()
    loss.backward()
    params = dict(model.named_parameters())
    grads = {g: math.sqrt(sum(float(params[n].grad.pow(2).sum()) for n in names if params[n].grad is not None))
             for g, names in layer_groups(model).items()}
    torch.optim.Adam(model.parameters(), lr=lr).step()
    with torch.no_grad():
        out1 = model(x, t, y)[:, :1]
    return {"width": width, "depth": depth, "arm": arm, "output_rms": out0.detach().pow(2).mean().sqrt().item(),
            "initial_loss": loss.item(), "block_rms": [b["rms"] for b in blocks], "grad_norm": grads,
            "output_change_per_lr": (out1 - out0.detach()).pow(2).mean().sqrt().item() / lr}


def scaling_study(widths=(32, 64, 128), depths=(1, 2, 4, 8), arms=("zero", "standard")):
    """``one_model`` for every width x depth x arm, as a list of rows."""
    return [one_model(w, d, a) for w in widths for d in depths for a in arms]


def _branch_end_weights(model):
    from unet.core.init import zeroed_layers

    return torch.cat([layer.weight.detach().flatten() for _, layer in zeroed_layers(model)])


def init_memory(cfg, arms=("zero", "standard"), lrs=(4e-4, 0.03), steps=300, every=25):
    """
    For each lr: train ``arms`` from the same seed and record, every ``every`` steps, the RMS
    difference of their zeroed layers' weights over standard's init RMS of those weights
    (1 at step 0: the init's difference; below 1 the two have converged closer than the init
    set them apart).

    :param cfg: a ``TrainConfig`` (the grid's panel); lr, init and output_dir are replaced.
    :return: {lr: {"steps": [...], "ratio": [...]}}.
    """
    from unet.train.loop import train

    out = {}
    for lr in lrs:
        weights = {}
        for arm in arms:
            weights[arm] = []

            def record(step, row, model, arm=arm, weights=weights):
                if step % every == 0:
                    weights[arm].append(_branch_end_weights(model).clone())

            run = cfg.replace(lr=lr, init=arm, max_steps=steps, output_dir=f"{cfg.output_dir}/{arm}-{lr:g}",
                              eval_every=0, diagnostics_every=0, sample_every=-1, checkpoint_every=steps,
                              report_to="none", progress=False, overwrite=True)
            init = _branch_end_weights(_model_from(run))
            weights[arm].insert(0, init)
            train(run, hooks=(record,))
        scale = weights[arms[1]][0].pow(2).mean().sqrt().item()
        n = min(len(w) for w in weights.values())
        out[lr] = {"steps": [i * every for i in range(n)],
                   "ratio": [(weights[arms[0]][i] - weights[arms[1]][i]).pow(2).mean().sqrt().item() / scale
                             for i in range(n)]}
    return out


def _model_from(cfg):
    from accelerate.utils import set_seed

    from unet.train.factory import create_model

    set_seed(cfg.seed)
    return create_model(cfg)

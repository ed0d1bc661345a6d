"""
Stability measurements, defined once and shared by training logs and the ablation:
gradient norm, update-to-weight ratio, residual-branch/skip RMS per block, activation RMS by
depth, loss spikes, divergence, and how distinct the output channels of the zeroed layers are.
"""

import math
import statistics
from collections import deque

import torch

from unet.core.init import zeroed_layers


def rms(x):
    """Root mean square of a tensor, as a float."""
    return x.detach().float().pow(2).mean().sqrt().item()


def grad_norm(model):
    """Global L2 norm of all parameter gradients (0 where none yet)."""
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return torch.stack(norms).norm().item() if norms else 0.0


def snapshot(model):
    """A detached copy of every parameter, to measure the next update against."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def update_to_weight_ratio(before, model):
    """RMS of the last update over RMS of the weights before it, over all parameters:
    ~lr for Adam on O(1) weights; large values mean the step rewrote the network."""
    num = den = 0.0
    for n, p in model.named_parameters():
        num += (p.detach() - before[n]).float().pow(2).sum().item()
        den += before[n].float().pow(2).sum().item()
    return (num / den) ** 0.5 if den > 0 else float("inf")


@torch.no_grad()
def block_stats(model, x, t, y=None):
    """
    One forward pass recording, for every ResBlock in forward order, the RMS of its output
    and the ratio RMS(residual branch) / RMS(skip path). At ``zero`` init the ratio is 0 (each
    block is the identity); a ratio far above 1 means the branches swamp the skip paths.

    :return: list of dicts with ``name``, ``depth``, ``rms``, ``branch_skip_ratio``.
    """
    stats, handles = [], []
    for depth, (name, block) in enumerate(model.res_blocks()):
        def hook(module, args, out, name=name, depth=depth):
            skip = module.skip_connection(args[0])
            stats.append(
                dict(name=name, depth=depth, rms=rms(out), branch_skip_ratio=rms(out - skip) / max(rms(skip), 1e-12))
            )

        handles.append(block.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        model(x, t, y) if y is not None else model(x, t)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return stats


def block_measures(model, x, t, y=None):
    """What training records from one ``block_stats`` pass: ``residual_ratios`` {ResBlock
    name: RMS(branch) / RMS(skip)} and ``activation_rms`` [(name, RMS of its output)] from
    the first block to the last."""
    stats = block_stats(model, x, t, y)
    return {"residual_ratios": {s["name"]: s["branch_skip_ratio"] for s in stats},
            "activation_rms": [(s["name"], s["rms"]) for s in stats]}


def channel_distinctness(weight):
    """Mean pairwise distance between a layer's output channels (weight rows), over the
    rows' RMS norm: 0 when every output channel is the same function (symmetry unbroken)."""
    w = weight.detach().float().flatten(1)
    if len(w) < 2:
        return 0.0
    d = torch.cdist(w, w)
    mean_dist = d.sum() / (len(w) * (len(w) - 1))
    scale = w.norm(dim=1).mean()
    return (mean_dist / scale).item() if scale > 0 else 0.0


def zeroed_layer_distinctness(model):
    """{name: channel_distinctness} of the layers improved-DDPM zero-initialises."""
    return {name: channel_distinctness(layer.weight) for name, layer in zeroed_layers(model)}


class SpikeDetector:
    """
    Counts loss spikes: a loss above ``factor`` x the median of the previous ``window`` losses.

    :param window: how many past losses the running median covers.
    :param factor: how far above the median a loss must be to count.
    """

    def __init__(self, window=50, factor=2.0):
        self.window, self.factor = window, factor
        self.history = deque(maxlen=window)
        self.count = 0

    def update(self, loss):
        """Record ``loss``; True if it is a spike (it needs a few past losses to judge)."""
        spike = len(self.history) >= min(10, self.window) and loss > self.factor * statistics.median(self.history)
        self.count += int(spike)
        self.history.append(loss)
        return spike

    def state_dict(self):
        return {"history": list(self.history), "count": self.count}

    def load_state_dict(self, state):
        self.history = deque(state["history"], maxlen=self.window)
        self.count = state["count"]


class DivergenceMonitor:
    """
    The divergence rule, stated once: a run has diverged when a loss or gradient norm is
    non-finite (at any step, the first included), or when the median of the last ``window``
    finite losses exceeds ``factor`` x the initial (first finite) loss. A median rather than
    one loss because under L_hybrid a single batch with t near 0 can exceed that level through
    its VB term in any healthy run: that is a spike (``SpikeDetector``), not a divergence.

    :param factor: how far above the initial loss the smoothed loss may go; 0 = no level
        rule (only a non-finite value counts).
    :param window: how many recent finite losses the median covers (1 = the loss itself);
        the level rule waits until that many have been seen.
    """

    def __init__(self, factor=10.0, window=1):
        self.factor, self.window = float(factor), int(window)
        self.initial_loss = None
        self.recent = deque(maxlen=self.window)

    def update(self, loss, grad_norm=None):
        """Record one step; returns why the run diverged (one line), or None."""
        loss = float(loss)
        if not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(float(grad_norm))):
            return "non-finite loss or gradient"
        if self.initial_loss is None:
            self.initial_loss = loss
        self.recent.append(loss)
        if self.factor > 0 and len(self.recent) == self.window and \
                statistics.median(self.recent) > self.factor * self.initial_loss:
            if self.window == 1:
                return f"loss above {self.factor:g}x the initial loss"
            return f"median of {self.window} losses above {self.factor:g}x the initial loss"
        return None

    def state_dict(self):
        return {"initial_loss": self.initial_loss, "recent": list(self.recent)}

    def load_state_dict(self, state):
        self.initial_loss = state["initial_loss"]
        self.recent = deque(state["recent"], maxlen=self.window)


class UpdateRatioTracker:
    """
    The update-to-weight RMS ratio over time (EDM2's measure of uncontrolled growth): each
    ``update(model)`` returns the ratio of the change since the previous call (or since
    construction) and takes a new snapshot.

    :param model: the module whose parameters are tracked.
    """

    def __init__(self, model):
        self.before = snapshot(model)

    def update(self, model):
        """The update-to-weight ratio since the last call; then re-snapshot."""
        ratio = update_to_weight_ratio(self.before, model)
        self.before = snapshot(model)
        return ratio


def loss_by_quartile(t, losses, num_timesteps):
    """Mean loss in each quarter of [0, T): {"q0": ..., "q3": ...}, where t falls."""
    q = (t.detach() * 4 // num_timesteps).clamp(max=3)
    return {f"q{i}": losses.detach()[q == i].mean().item() for i in range(4) if (q == i).any()}

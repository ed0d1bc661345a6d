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
from unet.core.model import UNetModel


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
def block_stats(model: UNetModel, x: torch.Tensor, t: torch.Tensor, y: "torch.Tensor | None" = None) -> list[dict]:
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
    _forward_with_hooks(model, x, t, y, handles)
    return stats


def _forward_with_hooks(model, x, t, y, handles):
    """One eval-mode forward pass of ``model`` for its hooks' sake; the hooks are removed and
    the training mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        model(x, t, y) if y is not None else model(x, t)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()


def block_measures(model, x, t, y=None):
    """What training records from one ``block_stats`` pass: ``residual_ratios`` {ResBlock
    name: RMS(branch) / RMS(skip)} and ``activation_rms`` [(name, RMS of its output)] from
    the first block to the last."""
    stats = block_stats(model, x, t, y)
    return {"residual_ratios": {s["name"]: s["branch_skip_ratio"] for s in stats},
            "activation_rms": [(s["name"], s["rms"]) for s in stats]}


@torch.no_grad()
def attention_stats(model, x, t, y=None):
    """The middle block's attention on one batch: the largest pre-softmax logit (q.k / sqrt(d))
    and the mean entropy of its attention rows, with log(T), the entropy of uniform attention.
    Logits that grow while the entropy collapses are the attention-logit instability."""
    block, seen = model.middle_block[1], {}
    handle = block.register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0]))
    _forward_with_hooks(model, x, t, y, [handle])
    q, k, _ = block.heads(seen["x"])
    logits = q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])
    p = logits.softmax(-1)
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1).mean().item()
    return {"max_logit": logits.max().item(), "entropy": entropy, "uniform_entropy": math.log(logits.shape[-1])}


LAYER_GROUPS = ("branch_ends", "attention", "embeddings", "other")


def layer_groups(model: UNetModel) -> dict[str, list[str]]:
    """{group: [parameter names]}: ``branch_ends`` (the layers improved-DDPM zero-initialises:
    residual branches' last layers and the output conv), ``attention`` (the rest of the
    attention blocks), ``embeddings`` (timestep and label embeddings, and each ResBlock's
    projection of them), ``other`` (every other conv and norm)."""
    ends = {id(p) for _, layer in zeroed_layers(model) for p in layer.parameters()}
    groups = {g: [] for g in LAYER_GROUPS}
    for name, p in model.named_parameters():
        if id(p) in ends:
            group = "branch_ends"
        elif ".qkv." in name or ".proj_out." in name:
            group = "attention"
        elif name.startswith(("time_embed.", "label_emb.")) or ".emb_layers." in name:
            group = "embeddings"
        else:
            group = "other"
        groups[group].append(name)
    return groups


def group_update_ratios(before, model, groups):
    """``update_to_weight_ratio`` per layer group since the ``before`` snapshot."""
    params = dict(model.named_parameters())
    out = {}
    for group, names in groups.items():
        num = sum((params[n].detach() - before[n]).float().pow(2).sum().item() for n in names)
        den = sum(before[n].float().pow(2).sum().item() for n in names)
        out[group] = (num / den) ** 0.5 if den > 0 else (float("inf") if num > 0 else 0.0)
    return out


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

    def __init__(self, window=50, factor=2.0, min_history=10):
        self.window, self.factor, self.min_history = window, factor, min(min_history, window)
        self.history = deque(maxlen=window)
        self.count = 0

    def update(self, loss):
        """Record ``loss``; True if it is a spike (judged once ``min_history`` past losses exist)."""
        spike = len(self.history) >= self.min_history and loss > self.factor * statistics.median(self.history)
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


class FailureRule:
    """
    The ablation's one definition of a failed run, applied step by step to training's history
    rows. A run fails at the first of:

    - a non-finite training loss or held-out loss (``diverged``: the stricter count);
    - a held-out L_simple (``eval_mse``: the fixed held-out batch, fixed t and noise) above
      ``zero_loss``, the L_simple of a model that predicts zero noise on that batch: a run
      worse than that has learned nothing, whatever its trend;
    - an mse spike: a step's training mse above ``spike_factor`` x the median of the previous
      ``spike_window`` steps' (all ``spike_window`` needed).

    :param zero_loss: the zero predictor's held-out L_simple (``zero_predictor_loss``).
    """

    def __init__(self, zero_loss, spike_factor=3.0, spike_window=20):
        self.zero_loss = zero_loss
        self.spikes = SpikeDetector(window=spike_window, factor=spike_factor, min_history=spike_window)
        self.reason, self.diverged, self.step = None, False, None

    def update(self, row):
        """Read one history row; returns the failure reason once failed (and from then on)."""
        if self.reason is not None:
            return self.reason
        step, loss, mse, held_out = row["step"], row.get("loss"), row.get("mse"), row.get("eval_mse")
        if row.get("skipped") or not _finite(loss) or (held_out is not None and not _finite(held_out)):
            self.reason, self.diverged = f"non-finite loss at step {step}", True
        elif held_out is not None and held_out > self.zero_loss:
            self.reason = (f"held-out L_simple {held_out:.3g} above the zero predictor's {self.zero_loss:.3g} "
                           f"at step {step}")
        elif mse is not None and self.spikes.update(mse):
            self.reason = (f"mse spike at step {step}: {mse:.3g} above {self.spikes.factor:g}x the median of the "
                           f"previous {self.spikes.window} steps")
        if self.reason is not None:
            self.step = step
        return self.reason


def _finite(x):
    return x is not None and math.isfinite(x)


def zero_predictor_loss(noise: torch.Tensor) -> float:
    """L_simple of predicting zero noise on a batch whose true noise is ``noise``: the mean of
    noise^2 (~1 for unit-variance noise; computed, so the rule holds for any batch)."""
    return noise.double().pow(2).mean().item()


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

"""
What the runner records of every run while it trains, never acting on any failure rule: the
held-out checks, the guard that alone may stop a run, and the mechanism measures.

- **Checks**: held-out L_simple every ``check_every`` steps and at step 0 (the initial model), on
  one fixed batch of the held-out split with t stratified over the whole schedule (image i at
  t = floor((i + 1/2) T / N)) and fixed noise: the same numbers for every run of a grid.
- **Guard**: a run stops at a non-finite loss, or when the median training L_simple of the last
  ``definitions.GUARD_WINDOW`` steps exceeds ``GUARD_FACTOR`` x the zero predictor's.
- **Mechanism**: the update-to-weight ratio per layer group at steps 1, 2, 3, 5, 10 (the staged
  start against warmup) and at every check; at every check the weight RMS per layer group, the
  largest ResBlock output RMS, the largest |activation| of any layer (fp16 overflows above 65504)
  and the middle attention's largest logit.
"""

import math
import statistics

import torch

from .definitions import GUARD_FACTOR, GUARD_WINDOW

UPDATE_STEPS = (1, 2, 3, 5, 10)
FP16_MAX = 65504.0


def stratified_batch(cfg, count=None):
    """(x, t, noise, model kwargs, zero-predictor L_simple): the held-out check batch of ``cfg``."""
    from unet.data.dataset import fixed_batch, load_image_data
    from unet.train.diagnostics import zero_predictor_loss

    data = load_image_data(cfg, log=lambda *_: None)
    x, y = fixed_batch(data.eval if data.eval is not None else data.train, count or cfg.eval_batch_size)
    n, steps = x.shape[0], cfg.diffusion_steps
    t = ((torch.arange(n, dtype=torch.float64) + 0.5) * steps / n).long().clamp_(0, steps - 1)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    return x, t, noise, ({"y": y} if cfg.class_cond else {}), zero_predictor_loss(noise)


_BATCHES = {}
BATCH_KEYS = ("dataset", "data_dir", "image_size", "channels", "eval_fraction", "eval_batch_size", "class_cond",
              "diffusion_steps")


def check_batch(cfg):
    """``stratified_batch`` kept once per process for the keys that decide it."""
    key = tuple(getattr(cfg, k) for k in BATCH_KEYS)
    if key not in _BATCHES:
        _BATCHES[key] = stratified_batch(cfg)
    return _BATCHES[key]


class ZeroPredictor(torch.nn.Module):
    """A model whose every output is 0 (the zero predictor the failure definitions compare with)."""

    def __init__(self, out_channels):
        super().__init__()
        self.out_channels = out_channels

    def forward(self, x, t, y=None):
        return torch.zeros(x.shape[0], self.out_channels, *x.shape[2:], dtype=x.dtype)


@torch.no_grad()
def held_out_mse(model, diffusion, batch, chunk=256):
    """The held-out L_simple (mse term) of ``model`` on a ``stratified_batch``, eval mode."""
    x, t, noise, kwargs, _ = batch
    was = model.training
    model.eval()
    try:
        total = 0.0
        for i in range(0, len(x), chunk):
            sl = slice(i, i + chunk)
            terms = diffusion.training_losses(model, x[sl], t[sl], {k: v[sl] for k, v in kwargs.items()}, noise[sl])
            total += terms["mse"].double().sum().item()
        return total / len(x)
    finally:
        model.train(was)


def layer_groups_split(model):
    """``diagnostics.layer_groups`` with the output conv apart from the branch ends (the 2x2
    design zeroes them separately)."""
    from unet.train.diagnostics import layer_groups

    groups = layer_groups(model)
    out_name = model.output_layer()[0]
    out = [n for n in groups["branch_ends"] if n.startswith(out_name + ".")]
    groups["branch_ends"] = [n for n in groups["branch_ends"] if n not in out]
    groups["output"] = out
    return groups


@torch.no_grad()
def activation_extremes(model, x, t, y):
    """One eval-mode forward pass: the largest |output| of any leaf module and the largest
    ResBlock output RMS."""
    biggest, handles = [0.0], []
    for m in model.modules():
        if not list(m.children()):
            handles.append(m.register_forward_hook(
                lambda mod, args, out: biggest.__setitem__(0, max(biggest[0], out.detach().abs().max().item()))
                if torch.is_tensor(out) else None))
    from unet.train.diagnostics import block_stats

    try:
        stats = block_stats(model, x, t, y)
    finally:
        for h in handles:
            h.remove()
    return {"max_abs_activation": biggest[0], "max_block_rms": max((s["rms"] for s in stats), default=0.0)}


def largest(values):
    """The largest of ``values``; inf if one was not finite (JSON stores it as None)."""
    values = list(values)
    return math.inf if any(v is None or not math.isfinite(v) for v in values) else max(values, default=None)


class Recorder:
    """
    The runner's one training hook: checks, guard and mechanism (module docstring). Returns True
    (stop) only for a non-finite loss or the guard.

    :param init_model: the model exactly as training starts from it (checked as step 0).
    :param cfg: the run's config.
    :param check_every: steps between held-out checks.
    """

    def __init__(self, init_model, cfg, check_every):
        from unet.train import diagnostics
        from unet.train.factory import create_diffusion_from_config

        self.d, self.every = diagnostics, check_every
        self.diffusion = create_diffusion_from_config(cfg)
        self.batch = check_batch(cfg)
        x, t, noise, kwargs, _ = self.batch
        n = min(32, len(x))
        self.diag = (self.diffusion.q_sample(x[:n], t[:n], noise[:n]), self.diffusion.model_timesteps(t[:n]),
                     kwargs["y"][:n] if kwargs else None)
        # The bar through the very code that measures the checks: a zero output is exactly on it.
        self.zero_loss = held_out_mse(ZeroPredictor(init_model.out_channels), self.diffusion, self.batch)
        self.groups = layer_groups_split(init_model)
        self.checks = {"steps": [], "mse": []}
        self.mechanism, self.updates = [], {}
        self.recent, self.stopped = [], None
        self.before = diagnostics.snapshot(init_model)  # step 1's update is measured against the init
        self._check(0, init_model)

    def _check(self, step, model):
        self.checks["steps"].append(step)
        self.checks["mse"].append(held_out_mse(model, self.diffusion, self.batch))
        x, t, y = self.diag
        row = {"step": step, "weight_rms": self._weight_rms(model), **activation_extremes(model, x, t, y)}
        try:
            row["max_logit"] = self.d.attention_stats(model, x, t, y)["max_logit"]
        except (AttributeError, IndexError, TypeError):  # a model without a middle attention block
            row["max_logit"] = None
        self.mechanism.append(row)

    def _weight_rms(self, model):
        params = dict(model.named_parameters())
        return {g: math.sqrt(sum(params[n].detach().float().pow(2).sum().item() for n in names)
                             / max(1, sum(params[n].numel() for n in names))) for g, names in self.groups.items()}

    def __call__(self, step, row, model):
        if self.before is not None and (step in UPDATE_STEPS or step % self.every == 0):
            self.updates[step] = self.d.group_update_ratios(self.before, model, self.groups)
            self.before = None
        if (step + 1) in UPDATE_STEPS or (step + 1) % self.every == 0:
            self.before = self.d.snapshot(model)  # the next step's update is measured against this
        mse = row.get("mse")
        if row.get("skipped") or mse is None or not math.isfinite(mse) or not math.isfinite(row.get("loss", 0.0)):
            self.stopped = f"non-finite loss at step {step}"
            return True
        self.recent = (self.recent + [mse])[-GUARD_WINDOW:]
        if len(self.recent) == GUARD_WINDOW and statistics.median(self.recent) > GUARD_FACTOR * self.zero_loss:
            self.stopped = (f"guard at step {step}: median training L_simple of the last {GUARD_WINDOW} steps "
                            f"{statistics.median(self.recent):.3g} above {GUARD_FACTOR:g}x the zero predictor's")
            return True
        if step % self.every == 0:
            self._check(step, model)
        return False

    def overflowed(self):
        """Whether any activation measured exceeded fp16's largest finite value."""
        return not largest(r["max_abs_activation"] for r in self.mechanism) <= FP16_MAX

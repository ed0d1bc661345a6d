"""
Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", EDM2, Section 3 and Appendix C): during training keep power-function EMAs of the
weights for a few profiles and store snapshots of them every ``phema_every`` steps; afterwards
reconstruct the EMA of any length ``sigma_rel`` as the least-squares combination of the
snapshots whose averaging profiles best match the one asked for.

Each function below names the part of the paper it implements. The snapshots live in
``output_dir/phema/phema_<step:08d>.safetensors``, outside ``checkpoints/``, so rotating
checkpoints never deletes them; the live EMAs are part of every checkpoint's training state,
so a resumed run continues them exactly.
"""

import json
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from unet.checkpoint.format import CheckpointError, one_line
from unet.checkpoint.phema import (  # noqa: F401 (the reading side, re-exported for the training loop's callers)
    PhemaError,
    gamma_of_sigma_rel,
    list_snapshots,
    sigma_rel_of_gamma,
    snapshots_dir,
)

# --- the power function EMA (Section 3.1, Appendix C.1-C.2) --------------------------------





def power_beta(step, gamma):
    """The EMA decay at update ``step`` (1-based) that keeps a power-function average:
    beta = (1 - 1/t)^(gamma+1); step 1 copies the weights (beta 0). Over steps this gives the
    weights at step k the mass ((k^(gamma+1) - (k-1)^(gamma+1)) / t^(gamma+1), the profile
    integrated over [k-1, k]."""
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


class PowerEMA:
    """Power-function EMAs of a model's parameters, one per ``sigma_rel`` (Section 3.1).

    :param params: the parameters to average (the plain, unwrapped model's).
    :param sigma_rels: the profiles to keep (EDM2 trains with 0.05 and 0.10).
    """

    def __init__(self, params, sigma_rels):
        params = list(params)
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = [gamma_of_sigma_rel(s) for s in self.sigma_rels]
        self.averages = [[p.detach().clone().float() for p in params] for _ in self.sigma_rels]
        self.step = 0

    @torch.no_grad()
    def update(self, params):
        """One update with the weights after step ``self.step + 1``."""
        self.step += 1
        params = [p.detach().float() for p in params]
        for avg, gamma in zip(self.averages, self.gammas):
            weight = 1.0 - power_beta(self.step, gamma)
            for a, p in zip(avg, params):
                a.lerp_(p, weight)

    def state_dict(self):
        return {"step": self.step, **{f"{s:g}": {str(i): a for i, a in enumerate(avg)}
                                      for s, avg in zip(self.sigma_rels, self.averages)}}

    def load_state_dict(self, state):
        self.step = int(state["step"])
        for s, avg in zip(self.sigma_rels, self.averages):
            saved = state[f"{s:g}"]
            for i, a in enumerate(avg):
                a.copy_(saved[str(i)])


# --- snapshots on disk --------------------------------------------------------------------



def save_snapshot(output_dir, names, ema):
    """Write ``ema``'s averages at its step as one safetensors file (written whole, then
    renamed), its profiles in the metadata. A failed write (a full disk raises safetensors'
    ``SafetensorError``, not ``OSError``) is a one-line ``CheckpointError``, the partial file
    removed and the earlier snapshots untouched.

    :param names: the model's parameter names, in ``ema``'s order.
    """
    folder = snapshots_dir(output_dir)
    tensors = {f"{s:g}/{n}": a.cpu().contiguous() for s, avg in zip(ema.sigma_rels, ema.averages)
               for n, a in zip(names, avg)}
    meta = {"step": str(ema.step), "sigma_rels": json.dumps(ema.sigma_rels), "gammas": json.dumps(ema.gammas)}
    final = os.path.join(folder, f"phema_{ema.step:08d}.safetensors")
    try:
        os.makedirs(folder, exist_ok=True)
        save_file(tensors, final + ".tmp", metadata=meta)
        os.replace(final + ".tmp", final)
    except (OSError, SafetensorError) as e:
        if os.path.exists(final + ".tmp"):
            os.remove(final + ".tmp")
        raise CheckpointError(f"cannot write post-hoc EMA snapshot {final}: {one_line(e)}; the earlier snapshots "
                              "are kept") from None
    return final



def tidy_snapshots(output_dir, step, log):
    """Before the first step: snapshots of a later step than the run starts from belong to a
    run that is being replaced (fresh or ``--overwrite``) or will be written again: removed."""
    gone = [p for s, p in list_snapshots(output_dir).items() if s > step]
    for p in gone:
        os.remove(p)
    if gone:
        log(f"phema: removed {len(gone)} snapshot(s) after step {step} from {snapshots_dir(output_dir)}")




# --- during training ----------------------------------------------------------------------

def make(cfg, params, is_main):
    """The run's ``PowerEMA`` (main process, ``phema_every`` > 0), else None."""
    return PowerEMA(params, cfg.phema_sigma_rels) if cfg.phema_every and is_main else None


def after_step(run, record):
    """Update the power EMAs with this step's weights (a skipped step's are unchanged, so the
    profile stays a function of the step alone) and write a snapshot every ``phema_every``
    steps: on that grid only, so a run stopped and resumed stores the snapshots of a straight
    run (a ``max_steps`` off the grid has no snapshot at its last step)."""
    if run.phema is None:
        return
    run.phema.update(run.raw.parameters())
    if record.step % run.cfg.phema_every == 0:
        save_snapshot(run.cfg.output_dir, [n for n, _ in run.raw.named_parameters()], run.phema)

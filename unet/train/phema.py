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
import re

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from unet.utils.jsonfile import write_json

from .checkpoint import ema_filename

SNAPSHOT_RE = re.compile(r"^phema_(\d{8})\.safetensors$")


class PhemaError(ValueError):
    """No snapshots, or a ``sigma_rel`` they cannot reconstruct; the message is one line."""


# --- the power function EMA (Section 3.1, Appendix C.1-C.2) --------------------------------

def sigma_rel_of_gamma(gamma):
    """The relative standard deviation of the power-function profile p(tau) ~ tau^gamma on
    [0, t]: its width over its time, ((gamma+1) / ((gamma+2)^2 (gamma+3)))^(1/2)."""
    return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))


def gamma_of_sigma_rel(sigma_rel):
    """The exponent gamma with ``sigma_rel_of_gamma(gamma) == sigma_rel``: the largest real
    root of the cubic that equation squares into, gamma^3 + 7 gamma^2 + (16 - s^-2) gamma +
    (12 - s^-2) = 0 (positive exactly when s < 12^-1/2)."""
    s2 = float(sigma_rel) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s2, 12.0 - s2])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


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

def snapshots_dir(output_dir):
    return os.path.join(output_dir, "phema")


def save_snapshot(output_dir, names, ema):
    """Write ``ema``'s averages at its step as one safetensors file (written whole, then
    renamed), its profiles in the metadata.

    :param names: the model's parameter names, in ``ema``'s order.
    """
    folder = snapshots_dir(output_dir)
    os.makedirs(folder, exist_ok=True)
    tensors = {f"{s:g}/{n}": a.cpu().contiguous() for s, avg in zip(ema.sigma_rels, ema.averages)
               for n, a in zip(names, avg)}
    meta = {"step": str(ema.step), "sigma_rels": json.dumps(ema.sigma_rels), "gammas": json.dumps(ema.gammas)}
    final = os.path.join(folder, f"phema_{ema.step:08d}.safetensors")
    save_file(tensors, final + ".tmp", metadata=meta)
    os.replace(final + ".tmp", final)
    return final


def list_snapshots(output_dir):
    """{step: path} of the run's snapshots, lowest step first."""
    folder = snapshots_dir(output_dir)
    names = sorted(n for n in os.listdir(folder) if SNAPSHOT_RE.match(n)) if os.path.isdir(folder) else []
    return {int(SNAPSHOT_RE.match(n).group(1)): os.path.join(folder, n) for n in names}


def tidy_snapshots(output_dir, step, log):
    """Before the first step: snapshots of a later step than the run starts from belong to a
    run that is being replaced (fresh or ``--overwrite``) or will be written again: removed."""
    gone = [p for s, p in list_snapshots(output_dir).items() if s > step]
    for p in gone:
        os.remove(p)
    if gone:
        log(f"phema: removed {len(gone)} snapshot(s) after step {step} from {snapshots_dir(output_dir)}")


def snapshot_profiles(output_dir, upto=None):
    """[(step, sigma_rel, gamma, path)] of every stored profile up to step ``upto``."""
    found = []
    for step, path in list_snapshots(output_dir).items():
        if upto is not None and step > upto:
            continue
        with safe_open(path, "pt") as f:
            meta = f.metadata()
        found += [(step, s, g, path) for s, g in zip(json.loads(meta["sigma_rels"]), json.loads(meta["gammas"]))]
    if not found:
        raise PhemaError(f"no post-hoc EMA snapshots in {snapshots_dir(output_dir)}"
                         + (f" up to step {upto}" if upto is not None else "") + " (train with --phema_every N)")
    return found


# --- reconstruction (Appendix C.3) --------------------------------------------------------

def profile_inner(t_a, g_a, t_b, g_b):
    """The inner product of two normalised power profiles, p(tau) = (g+1) tau^g / t^(g+1) on
    [0, t]: the integral of their product, in closed form over [0, min(t_a, t_b)]."""
    t = np.minimum(t_a, t_b)
    return (g_a + 1) * (g_b + 1) * t ** (g_a + g_b + 1) / ((g_a + g_b + 1) * t_a ** (g_a + 1) * t_b ** (g_b + 1))


def solve_weights(steps, gammas, target_step, target_gamma):
    """
    The least-squares coefficients x of the stored profiles whose sum best matches the target
    profile in L2: the normal equations A x = b with A_ij = <p_i, p_j>, b_i = <p_i, p_target>.
    Steps are divided by the target step first (the solution is scale-free, the numbers
    are not).

    :return: (x, the relative L2 error of the fitted profile).
    """
    t = np.asarray(steps, dtype=np.float64) / target_step
    g = np.asarray(gammas, dtype=np.float64)
    A = profile_inner(t[:, None], g[:, None], t[None, :], g[None, :])
    b = profile_inner(t, g, 1.0, target_gamma)
    x = np.linalg.lstsq(A, b, rcond=None)[0]
    target = profile_inner(1.0, target_gamma, 1.0, target_gamma)
    residual = max(float(target - 2 * x @ b + x @ A @ x), 0.0)
    return x, float(np.sqrt(residual / target))


def check_sigma_rel(sigma_rel, stored):
    """A ``sigma_rel`` between the smallest and largest stored profile: reconstruction
    interpolates between the stored widths and does not extrapolate beyond them."""
    lo, hi = min(stored), max(stored)
    if not lo <= sigma_rel <= hi:
        names = ", ".join(f"{s:g}" for s in sorted(stored))
        raise PhemaError(f"sigma_rel {sigma_rel:g}: the stored profiles ({names}) reconstruct sigma_rel in "
                         f"[{lo:g}, {hi:g}]")


def reconstruct(output_dir, sigma_rel, step=None):
    """
    The EMA of length ``sigma_rel`` at the last snapshot up to ``step`` (default: the last
    snapshot) from the run's snapshots up to there.

    :return: ({parameter name: float32 tensor}, info dict: step, sigma_rel, gamma, snapshots
        used, the fitted profile's relative error).
    """
    profiles = snapshot_profiles(output_dir, step)
    check_sigma_rel(sigma_rel, {s for _, s, _, _ in profiles})
    target_step = max(p[0] for p in profiles)  # the last snapshot up to ``step``: never extrapolated in time
    gamma = gamma_of_sigma_rel(sigma_rel)
    x, err = solve_weights([p[0] for p in profiles], [p[2] for p in profiles], target_step, gamma)
    out = {}
    for (_, s, _, path), w in zip(profiles, x):
        with safe_open(path, "pt") as f:
            for key in f.keys():
                prefix, name = key.split("/", 1)
                if prefix == f"{s:g}":
                    out[name] = out.get(name, 0) + float(w) * f.get_tensor(key).double()
    info = dict(step=target_step, sigma_rel=sigma_rel, gamma=gamma, snapshots=len({p[0] for p in profiles}),
                profiles=len(profiles), profile_error=err)
    return {k: v.float() for k, v in out.items()}, info


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


def checkpoint_state(run):
    """What a checkpoint keeps of the power EMAs (nothing without them)."""
    return {} if run.phema is None else {"phema": run.phema.state_dict()}


# --- the reconstructed checkpoint ---------------------------------------------------------

def run_folder(path):
    """(the run's output_dir, the step a checkpoint folder ``path`` names or None): ``path``
    is a run's output_dir or one of its ``checkpoints/checkpoint_<step>`` folders."""
    m = re.match(r"^checkpoint_(\d{8})$", os.path.basename(os.path.normpath(path)))
    if m:
        return os.path.dirname(os.path.dirname(os.path.normpath(path))), int(m.group(1))
    return path, None


def write_checkpoint(config_file, weights, info, ema_rates, out):
    """
    ``out`` as a checkpoint folder that ``load_checkpoint`` (so ``sample.py``, ``evaluate.py``
    and ``export.py``) reads: the run's ``config.yaml``, the reconstructed weights as
    ``model.safetensors`` and under every EMA rate's name (so the default, EMA, loads them
    too), and ``train_state.json`` with the step and how they were reconstructed.

    :param config_file: the run's ``config.yaml``.
    :param weights: {parameter name: tensor} from ``reconstruct``.
    :param info: ``reconstruct``'s info dict.
    """
    os.makedirs(out, exist_ok=True)
    for name in ["model.safetensors", *(ema_filename(r) for r in ema_rates)]:
        save_file(weights, os.path.join(out, name), metadata={"phema": json.dumps(info)})
    with open(config_file) as src, open(os.path.join(out, "config.yaml"), "w") as dst:
        dst.write(src.read())
    write_json(os.path.join(out, "train_state.json"), {"step": info["step"], "phema": info})
    return out

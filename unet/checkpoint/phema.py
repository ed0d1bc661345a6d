"""
Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", EDM2, Section 3 and Appendix C), the reading side: a run's snapshots of power-function
EMAs (``output_dir/phema/phema_<step:08d>.safetensors``, written by ``unet.train.phema``), the
least-squares reconstruction of the EMA of any length ``sigma_rel`` from them, and the
checkpoint folder it is written as. Each function names the part of the paper it implements.
"""

import json
import os
import re
import shutil
from collections.abc import Collection

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .format import (
    CONFIG_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    STATE_FILE,
    ema_filename,
    one_line,
    read_manifest,
    verify_files,
    write_manifest,
)

SNAPSHOT_RE = re.compile(r"^phema_(\d{8})\.safetensors$")


class PhemaError(ValueError):
    """No snapshots, a corrupt one, or a ``sigma_rel`` they cannot reconstruct; one line."""


# --- the power function profile (Section 3.1, Appendix C.1-C.2) ----------------------------

def sigma_rel_of_gamma(gamma: float) -> float:
    """The relative standard deviation of the power-function profile p(tau) ~ tau^gamma on
    [0, t]: its width over its time, ((gamma+1) / ((gamma+2)^2 (gamma+3)))^(1/2)."""
    return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))


def gamma_of_sigma_rel(sigma_rel: float) -> float:
    """The exponent gamma with ``sigma_rel_of_gamma(gamma) == sigma_rel``: the largest real
    root of the cubic that equation squares into, gamma^3 + 7 gamma^2 + (16 - s^-2) gamma +
    (12 - s^-2) = 0 (positive exactly when s < 12^-1/2)."""
    s2 = float(sigma_rel) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s2, 12.0 - s2])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


# --- snapshots on disk --------------------------------------------------------------------

def snapshots_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "phema")


def list_snapshots(output_dir: str) -> dict[int, str]:
    """{step: path} of the run's snapshots, lowest step first."""
    folder = snapshots_dir(output_dir)
    names = sorted(n for n in os.listdir(folder) if SNAPSHOT_RE.match(n)) if os.path.isdir(folder) else []
    return {int(SNAPSHOT_RE.match(n).group(1)): os.path.join(folder, n) for n in names}


def snapshot_profiles(output_dir: str, upto: "int | None" = None) -> list[tuple[int, float, float, str]]:
    """[(step, sigma_rel, gamma, path)] of every stored profile up to step ``upto``."""
    found = []
    for step, path in list_snapshots(output_dir).items():
        if upto is not None and step > upto:
            continue
        try:
            with safe_open(path, "pt") as f:
                meta = f.metadata() or {}
            sigmas, gammas = json.loads(meta["sigma_rels"]), json.loads(meta["gammas"])
            found += [(step, float(s), float(g), path) for s, g in zip(sigmas, gammas, strict=True)]
        except (OSError, SafetensorError, KeyError, ValueError, TypeError) as e:
            raise PhemaError(f"post-hoc EMA snapshot {path} is unreadable or has no profile metadata "
                             f"({type(e).__name__}: {one_line(e)})") from None
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


def check_sigma_rel(sigma_rel: float, stored: Collection[float]) -> None:
    """A ``sigma_rel`` between the smallest and largest stored profile: reconstruction
    interpolates between the stored widths and does not extrapolate beyond them."""
    lo, hi = min(stored), max(stored)
    if not lo <= sigma_rel <= hi:
        names = ", ".join(f"{s:g}" for s in sorted(stored))
        raise PhemaError(f"sigma_rel {sigma_rel:g}: the stored profiles ({names}) reconstruct sigma_rel in "
                         f"[{lo:g}, {hi:g}]")


def reconstruct(output_dir: str, sigma_rel: float, step: "int | None" = None) -> "tuple[dict[str, torch.Tensor], dict]":
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
        try:
            with safe_open(path, "pt") as f:
                for key in f.keys():
                    prefix, name = key.split("/", 1)
                    if prefix == f"{s:g}":
                        out[name] = out.get(name, 0) + float(w) * f.get_tensor(key).double()
        except (OSError, SafetensorError, ValueError) as e:
            raise PhemaError(f"post-hoc EMA snapshot {path} is unreadable ({one_line(e)})") from None
    info = dict(step=target_step, sigma_rel=sigma_rel, gamma=gamma, snapshots=len({p[0] for p in profiles}),
                profiles=len(profiles), profile_error=err)
    return {k: v.float() for k, v in out.items()}, info


# --- the reconstructed checkpoint ---------------------------------------------------------

def run_folder(path: str) -> "tuple[str, int | None]":
    """(the run's output_dir, the step a checkpoint folder ``path`` names or None): ``path``
    is a run's output_dir or one of its ``checkpoints/checkpoint_<step>`` folders."""
    m = re.match(r"^checkpoint_(\d{8})$", os.path.basename(os.path.normpath(path)))
    if m:
        return os.path.dirname(os.path.dirname(os.path.normpath(path))), int(m.group(1))
    return path, None


def check_out(out: str, source: str) -> None:
    """Refuse an ``--out`` that would overwrite what training wrote: the source checkpoint, any
    training checkpoint (it holds optimizer and RNG files), or a run's output folder."""
    real = os.path.realpath(out)
    training = os.path.isdir(out) and any(
        n in ("optimizer.bin", "checkpoints") or n.startswith("random_states_") for n in os.listdir(out))
    if real == os.path.realpath(source) or training or re.match(r"^checkpoint_\d{8}$", os.path.basename(real)):
        raise PhemaError(f"--out {out} is a training checkpoint or run folder: writing there would replace its "
                         "weights, config and state; choose a new folder")


def write_checkpoint(source: str, weights: dict, info: dict, out: str) -> str:
    """
    ``out`` as a checkpoint folder that ``load_checkpoint`` (so ``sample.py``, ``evaluate.py``
    and ``export.py``) reads: the source checkpoint's ``config.yaml`` and architecture, the
    reconstructed weights as ``model.safetensors`` and under every EMA rate's name (so the
    default, EMA, loads them too), ``train_state.json`` with the step and how they were
    reconstructed, and a manifest. Each file is written beside its final name and renamed
    into place, the manifest last; a failed write (a full disk) is one line, the partial files
    removed.

    :param source: the run's checkpoint the model's config and architecture come from (verified).
    :param weights: {parameter name: tensor} from ``reconstruct``.
    :param info: ``reconstruct``'s info dict.
    """
    check_out(out, source)
    manifest = read_manifest(source)
    verify_files(source, manifest, [CONFIG_FILE])
    arch = manifest["architecture"]
    with open(os.path.join(source, CONFIG_FILE), "rb") as f:
        config = f.read()  # read whole before anything is written
    tmp = os.path.join(out, ".tmp-phema")
    try:
        os.makedirs(tmp, exist_ok=True)
        for name in [MODEL_FILE, *(ema_filename(r) for r in arch["ema_rates"])]:
            save_file(weights, os.path.join(tmp, name), metadata={"phema": json.dumps(info)})
        with open(os.path.join(tmp, CONFIG_FILE), "wb") as f:
            f.write(config)
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump({"step": info["step"], "phema": info}, f)
        write_manifest(tmp, arch)
        names = sorted(os.listdir(tmp), key=lambda n: n == MANIFEST_FILE)  # the manifest last
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(out, name))
    except (OSError, SafetensorError) as e:
        raise PhemaError(f"cannot write {out}: {one_line(e)}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out

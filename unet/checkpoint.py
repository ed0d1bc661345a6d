"""Checkpoints: ``accelerator.save_state`` (model, optimizer, lr schedule, RNG) plus what
accelerate does not know about (EMA weights, timestep-sampler state, step counters),
written into a temporary folder and renamed into place, so that a process killed while
saving leaves the previous checkpoint as the latest complete one.

Layout of ``output_dir/checkpoints/checkpoint_<step:08d>/``:
``model.safetensors`` (UNetModel keys), ``ema_<rate>.safetensors``, ``config.yaml``,
``train_state.json`` + ``train_state.safetensors``, and accelerate's optimizer,
scheduler and RNG files. Nothing is ever unpickled when loading: weights come from
safetensors, accelerate reads its own files with ``torch.load(weights_only=True)``.

``load_checkpoint`` is the one loader for sampling, evaluation and export: it reads these
folders (or a run's latest) and original improved-diffusion ``.pt`` state dicts (also with
``weights_only=True``), and returns a ``Loaded``."""

import json
import os
import re
import shutil
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ConfigError, TrainConfig
from .diffusion import create_diffusion
from .factory import architecture_from_config, create_model
from .model import UNetModel

CHECKPOINT_RE = re.compile(r"^checkpoint_(\d{8})$")
TMP_PREFIX = ".tmp-"


class CheckpointError(ValueError):
    """A missing, incomplete or corrupt checkpoint; the message is one line."""


def checkpoints_root(output_dir):
    return os.path.join(output_dir, "checkpoints")


def list_checkpoints(output_dir):
    """Complete checkpoints of a run, oldest first (temporary folders are not listed)."""
    root = checkpoints_root(output_dir)
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if CHECKPOINT_RE.match(n))
    return [os.path.join(root, n) for n in names]


def latest_checkpoint(output_dir):
    """The newest complete checkpoint folder under ``output_dir``, or None."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def checkpoint_step(path):
    m = CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else None


def ema_filename(rate):
    return f"ema_{rate:g}.safetensors"


def _strip_module(state):
    # DDP's wrapper prefixes every key with "module."; files hold the UNetModel's own keys.
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def ema_state_dict(model, ema):
    """The EMA's shadow parameters under the model's parameter names."""
    names = [n for n, _ in model.named_parameters()]
    return {n: p.detach().cpu().contiguous() for n, p in zip(names, ema.shadow_params)}


def _split_state(state, prefix, tensors):
    """JSON-able part of a (nested) state dict; tensors go to ``tensors`` under dotted keys."""
    out = {}
    for k, v in state.items():
        key = f"{prefix}.{k}"
        if isinstance(v, torch.Tensor):
            tensors[key] = v.detach().cpu().contiguous()
            out[k] = {"__tensor__": key}
        elif isinstance(v, dict):
            out[k] = _split_state(v, key, tensors)
        elif hasattr(v, "tolist"):  # numpy arrays and scalars
            out[k] = v.tolist()
        else:
            out[k] = v
    return out


def _join_state(state, tensors):
    if isinstance(state, dict):
        if set(state) == {"__tensor__"}:
            return tensors[state["__tensor__"]]
        return {k: _join_state(v, tensors) for k, v in state.items()}
    return state


def save_checkpoint(accelerator, output_dir, step, cfg, model, emas, train_state, keep):
    """
    Save everything needed to continue the run at ``step``. Call on every process.

    :param model: the prepared (possibly DDP-wrapped) model.
    :param emas: {rate: diffusers ``EMAModel``}.
    :param train_state: JSON-able dict whose values may include tensors or nested state dicts.
    :param keep: how many complete checkpoints to keep.
    :return: the checkpoint folder.
    """
    root = checkpoints_root(output_dir)
    final = os.path.join(root, f"checkpoint_{step:08d}")
    tmp = os.path.join(root, f"{TMP_PREFIX}checkpoint_{step:08d}")
    if accelerator.is_main_process:
        os.makedirs(root, exist_ok=True)
        for n in os.listdir(root):  # leftovers of a save that was killed
            if n.startswith(TMP_PREFIX):
                shutil.rmtree(os.path.join(root, n), ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    weights = accelerator.get_state_dict(model)  # on every process: sharded setups gather here
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        save_file(_strip_module(weights), os.path.join(tmp, "model.safetensors"))
        for rate, ema in emas.items():
            save_file(ema_state_dict(unwrapped, ema), os.path.join(tmp, ema_filename(rate)))
        tensors = {}
        meta = _split_state(train_state, "state", tensors)
        if tensors:
            save_file(tensors, os.path.join(tmp, "train_state.safetensors"))
        with open(os.path.join(tmp, "train_state.json"), "w") as f:
            json.dump(meta, f)
        cfg.save(os.path.join(tmp, "config.yaml"))
        _commit(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _commit(tmp, final):
    """Rename the finished folder into place (atomic on one file system)."""
    if os.path.exists(final):  # the same step saved again: swap, then drop the old copy
        old = final + ".old"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def resolve_resume(resume, output_dir):
    """The checkpoint folder ``resume`` ("latest" or a path) points to, or None to start fresh."""
    if not resume:
        return None
    if resume == "latest":
        return latest_checkpoint(output_dir)  # nothing yet: start fresh, as a restarted job should
    path = resume
    if not CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path))):
        path = latest_checkpoint(path)  # an output_dir was given
    if path is None or not os.path.isfile(os.path.join(path, "train_state.json")):
        raise CheckpointError(f"config key 'resume': no complete checkpoint at '{resume}'")
    return path


def load_training_state(accelerator, path, model, emas):
    """Restore a checkpoint saved by ``save_checkpoint`` into prepared objects; returns train_state."""
    try:
        # The model file holds unwrapped keys, which a DDP wrapper would not match: let
        # accelerate restore optimizer, scheduler and RNG, then load the weights strictly here.
        accelerator.load_state(path, strict=False)
        accelerator.unwrap_model(model).load_state_dict(load_file(os.path.join(path, "model.safetensors")))
        for rate, ema in emas.items():
            state = load_file(os.path.join(path, ema_filename(rate)))
            names = [n for n, _ in accelerator.unwrap_model(model).named_parameters()]
            ema.shadow_params = [state[n].to(p.device) for n, p in zip(names, ema.shadow_params)]
        with open(os.path.join(path, "train_state.json")) as f:
            meta = json.load(f)
        tensors_file = os.path.join(path, "train_state.safetensors")
        tensors = load_file(tensors_file) if os.path.exists(tensors_file) else {}
    except (OSError, KeyError, RuntimeError, SafetensorError, ValueError) as e:
        raise CheckpointError(f"cannot resume from '{path}': {_one_line(e)}") from None
    return _join_state(meta, tensors)


def _one_line(e):
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


# --- loading a model to sample, evaluate or export ----------------------------------

@dataclass
class Loaded:
    """A model in eval mode with what is needed to sample from it, rebuild or export it.
    ``config`` is None only for an original ``.pt`` described by explicit kwargs."""
    model: UNetModel
    model_kwargs: dict
    diffusion_kwargs: dict
    image_size: int
    config: "TrainConfig | None" = None

    def diffusion(self, timestep_respacing=None):
        """The model's diffusion process (``timestep_respacing`` overrides the trained one)."""
        kwargs = dict(self.diffusion_kwargs)
        if timestep_respacing is not None:
            kwargs["timestep_respacing"] = timestep_respacing
        return create_diffusion(**kwargs)


def load_checkpoint(path, ema=True, config=None, device="cpu"):
    """
    Load a trained model from either format; every failure is a one-line ``CheckpointError``
    (or ``FileNotFoundError`` for a missing ``config`` file).

    :param path: a checkpoint folder (``.../checkpoint_00001000``), a run's output_dir (its
        latest checkpoint), or an improved-diffusion ``.pt`` state dict.
    :param ema: True for the first EMA rate, a float for that rate, False for the raw
        weights (``.pt`` files hold one set of weights: ignored).
    :param config: for ``.pt`` files, their architecture (see ``factory.architecture_from_config``).
    """
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if os.path.isfile(path):
        return load_iddpm_checkpoint(path, config, device)
    ckpt = path if os.path.isfile(os.path.join(path, "train_state.json")) else latest_checkpoint(path)
    if ckpt is None:
        raise CheckpointError(f"no checkpoint in '{path}' (expected a checkpoint folder or checkpoints/checkpoint_*/)")
    try:
        cfg = TrainConfig.load(os.path.join(ckpt, "config.yaml"))
    except ConfigError as e:
        raise CheckpointError(f"checkpoint '{ckpt}' has an unusable config.yaml: {e}") from None
    file = os.path.join(ckpt, weights_filename(ckpt, cfg, ema))
    model = create_model(cfg)
    try:
        model.load_state_dict(load_file(file, device=str(device)))
    except (OSError, RuntimeError, SafetensorError) as e:
        raise CheckpointError(f"cannot load '{file}': {_one_line(e)}") from None
    return Loaded(model.to(device).eval(), cfg.model_kwargs(), cfg.diffusion_kwargs(), cfg.image_size, cfg)


def ema_from_flags(raw, ema_rate):
    """``load_checkpoint``'s ``ema`` from the tools' ``--raw`` and ``--ema_rate`` flags."""
    return False if raw else (ema_rate if ema_rate is not None else True)


def weights_filename(ckpt, cfg, ema):
    """The weights file of checkpoint ``ckpt`` that ``ema`` (True, a rate, False) names."""
    if ema is False:
        return "model.safetensors"
    rate = cfg.ema_rates[0] if ema is True else float(ema)
    if rate not in cfg.ema_rates:
        raise CheckpointError(f"checkpoint '{ckpt}' has no EMA rate {rate:g} (it has {cfg.ema_rates})")
    return ema_filename(rate)


def load_iddpm_checkpoint(path, config, device="cpu"):
    """An improved-diffusion ``.pt`` state dict (e.g. ``ema_0.9999_500000.pt``), read with
    ``weights_only=True``, into the architecture ``config`` describes."""
    if config is None:
        raise CheckpointError(f"{path} is an improved-diffusion state dict: pass --config with its model and diffusion flags")
    image_size, model_kwargs, diffusion_kwargs, cfg = architecture_from_config(config)
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unpickling failure means the file is not a usable checkpoint
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {_one_line(e) if str(e) else ''}")
    if not isinstance(state_dict, dict) or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise CheckpointError(f"checkpoint {path} is not a state dict of tensors")
    model = UNetModel(**model_kwargs)
    check_state_dict(model, state_dict, path)
    model.load_state_dict(state_dict, strict=True)
    return Loaded(model.to(device).eval(), model_kwargs, diffusion_kwargs, image_size, cfg)


def check_state_dict(model, state_dict, path):
    """Raise a one-line ``CheckpointError`` summarising how ``state_dict`` misses the model."""
    ours, theirs = model.state_dict(), set(state_dict)
    missing, unexpected = sorted(set(ours) - theirs), sorted(theirs - set(ours))
    wrong = sorted(k for k in set(ours) & theirs if ours[k].shape != state_dict[k].shape)
    if missing or unexpected or wrong:
        parts = [f"{name} {len(keys)} (e.g. {keys[0]})" for name, keys in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise CheckpointError(f"checkpoint {path} does not match the model config: {'; '.join(parts)}")

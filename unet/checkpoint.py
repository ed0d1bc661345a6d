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
import shutil
from dataclasses import dataclass

import torch
from accelerate.utils import load as accelerate_load
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ConfigError, TrainConfig
from .diffusion import create_diffusion
from .factory import architecture_from_config, create_model
from .model import UNetModel
from .run_dir import (CHECKPOINT_RE, TMP_PREFIX, CheckpointError, checkpoint_step,  # noqa: F401 (re-exported)
                      checkpoints_root, clean_leftovers, fsync_path, fsync_tree, latest_checkpoint,
                      list_checkpoints, publish, resolve_resume, rotate)
from .speed import LAYOUTS

RNG_FILE = "random_states_{}.pkl"  # accelerate's RNG state of process i
ACCELERATE_FILES = ("optimizer.bin", "scheduler.bin")  # read with torch.load(weights_only=True)


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
    Save everything needed to continue the run at ``step``. Call on every process. Every
    process's files are in the temporary folder (a barrier) and flushed to disk before the
    main process publishes it with one rename; a failed write (disk full, unwritable
    folder) is a one-line ``CheckpointError`` on every process, the previous checkpoint kept.

    :param model: the prepared (possibly DDP-wrapped) model.
    :param emas: {rate: diffusers ``EMAModel``}.
    :param train_state: JSON-able dict whose values may include tensors or nested state dicts.
    :param keep: how many complete checkpoints to keep.
    :return: the checkpoint folder.
    """
    root = checkpoints_root(output_dir)
    final = os.path.join(root, f"checkpoint_{step:08d}")
    tmp = os.path.join(root, f"{TMP_PREFIX}checkpoint_{step:08d}")
    error = None
    try:
        if accelerator.is_main_process:
            os.makedirs(root, exist_ok=True)
            clean_leftovers(output_dir)  # what a killed save left
        accelerator.wait_for_everyone()
        accelerator.save_state(tmp)
        fsync_path(os.path.join(tmp, RNG_FILE.format(accelerator.process_index)))
    except OSError as e:
        error = e
    weights = accelerator.get_state_dict(model)  # on every process: sharded setups gather here
    accelerator.wait_for_everyone()  # every process's files are in before the main one publishes
    if accelerator.is_main_process and error is None:
        # The process count is written down, so that a resume can tell a lost RNG file (an
        # error) from a process that did not exist when this checkpoint was saved.
        train_state = {**train_state, "num_processes": accelerator.num_processes}
        try:
            write_own_files(tmp, accelerator.unwrap_model(model), weights, emas, train_state, cfg)
            fsync_tree(tmp)
            publish(tmp, final)
            rotate(output_dir, final, keep)
        except OSError as e:
            error = e
    if agree(accelerator, error is not None):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        kept = latest_checkpoint(output_dir)
        why = _one_line(error) if error is not None else "failed on another process"
        raise CheckpointError(f"cannot write checkpoint {final}: {why}; the previous checkpoint "
                              f"({kept or 'none'}) is kept")
    accelerator.wait_for_everyone()
    return final


def agree(accelerator, flag):
    """True on every process if ``flag`` is true on any."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([float(flag)], device=accelerator.device)
    return bool(accelerator.reduce(t, "sum").item() > 0)


def write_own_files(folder, unwrapped, weights, emas, train_state, cfg):
    """What accelerate's ``save_state`` does not write: the UNetModel's keys, the EMAs, the
    training state and the config."""
    save_file(_strip_module(weights), os.path.join(folder, "model.safetensors"))
    for rate, ema in emas.items():
        save_file(ema_state_dict(unwrapped, ema), os.path.join(folder, ema_filename(rate)))
    tensors = {}
    meta = _split_state(train_state, "state", tensors)
    if tensors:
        save_file(tensors, os.path.join(folder, "train_state.safetensors"))
    with open(os.path.join(folder, "train_state.json"), "w") as f:
        json.dump(meta, f)
    cfg.save(os.path.join(folder, "config.yaml"))


def saved_train_state(path):
    """The ``train_state.json`` of the checkpoint at ``path`` as a dict, for a look before the
    state is loaded; {} where it cannot be read (loading the state reports that in one line)."""
    try:
        with open(os.path.join(path, "train_state.json")) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def saved_layout(path):
    """The layout (``memory_format``) the checkpoint at ``path`` was trained in, or "auto"
    where it does not say (older checkpoints) or cannot be read."""
    layout = saved_train_state(path).get("memory_format")
    return layout if layout in LAYOUTS else "auto"


def rng_writers(path):
    """How many processes saved the checkpoint at ``path``: ``num_processes`` of its
    ``train_state.json`` (the count of RNG files for checkpoints written before it was kept)."""
    saved = saved_train_state(path).get("num_processes")
    if isinstance(saved, int) and saved >= 1:
        return saved
    return max(1, sum(1 for n in os.listdir(path) if n.startswith("random_states_") and n.endswith(".pkl")))


def check_training_files(path, num_processes, emas, scaler=False):
    """
    The files a resume reads, checked before anything is loaded: present, not empty, and
    accelerate's pickled parts readable (it would otherwise fail with a traceback, or, for
    an RNG file, silently go on without it). Each problem is a one-line ``CheckpointError``
    naming the file. Every process checks the RNG files of all processes that have one to
    read (the folder is shared), so all of them fail alike; a process whose index is beyond
    the saving run's process count has none (the resume logs that it starts from its process
    seed).

    :param num_processes: the resuming run's process count.
    :return: how many processes saved the checkpoint (``rng_writers``).
    """
    names = ["model.safetensors", "train_state.json", "config.yaml", *ACCELERATE_FILES,
             *(ema_filename(r) for r in emas), *(["scaler.pt"] if scaler else [])]
    writers = rng_writers(path)
    names += [RNG_FILE.format(i) for i in range(min(writers, num_processes))]
    for name in names:
        file = os.path.join(path, name)
        if not os.path.isfile(file) or os.path.getsize(file) == 0:
            raise CheckpointError(f"cannot resume from '{path}': {name} is "
                                  f"{'empty' if os.path.isfile(file) else 'missing'}")
        if name.endswith((".bin", ".pkl", ".pt")):
            try:
                accelerate_load(file, map_location="cpu")
            except Exception as e:  # truncated or foreign: EOFError, UnpicklingError, RuntimeError
                raise CheckpointError(f"cannot resume from '{path}': {name} is unreadable "
                                      f"({type(e).__name__}: {_one_line(e)})") from None
    return writers


def load_training_state(accelerator, path, model, emas):
    """Restore a checkpoint saved by ``save_checkpoint`` into prepared objects; returns
    train_state (with ``"rng_writers"``: how many processes saved the checkpoint)."""
    writers = check_training_files(path, accelerator.num_processes, emas, scaler=accelerator.scaler is not None)
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
    except (OSError, KeyError, RuntimeError, SafetensorError, ValueError, EOFError) as e:
        raise CheckpointError(f"cannot resume from '{path}': {_one_line(e)}") from None
    return {**_join_state(meta, tensors), "rng_writers": writers}


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

"""The run folder and its checkpoints: one concept, from the folder down to the files.

The folder (``output_dir/checkpoints/``): which checkpoints it holds, how a finished one is
published (fsync, then one rename), which are rotated out, what an interrupted save or
deletion leaves behind and how that is cleaned, and what a starting run may do with it.
Names there: ``checkpoint_<step:08d>`` a published checkpoint; ``.tmp-checkpoint_<step>``
one being written; ``checkpoint_<step>.old`` the copy being replaced when the same step is
saved again; ``.del-checkpoint_<step>`` one being deleted (renamed first, so a deletion
killed half-way never leaves a half-empty folder under a checkpoint's name).

A checkpoint: ``accelerator.save_state`` (model, optimizer, lr schedule, RNG) plus what
accelerate does not know about (EMA weights, timestep-sampler state, step counters),
written into a temporary folder and renamed into place, so that a process killed while
saving leaves the previous checkpoint as the latest complete one. Layout of
``checkpoint_<step:08d>/``: ``model.safetensors`` (UNetModel keys), ``ema_<rate>.safetensors``,
``config.yaml``, ``train_state.json`` + ``train_state.safetensors``, and accelerate's
optimizer, scheduler and RNG files. Nothing is ever unpickled when loading: weights come from
safetensors, accelerate reads its own files with ``torch.load(weights_only=True)``.

Resume: which checkpoint a starting run continues (``plan``), which changed keys that allows
(``unet.train.config.resume_changes``), tidying the folder before the first step, and
restoring a checkpoint's state with the changed optimizer settings applied.

``load_checkpoint`` is the one loader for sampling, evaluation and export: it reads these
folders (or a run's latest) and original improved-diffusion ``.pt`` state dicts (also with
``weights_only=True``), and returns a ``Loaded``.
"""

import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass

import torch
from accelerate.utils import load as accelerate_load
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from unet.core.model import LAYOUTS, UNetModel
from unet.utils.devices import any_process

from .config import ConfigError, TrainConfig, resume_changes
from .factory import architecture_from_config, create_model, diffusion_from_kwargs

CHECKPOINT_RE = re.compile(r"^checkpoint_(\d{8})$")
TMP_PREFIX = ".tmp-"
DEL_PREFIX = ".del-"
OLD_SUFFIX = ".old"
# Files a folder must hold to be loadable as a checkpoint (weights and what they are).
REQUIRED_FILES = ("model.safetensors", "config.yaml")


class CheckpointError(ValueError):
    """A missing, incomplete or corrupt checkpoint; the message is one line."""


def checkpoints_root(output_dir):
    return os.path.join(output_dir, "checkpoints")


def checkpoint_step(path):
    m = CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else None


def list_checkpoints(output_dir):
    """Complete checkpoints of a run, lowest step first (temporary, old and half-deleted
    folders are not listed)."""
    root = checkpoints_root(output_dir)
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if CHECKPOINT_RE.match(n))
    paths = [os.path.join(root, n) for n in names]
    return [p for p in paths if all(os.path.isfile(os.path.join(p, f)) for f in REQUIRED_FILES)]


def latest_checkpoint(output_dir):
    """The highest-step complete checkpoint folder under ``output_dir``, or None. (A run
    never leaves a checkpoint of a higher step than its own: see ``plan_start``.)"""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


# --- writing ---------------------------------------------------------------------------

def fsync_path(path):
    """Flush one file or folder entry to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder):
    """Flush every file in ``folder`` and the folder itself, so that the rename that
    publishes it cannot reach the disk before its contents."""
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            fsync_path(path)
    fsync_path(folder)


def publish(tmp, final):
    """Rename the finished, flushed folder ``tmp`` into place as ``final`` (atomic on one
    file system) and flush the parent folder's entry. The same step saved again: the old
    copy is moved aside first, and ``clean_leftovers`` finishes a swap cut short."""
    if os.path.exists(final):
        old = final + OLD_SUFFIX
        os.replace(final, old)
        os.replace(tmp, final)
        remove_folder(old)
    else:
        os.replace(tmp, final)
    fsync_path(os.path.dirname(final))


def remove_folder(path):
    """Delete a checkpoint folder: renamed out of the listing first, then removed."""
    gone = os.path.join(os.path.dirname(path), DEL_PREFIX + os.path.basename(path))
    os.replace(path, gone)
    shutil.rmtree(gone, ignore_errors=True)


def rotate(output_dir, final, keep):
    """
    Keep ``final`` (the checkpoint just written) and the most recently written others, up
    to ``keep`` in all; recency is the folder's modification time (the last file written
    into it), not the step number. Returns the folders removed.
    """
    others = [c for c in list_checkpoints(output_dir) if os.path.realpath(c) != os.path.realpath(final)]
    others.sort(key=lambda c: (os.stat(c).st_mtime_ns, checkpoint_step(c)))
    drop = others[:max(0, len(others) - (keep - 1))]
    for c in drop:
        remove_folder(c)
    return drop


def clean_leftovers(output_dir):
    """
    Finish or undo what an interrupted save, swap or deletion left in the checkpoints folder:
    a swap cut short is completed (the new copy, complete before the swap began, is published)
    or undone (the old copy is put back); temporary and half-deleted folders are removed.
    Returns one line per action (empty if there was nothing to do).
    """
    root = checkpoints_root(output_dir)
    if not os.path.isdir(root):
        return []
    done = []
    for name in sorted(os.listdir(root)):
        if not (name.endswith(OLD_SUFFIX) and CHECKPOINT_RE.match(name[:-len(OLD_SUFFIX)])):
            continue
        final, old = os.path.join(root, name[:-len(OLD_SUFFIX)]), os.path.join(root, name)
        tmp = os.path.join(root, TMP_PREFIX + os.path.basename(final))
        if not os.path.exists(final):
            os.replace(tmp if os.path.isdir(tmp) else old, final)
            done.append(f"restored {os.path.basename(final)} after an interrupted save")
        if os.path.exists(old):
            remove_folder(old)
    for name in sorted(os.listdir(root)):
        if name.startswith((TMP_PREFIX, DEL_PREFIX)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            done.append(f"removed {name}, left by an interrupted save or deletion")
    return done


# --- what a starting run may do with the folder ------------------------------------------

def resolve_resume(resume, output_dir):
    """The checkpoint folder ``resume`` points to, or None to start fresh.

    :param resume: "" (fresh), "latest" (the newest in ``output_dir``; one must exist),
        "auto" (the newest if any, else fresh) or a checkpoint folder or a run's output_dir.
    """
    if not resume:
        return None
    if resume in ("latest", "auto"):
        path = latest_checkpoint(output_dir)
        if path is None and resume == "latest":
            raise CheckpointError(f"config key 'resume': no checkpoint in '{output_dir}' to continue "
                                  "(--resume auto starts fresh when there is none)")
        return path
    path = resume
    if checkpoint_step(path) is None:
        path = latest_checkpoint(path)  # an output_dir was given
    if path is None or not os.path.isfile(os.path.join(path, "train_state.json")):
        raise CheckpointError(f"config key 'resume': no complete checkpoint at '{resume}'")
    return path


def plan_start(cfg):
    """
    Where a run starts, and which checkpoints already in its ``output_dir`` it would leave
    behind: a fresh run leaves all of them, a resumed one those of a higher step than its
    start (or all, resuming another folder's checkpoint). Left there, they would be taken for
    this run's ("latest", sampling, export), so without ``overwrite`` that is refused.

    :return: (the checkpoint to resume or None, the folders ``overwrite`` removes).
    """
    path = resolve_resume(cfg.resume, cfg.output_dir)
    existing = list_checkpoints(cfg.output_dir)
    here = path is not None and os.path.realpath(os.path.dirname(path)) == os.path.realpath(
        checkpoints_root(cfg.output_dir))
    stale = [c for c in existing if not here or checkpoint_step(c) > checkpoint_step(path)]
    if stale and not cfg.overwrite:
        names = f"newest {os.path.basename(stale[-1])}"
        if path is None:
            raise ConfigError(f"output_dir '{cfg.output_dir}' already holds {len(stale)} checkpoint(s) ({names}): "
                              "continue them with --resume latest (or --resume auto), replace them with "
                              "--overwrite true, or choose a new --output_dir")
        raise ConfigError(f"resuming from '{path}' would leave {len(stale)} other checkpoint(s) in output_dir "
                          f"'{cfg.output_dir}' ({names}) to be mistaken for this run's: delete them with "
                          "--overwrite true, or choose a new --output_dir")
    return path, stale


QUIET_KEYS = ("resume", "output_dir", "overwrite")  # changing these is the point of resuming
# Keys the restored optimizer and lr schedule are set from; max_steps is the decay's horizon.
OPTIMIZER_KEYS = ("lr", "weight_decay", "warmup_steps", "max_steps", "lr_schedule", "lr_cycles", "lr_power",
                  "adam_beta1", "adam_beta2", "adam_eps")


def plan(cfg):
    """
    Read-only, before anything starts: (the checkpoint to continue or None, the folders
    ``overwrite`` will remove, {changed key: (saved, new)}). Refusals are one-line
    ``ConfigError``s; a missing or unreadable checkpoint a ``CheckpointError``.
    """
    path, stale = plan_start(cfg)
    if path is None:
        return None, stale, {}
    try:
        saved = TrainConfig.load(os.path.join(path, "config.yaml"))
    except ConfigError as e:
        raise CheckpointError(f"cannot resume from '{path}': its config.yaml is unusable: {e}") from None
    return path, stale, resume_changes(saved, cfg, path)


def tidy(output_dir, stale, log):
    """Main process, before the first step: finish or remove what interrupted saves left,
    and remove the checkpoints ``overwrite`` replaces (each named in the log)."""
    for line in clean_leftovers(output_dir):
        log(f"checkpoints: {line}")
    for folder in stale:
        remove_folder(folder)
    if stale:
        log(f"overwrite: removed {len(stale)} checkpoint(s) from {output_dir}: "
            + ", ".join(os.path.basename(f) for f in stale))


def restore(run, state, path, changes, log):
    """Restore model, optimizer, schedule, RNG, EMAs, sampler and counters from ``path``,
    then apply and log the keys this run changed."""
    loaded = load_training_state(run.accelerator, path, run.model, run.emas)
    state.load_state_dict(loaded)
    run.sampler.load_state_dict(loaded["sampler"])
    if getattr(run, "phema", None) is not None:  # post-hoc EMA's power EMAs (main process)
        run.phema.load_state_dict(loaded["phema"])
    if getattr(run.data, "stream", None) is not None:  # every process's stream position
        run.data.stream["resume"] = loaded.get("stream")
    for r, ema in run.emas.items():
        ema.optimization_step = loaded["ema_steps"][f"{r:g}"]
    log_process_count_change(loaded["rng_writers"], run.accelerator.num_processes, log)
    log(f"resumed from {path} at step {state.step}")
    if state.step >= run.cfg.max_steps:
        log(f"max_steps is {run.cfg.max_steps}: nothing left to train (raise --max_steps to continue this run)")
    for key, (old, new) in changes.items():
        if key not in QUIET_KEYS:
            log(f"resume: {key} changed from {old!r} to {new!r}")
    if any(k in changes for k in OPTIMIZER_KEYS):
        before = run.scheduler.get_last_lr()[0]
        apply_optimizer_settings(run.optimizer, run.scheduler.scheduler, run.cfg)
        if run.scheduler.get_last_lr()[0] != before:
            log(f"resume: lr at step {state.step} is now {run.scheduler.get_last_lr()[0]:.6g} (was {before:.6g})")


def log_process_count_change(writers, n, log):
    """
    A checkpoint saved by ``writers`` processes, resumed by ``n``: the data stream (examples,
    t, noise, flips of each step) is a function of the step alone and continues the same; the
    global RNG (dropout) cannot. Processes below min(writers, n) restore their own saved state;
    a process with no saved state starts from its process seed, as in a fresh run, and saved
    states beyond ``n`` are not used. Logged, never silent.
    """
    if writers == n:
        return
    if n > writers:
        fallback = (f"process(es) {', '.join(map(str, range(writers, n)))} have no saved RNG state and start "
                    "from their process seed")
    else:
        fallback = f"the RNG state(s) of process(es) {', '.join(map(str, range(n, writers)))} are not used"
    log(f"resume: the checkpoint was written by {writers} process(es), this run has {n}: the same data stream "
        f"(examples, t and noise of every step); {fallback}: the weights follow an uninterrupted run's up to "
        "float rounding without dropout, and differ (other dropout masks) with it")


def apply_optimizer_settings(optimizer, scheduler, cfg):
    """
    The restored optimizer keeps the saved lr, weight decay, betas and eps in its parameter
    groups, and the lr schedule its saved base lr: set this config's, and recompute the current
    lr (base lr x this config's schedule, built with its own horizon, at the restored step) as a
    scheduler step would.

    :param scheduler: the torch ``LambdaLR`` (not accelerate's wrapper).
    """
    for group in optimizer.param_groups:
        group["weight_decay"] = cfg.weight_decay
        group["initial_lr"] = cfg.lr
        group["betas"], group["eps"] = (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_eps
    scheduler.base_lrs = [cfg.lr] * len(scheduler.base_lrs)
    scheduler.last_epoch -= 1
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": no step is taken here
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()


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
    if any_process(accelerator, error is not None):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        kept = latest_checkpoint(output_dir)
        why = _one_line(error) if error is not None else "failed on another process"
        raise CheckpointError(f"cannot write checkpoint {final}: {why}; the previous checkpoint "
                              f"({kept or 'none'}) is kept")
    accelerator.wait_for_everyone()
    return final


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
    where it cannot be read (loading the state reports that in one line)."""
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
        return diffusion_from_kwargs(self.diffusion_kwargs, timestep_respacing)


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
        raise CheckpointError(
            f"{path} is an improved-diffusion state dict: pass --config with its model and diffusion flags"
        )
    image_size, model_kwargs, diffusion_kwargs, cfg = architecture_from_config(config)
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unpickling failure means the file is not a usable checkpoint
        raise CheckpointError(
            f"cannot read checkpoint {path}: {type(e).__name__}: {_one_line(e) if str(e) else ''}"
        ) from None
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

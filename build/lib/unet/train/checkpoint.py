"""The run folder and resume: the training side of checkpoints.

The folder (``output_dir/checkpoints/``): how a finished checkpoint is published (fsync, then
one rename), which are rotated out, what an interrupted save or deletion leaves behind and how
that is cleaned, who owns the folder (``RunLock``: one run at a time), and what a starting run
may do with it. Names there: ``checkpoint_<step:08d>`` a published checkpoint;
``.tmp-checkpoint_<step>`` one being written; ``checkpoint_<step>.old`` the copy being replaced
when the same step is saved again; ``.del-checkpoint_<step>`` one being deleted (renamed first,
so a deletion killed half-way never leaves a half-empty folder under a checkpoint's name).

What a checkpoint folder holds, its manifest and how it is read and checked is
``unet.checkpoint``'s (the format, below training and sampling). Here: writing one
(``accelerator.save_state`` for model, optimizer, lr schedule and RNG, then the files accelerate
does not know, then the manifest, into a temporary folder renamed into place), and restoring
one. The run's stateful parts are saved and restored through one list, ``PARTS``, so that a
part cannot be saved and forgotten on load. Accelerate's optimizer, scheduler and RNG files are
pickles, read only through ``torch.load(weights_only=True)`` (torch's restricted unpickler);
weights and tensors come from safetensors.

Resume: which checkpoint a starting run continues (``plan``), which changed keys that allows
(``unet.config.resume_changes``), tidying the folder before the first step, and
restoring a checkpoint's state with the changed optimizer settings applied.
"""

import dataclasses
import fcntl
import json
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from accelerate.utils import load as accelerate_load
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from unet.checkpoint.format import (  # noqa: F401 (list_checkpoints, checkpoint_step: the folder's listing)
    ACCELERATE_FILES,
    CHECKPOINT_RE,
    CONFIG_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    OPTIONAL_STATE,
    RNG_FILE,
    STATE_FILE,
    STATE_TENSORS_FILE,
    TRAIN_STATE_SCHEMA,
    CheckpointError,
    architecture_record,
    checkpoint_step,
    checkpoints_root,
    ema_filename,
    join_state,
    latest_checkpoint,
    list_checkpoints,
    one_line,
    read_config_mapping,
    read_manifest,
    read_train_state,
    split_state,
    verify_files,
    write_manifest,
)
from unet.checkpoint.load import check_shapes
from unet.config import ConfigError, TrainConfig, resume_changes
from unet.core.model import LAYOUTS
from unet.sample.sampling import null_class_label
from unet.utils.devices import any_process

TMP_PREFIX = ".tmp-"
DEL_PREFIX = ".del-"
OLD_SUFFIX = ".old"
# What a failed write raises: the OS's errors, and what torch.save (RuntimeError from its zip
# writer) and safetensors (SafetensorError) raise on a full disk instead of OSError.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


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
    if os.path.isfile(os.path.join(path, MANIFEST_FILE)):
        verify_files(path, read_manifest(path), [CONFIG_FILE])
    try:
        # Through the format's reader: an emptied config.yaml is an error, never the defaults.
        saved = TrainConfig.from_dict(read_config_mapping(path))
    except (ConfigError, CheckpointError) as e:
        raise CheckpointError(f"cannot resume from '{path}': its config.yaml is unusable: {e}") from None
    if cfg.mixed_precision == "auto":  # the checkpoint's precision is kept (unet.train.setup.choose_precision)
        cfg = dataclasses.replace(cfg, mixed_precision=saved.mixed_precision)
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


# --- the run's stateful parts ---------------------------------------------------------------

@dataclass(frozen=True)
class Part:
    """One stateful part of a run, as ``train_state.json`` keeps it under ``key``: ``save(run)``
    gives its state (None: this run has no such part), ``load(run, value)`` puts it back.
    ``needed``: a run that has the part cannot resume from a checkpoint without it."""
    key: str
    save: Callable
    load: Callable
    needed: bool = True


def _set_ema_steps(run, steps):
    for r, ema in run.emas.items():
        ema.optimization_step = steps[f"{r:g}"]


def _set_stream(run, positions):
    if getattr(run.data, "stream", None) is not None:  # read when the stream is first opened
        run.data.stream["resume"] = positions


def _stream_state(run):
    from unet.data import streaming  # a collective on every process (gathers their positions)
    return streaming.checkpoint_state(run).get("stream")


# Every part of a run that a checkpoint carries besides the weights, the EMAs' weights and
# accelerate's files. ``TrainState`` (step, counters, spikes, divergence, clock) is restored first.
PARTS = (
    Part("sampler", lambda run: run.sampler.state_dict(), lambda run, v: run.sampler.load_state_dict(v)),
    Part("ema_steps", lambda run: {f"{r:g}": e.optimization_step for r, e in run.emas.items()}, _set_ema_steps),
    # The layout is read before the model is built (``setup.run_layout``); kept here to be checked.
    Part("memory_format", lambda run: run.layout, lambda run, v: None),
    Part("phema", lambda run: run.phema.state_dict() if getattr(run, "phema", None) is not None else None,
         lambda run, v: run.phema.load_state_dict(v)),
    Part("stream", _stream_state, _set_stream),
    # Sample quality's history (best FID so far); a run that starts measuring on resume starts it empty.
    Part("quality", lambda run: run.quality.state_dict() if getattr(run, "quality", None) is not None else None,
         lambda run, v: run.quality.load_state_dict(v), needed=False),
)


def run_state(run: object, state: object) -> dict:
    """What ``train_state.json`` holds for this run at ``state``: the ``TrainState`` and every
    ``PARTS`` entry the run has (call on every process: the stream's is a collective)."""
    saved = {p.key: p.save(run) for p in PARTS}
    return {**state.state_dict(), **{k: v for k, v in saved.items() if v is not None}}


def restore_parts(run: object, state: object, loaded: dict) -> None:
    """``run_state`` undone: the ``TrainState``, then every part the run has."""
    state.load_state_dict(loaded)
    for part in PARTS:
        if part.save is _stream_state:
            present = getattr(run.data, "stream", None) is not None  # not a collective here
        else:
            present = part.save(run) is not None
        if not present:
            continue
        if part.key in loaded:
            part.load(run, loaded[part.key])
        elif part.needed:
            raise CheckpointError(f"cannot resume: the checkpoint's {STATE_FILE} has no '{part.key}', which this "
                                  "run needs")


def restore(run, state, path, changes, log):
    """Restore model, optimizer, schedule, RNG, EMAs and every part in ``PARTS`` from ``path``,
    then apply and log the keys this run changed."""
    loaded = load_training_state(run.accelerator, path, run.model, run.emas, log)
    restore_parts(run, state, loaded)
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


def _strip_module(state):
    # DDP's wrapper prefixes every key with "module."; files hold the UNetModel's own keys.
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def ema_state_dict(model, ema):
    """The EMA's shadow parameters under the model's parameter names."""
    names = [n for n, _ in model.named_parameters()]
    return {n: p.detach().cpu().contiguous() for n, p in zip(names, ema.shadow_params)}


def save_checkpoint(accelerator, output_dir: str, step: int, cfg, model, emas: dict, train_state: dict,
                    keep: int) -> str:
    """
    Save everything needed to continue the run at ``step``. Call on every process. Every
    process's files are in the temporary folder (a barrier) and flushed to disk before the
    main process writes the manifest and publishes it with one rename; a failed write (disk
    full, unwritable folder: ``OSError``, or torch's ``RuntimeError`` and safetensors'
    ``SafetensorError``, which a full disk raises) is a one-line ``CheckpointError`` on every
    process, the temporary folder removed and the previous checkpoint kept.

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
    except WRITE_ERRORS as e:
        error = e
    weights = accelerator.get_state_dict(model)  # on every process: sharded setups gather here
    accelerator.wait_for_everyone()  # every process's files are in before the main one publishes
    if accelerator.is_main_process and error is None:
        # The process count is written down, so that a resume can tell a lost RNG file (an
        # error) from a process that did not exist when this checkpoint was saved.
        train_state = {**train_state, "num_processes": accelerator.num_processes}
        try:
            unwrapped = accelerator.unwrap_model(model)
            write_own_files(tmp, unwrapped, weights, emas, train_state, cfg)
            write_manifest(tmp, architecture_record(cfg.image_size, cfg.model_kwargs(), cfg.diffusion_kwargs(),
                                                    cfg.ema_rates, null_class_label(cfg)))
            fsync_tree(tmp)
            publish(tmp, final)
            rotate(output_dir, final, keep)
        except WRITE_ERRORS as e:
            error = e
    if any_process(accelerator, error is not None):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        kept = latest_checkpoint(output_dir)
        why = one_line(error) if error is not None else "failed on another process"
        raise CheckpointError(f"cannot write checkpoint {final}: {why}; the previous checkpoint "
                              f"({kept or 'none'}) is kept")
    accelerator.wait_for_everyone()
    return final


def write_own_files(folder, unwrapped, weights, emas, train_state, cfg):
    """What accelerate's ``save_state`` does not write: the UNetModel's keys, the EMAs, the
    training state and the config."""
    save_file(_strip_module(weights), os.path.join(folder, MODEL_FILE))
    for rate, ema in emas.items():
        save_file(ema_state_dict(unwrapped, ema), os.path.join(folder, ema_filename(rate)))
    tensors = {}
    meta = split_state(train_state, "state", tensors)
    if tensors:
        save_file(tensors, os.path.join(folder, STATE_TENSORS_FILE))
    with open(os.path.join(folder, STATE_FILE), "w") as f:
        json.dump(meta, f)
    cfg.save(os.path.join(folder, CONFIG_FILE))


def saved_train_state(path):
    """The ``train_state.json`` of the checkpoint at ``path`` as a dict, for a look before the
    state is loaded; {} where it cannot be read (loading the state reports that in one line)."""
    try:
        with open(os.path.join(path, STATE_FILE)) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def saved_layout(path):
    """The layout (``memory_format``) the checkpoint at ``path`` was trained in, or "auto"
    where it cannot be read (loading the state reports that in one line)."""
    layout = saved_train_state(path).get("memory_format")
    return layout if layout in LAYOUTS else "auto"


def saved_precision(path):
    """The ``mixed_precision`` the checkpoint at ``path`` was trained with (no, fp16 or bf16), or
    None where its config does not say (loading the state reports an unreadable one)."""
    try:
        precision = read_config_mapping(path).get("mixed_precision")
    except CheckpointError:
        return None
    return precision if precision in ("no", "fp16", "bf16") else None


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
    names = [MODEL_FILE, STATE_FILE, CONFIG_FILE, *ACCELERATE_FILES,
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
                                      f"({type(e).__name__}: {one_line(e)})") from None
    return writers


def verify_checkpoint(path: str, log: Callable) -> None:
    """Every file ``path``'s manifest lists, checked against it (size and sha256), before a
    resume reads any; a checkpoint written before manifests is resumed unchecked, and the log
    says so."""
    if not os.path.isfile(os.path.join(path, MANIFEST_FILE)):
        log(f"resume: '{path}' has no {MANIFEST_FILE} (written before manifests): its files are not verified")
        return
    verify_files(path, read_manifest(path))


def load_training_state(accelerator, path: str, model, emas: dict, log: Callable = lambda *a: None) -> dict:
    """Restore a checkpoint saved by ``save_checkpoint`` into prepared objects; returns
    train_state (with ``"rng_writers"``: how many processes saved the checkpoint). The files
    are verified against the manifest, ``train_state.json`` against its schema and the EMA
    files against the model's shapes before anything is loaded."""
    verify_checkpoint(path, log)
    legacy = {k: t for k, t in TRAIN_STATE_SCHEMA.items() if k not in ("num_processes", "memory_format")}
    meta = read_train_state(path, required=legacy if not os.path.isfile(os.path.join(path, MANIFEST_FILE))
                            else None)
    writers = check_training_files(path, accelerator.num_processes, emas, scaler=accelerator.scaler is not None)
    unwrapped = accelerator.unwrap_model(model)
    shapes = {n: p.shape for n, p in unwrapped.named_parameters()}
    try:
        ema_states = {}
        for rate in emas:
            file = os.path.join(path, ema_filename(rate))
            ema_states[rate] = load_file(file)
            check_shapes(shapes, ema_states[rate], file)
        weights_file = os.path.join(path, MODEL_FILE)
        weights = load_file(weights_file)
        check_shapes({k: v.shape for k, v in unwrapped.state_dict().items()}, weights, weights_file)
        tensors_file = os.path.join(path, STATE_TENSORS_FILE)
        tensors = load_file(tensors_file) if os.path.exists(tensors_file) else {}
        state = join_state(meta, tensors)
        # The model file holds unwrapped keys, which a DDP wrapper would not match: let
        # accelerate restore optimizer, scheduler and RNG, then load the weights strictly here.
        accelerator.load_state(path, strict=False)
        unwrapped.load_state_dict(weights)
        for rate, ema in emas.items():
            ema.shadow_params = [ema_states[rate][n].to(p.device) for n, p in zip(shapes, ema.shadow_params)]
    except (OSError, KeyError, RuntimeError, SafetensorError, ValueError, EOFError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"cannot resume from '{path}': {one_line(e)}") from None
    return {**state, "rng_writers": writers}


# --- one owner per run folder ----------------------------------------------------------------

LOCK_FILE = ".lock"


class RunLock:
    """
    An exclusive ``flock`` on ``folder/.lock``, held while a run writes the folder: a second
    run into the same folder is refused with one line instead of both writing it. The kernel
    drops the lock when its process ends, however it ends (SIGKILL included), so a dead run
    never leaves the folder locked. (On NFS, ``flock`` is emulated with POSIX locks since
    Linux 2.6.12 and works across clients with a lock manager; a file system without locks is
    reported, not ignored.)

    :param what: what the folder is, for the message ("output_dir", "the ablation's output folder").
    """

    def __init__(self, folder: str, what: str = "output_dir"):
        self.folder, self.what, self.fd = folder, what, None

    def __enter__(self) -> "RunLock":
        path = os.path.join(self.folder, LOCK_FILE)
        try:
            os.makedirs(self.folder, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"{self.what} '{self.folder}': cannot create {path} ({one_line(e)})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if e.errno in (11, 13):  # EAGAIN/EACCES: held
                raise ConfigError(f"{self.what} '{self.folder}' is in use by {holder}: one run writes a folder at "
                                  "a time (wait for it, stop it, or choose another folder)") from None
            raise ConfigError(f"{self.what} '{self.folder}': cannot lock {path} ({one_line(e)})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {os.uname().nodename}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor releases the lock
            self.fd = None

"""
Starting or continuing a run in its ``output_dir``: which checkpoint it continues (the rules
of ``run_dir.plan_start``), which changed keys that allows (``config_rules.resume_changes``),
tidying the folder before the first step, and restoring a checkpoint's state with the
changed optimizer settings applied.
"""

import os
import warnings

from .checkpoint import load_training_state
from .config import ConfigError, TrainConfig, resume_changes
from .run_dir import CheckpointError, clean_leftovers, plan_start, remove_folder

QUIET_KEYS = ("resume", "output_dir", "overwrite")  # changing these is the point of resuming
OPTIMIZER_KEYS = ("lr", "weight_decay", "warmup_steps")


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
        apply_optimizer_settings(run.optimizer, run.scheduler.scheduler, run.cfg)


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
    The restored optimizer keeps the saved lr and weight decay in its parameter groups, and
    the lr schedule its saved base lr: set this config's, and recompute the current lr
    (base lr x the warm-up factor at the restored step) as a scheduler step would.

    :param scheduler: the torch ``LambdaLR`` (not accelerate's wrapper).
    """
    for group in optimizer.param_groups:
        group["weight_decay"] = cfg.weight_decay
        group["initial_lr"] = cfg.lr
    scheduler.base_lrs = [cfg.lr] * len(scheduler.base_lrs)
    scheduler.last_epoch -= 1
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": no step is taken here
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()

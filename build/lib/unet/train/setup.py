"""
Starting a run: the ``Accelerator`` (processes, mixed precision, CPU threads, the tracker's
prerequisites), the checks that need it, and the optimizer.
"""

import dataclasses
import functools
import math
import os
import shutil
import sys

import torch
from accelerate.state import AcceleratorState, is_initialized
from accelerate.utils import DistributedType
from diffusers.optimization import get_scheduler

from unet.config import ConfigError, check_batch_split
from unet.core.model import apply_layout
from unet.data.streaming import check_source
from unet.utils.devices import cpu_cores, device_accelerator

from .checkpoint import saved_layout, saved_precision
from .tracking import TrackerError, prepare_tracker

SHARDED = (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)


class TrainingError(RuntimeError):
    """A run that cannot start or continue; the message is one line."""


def adamw(params, **kwargs):
    """
    ``torch.optim.AdamW`` with its fused kernel: one pass over each parameter instead of
    one per arithmetic op, ~2.9x faster on CPU for the CIFAR-10 model (docs/performance.md),
    the same update up to float rounding. Falls back to the default where fusing is
    unsupported (other devices, non-float parameters).

    :param params: the parameters (or parameter groups) to optimise.
    :param kwargs: ``AdamW`` arguments (lr, weight_decay, ...).
    """
    params = list(params)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except RuntimeError:
        return torch.optim.AdamW(params, **kwargs)


def make_optimizer(params, cfg):
    """The run's AdamW: ``lr``, ``weight_decay``, ``adam_beta1/2`` and ``adam_eps`` of ``cfg``.

    :param params: the parameters to optimise.
    :param cfg: a ``TrainConfig``.
    """
    return adamw(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.adam_beta1, cfg.adam_beta2),
                 eps=cfg.adam_eps)


def make_lr_schedule(optimizer, cfg):
    """
    The lr schedule: diffusers' ``get_scheduler(cfg.lr_schedule)`` stepped once per optimizer
    step, warming up over ``warmup_steps`` and decaying over ``max_steps`` (the horizon is the
    step count, not ``max_minutes``: a run stopped by the clock ends before its decay does);
    ``inverse_sqrt``, which diffusers lacks, is ``inverse_sqrt_factor`` in a ``LambdaLR``.

    :param optimizer: the optimizer whose lr it sets.
    :param cfg: a ``TrainConfig`` (lr_schedule, warmup_steps, max_steps, lr_cycles, lr_power).
    """
    if cfg.lr_schedule == "inverse_sqrt":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(inverse_sqrt_factor,
                                                                              warmup=cfg.warmup_steps))
    return get_scheduler(cfg.lr_schedule, optimizer, num_warmup_steps=cfg.warmup_steps,
                         num_training_steps=cfg.max_steps, num_cycles=cfg.lr_cycles, power=cfg.lr_power)


# EDM2 (Karras et al. 2024, section 2.2 and its config): lr = lr_ref / sqrt(max(t / t_ref, 1)),
# after a linear warm-up. t_ref is the warm-up length (the factor is then continuous at its
# end), or 10,000 steps without one (transformers' get_inverse_sqrt_schedule does the same).
def inverse_sqrt_factor(step, warmup):
    """The lr multiplier after ``step`` optimizer steps."""
    if step < warmup:
        return step / warmup
    return 1.0 / math.sqrt(max(step / (warmup or 10_000), 1.0))


def set_tf32(cfg, device, log):
    """TF32 for float32 matmuls and convolutions on a CUDA device when ``allow_tf32`` (torch's
    default is off); the choice is logged. Elsewhere there is no TF32 and nothing changes.

    :param device: the run's ``torch.device``.
    :param log: the main process's log.
    """
    if device.type != "cuda":
        if cfg.allow_tf32:
            log(f"allow_tf32: no effect on a {device.type} device")
        return
    precision = "tf32" if cfg.allow_tf32 else "ieee"
    if hasattr(torch.backends.cudnn, "conv") and hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = precision  # torch 2.9's switches
        torch.backends.cudnn.conv.fp32_precision = precision
    else:  # before 2.9: the flags those switches replace
        torch.backends.cuda.matmul.allow_tf32 = cfg.allow_tf32
        torch.backends.cudnn.allow_tf32 = cfg.allow_tf32
    log(f"allow_tf32: {'on' if cfg.allow_tf32 else 'off'} (float32 matmuls and convolutions in {precision})")


def cpu_compiler():
    """The C++ compiler torch.compile's CPU backend (inductor) runs, or None if it is not
    installed: $CXX, else g++ (clang++ on macOS), as inductor's own default list says."""
    return shutil.which(os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++"))


# Where accelerate takes the mixed precision from when the Accelerator is given none: the
# variable `accelerate launch` sets from its --mixed_precision flag or `accelerate config`'s file.
ACCELERATE_PRECISION_VAR = "ACCELERATE_MIXED_PRECISION"


def choose_precision(cfg, resume_path=None):
    """
    The ``mixed_precision`` to hand the ``Accelerator`` (None: accelerate's own choice) and where
    it comes from, for the log: the config (file or command line) when it sets one; else, for a
    resumed run, the checkpoint's (a run keeps its precision; accelerate asking for another one
    is refused, as a config asking for another one is); else accelerate's: what ``accelerate
    launch --mixed_precision`` or ``accelerate config`` set, or its default "no".

    :param resume_path: the checkpoint the run continues, or None.
    """
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision, "set in the config"
    asked = os.environ.get(ACCELERATE_PRECISION_VAR)  # what Accelerator(mixed_precision=None) reads, else "no"
    from_accelerate = (f"from accelerate: {ACCELERATE_PRECISION_VAR}={asked}, which `accelerate launch` sets from "
                       "its --mixed_precision or `accelerate config`")
    if asked and asked.lower() not in ("no", "fp16", "bf16"):
        raise ConfigError(f"mixed_precision: accelerate asks for {asked} ({ACCELERATE_PRECISION_VAR}, from "
                          "`accelerate launch --mixed_precision` or `accelerate config`); this training loop takes "
                          "no, fp16 or bf16: set mixed_precision in the config")
    saved = saved_precision(resume_path) if resume_path else None
    if saved is None:
        return None, from_accelerate if asked else "accelerate's default: neither the config nor accelerate sets it"
    if asked and asked.lower() != saved:
        raise ConfigError(f"mixed_precision: the checkpoint {resume_path} was trained with {saved} and accelerate "
                          f"asks for {asked} ({ACCELERATE_PRECISION_VAR}, from `accelerate launch "
                          f"--mixed_precision` or `accelerate config`); a resumed run keeps its precision: set "
                          f"mixed_precision: {saved} in the config (it wins over accelerate's), or start a new "
                          "output_dir")
    return saved, f"the checkpoint's: {resume_path} was trained with it, and a resumed run keeps it"


def make_accelerator(cfg, resume_path=None):
    """The run's ``Accelerator``, and ``cfg`` with the ``mixed_precision`` it chose
    (``choose_precision``; one log line says which and from where). accelerate fixes the mixed
    precision once per process (its ``AcceleratorState`` is process-wide and has no public
    reset), so a second run in the same process must use the first one's ``mixed_precision``.

    :param resume_path: the checkpoint the run continues, or None.
    """
    try:
        log_with = prepare_tracker(cfg.report_to)
    except TrackerError as e:
        raise TrainingError(str(e)) from None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    precision, source = choose_precision(cfg, resume_path)
    wanted = precision or os.environ.get(ACCELERATE_PRECISION_VAR) or "no"
    if is_initialized() and AcceleratorState().mixed_precision != wanted:
        raise TrainingError(f"mixed_precision={wanted}: this process already trained with "
                            f"mixed_precision={AcceleratorState().mixed_precision}, and accelerate sets it once "
                            "per process; run it in a new process")
    try:
        # The lr schedule is per optimizer step; accelerate's default would step it once per process.
        accelerator = device_accelerator(
            mixed_precision=precision,
            gradient_accumulation_steps=cfg.grad_accum,
            log_with=log_with,
            project_dir=cfg.output_dir,
            step_scheduler_with_optimizer=False,
        )
    except (ValueError, RuntimeError) as e:
        raise TrainingError(f"accelerate could not start (mixed_precision={wanted}): "
                            f"{str(e).strip().splitlines()[0]}") from None
    if accelerator.num_processes != world:
        raise TrainingError(f"{world} processes were launched but accelerate sees {accelerator.num_processes}; "
                            "each would train alone and overwrite the others' files")
    if accelerator.is_main_process:
        print(f"mixed_precision: {accelerator.mixed_precision} ({source})")
    if accelerator.device.type == "cpu":
        # `accelerate launch` sets OMP_NUM_THREADS=1 unless told otherwise, which halves the
        # default run's speed on a 2-core machine; share the cores between the processes.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(cfg.cpu_threads or max(1, cpu_cores() // local))
    return accelerator, dataclasses.replace(cfg, mixed_precision=accelerator.mixed_precision)


def run_layout(cfg, model, resume_path, log):
    """
    Put ``model`` in the layout it trains in (``memory_format``, "auto" by
    ``unet.core.model.resolve_layout``) and return it. A resumed run keeps its checkpoint's
    layout, since another one would round differently and resume would no longer be exact.
    """
    layout = cfg.memory_format
    if layout == "auto" and resume_path:
        layout = saved_layout(resume_path)
    chosen = apply_layout(model, layout, train=True)
    if layout == "auto":
        log(f"memory_format auto: {chosen} for training")
    return chosen


def check_run(cfg, accelerator):
    """What the config cannot know alone (the process count, a compiler): one-line errors
    before any data or model work."""
    try:
        check_batch_split(cfg.batch_size, cfg.grad_accum, accelerator.num_processes)
    except ConfigError as e:
        raise TrainingError(str(e)) from None
    sharded = accelerator.distributed_type.value if accelerator.distributed_type in SHARDED else None
    if sharded:
        # EMA shadows, checkpoint files and the weight checks assume every process holds the
        # whole model: refused rather than half-supported.
        raise TrainingError(f"accelerate is configured for {sharded}, which this training loop does not support "
                            "(EMA and checkpoints need whole weights on every process); use DDP (--multi_gpu)")
    check_output_dir(cfg.output_dir, accelerator.process_index)
    check_source(cfg)  # a ConfigError: exit status 2
    if cfg.compile and accelerator.device.type == "cpu" and not cpu_compiler():
        raise TrainingError("compile: true on a CPU needs a C++ compiler for torch.compile (none found: "
                            "install g++ or set CXX, or set compile false)")


def check_output_dir(output_dir, rank):
    """``output_dir`` exists or can be made, and this process can write in it (a file is
    written and removed): one line now rather than a traceback at the first checkpoint."""
    probe = os.path.join(output_dir, f".write-test-{rank}")
    try:
        os.makedirs(output_dir, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise TrainingError(f"output_dir '{output_dir}' is not writable: {e.strerror or e}") from None

"""Which device a command runs on (one rule for training, sampling and evaluation), and the
one cross-process agreement every branch that all processes must take together uses."""

import os

import torch
from accelerate import Accelerator


def uses_cpu():
    """Whether this machine has no accelerator torch can use (CUDA, MPS, XPU, ...). On such a
    machine `accelerate launch --multi_gpu --num_processes N` starts N processes that accelerate
    1.15 runs as N separate single-process runs unless told to use the CPU, so every Accelerator
    here asks for the CPU explicitly then (gloo DDP across the processes)."""
    return not torch.accelerator.is_available()


def device_accelerator(**kwargs) -> Accelerator:
    """An ``Accelerator`` on this machine's accelerator, else on the CPU (``uses_cpu``).

    :param kwargs: further ``Accelerator`` arguments (mixed precision, trackers, ...).
    """
    return Accelerator(cpu=uses_cpu(), **kwargs)


def any_process(accelerator: Accelerator, flag: "bool | torch.Tensor") -> bool:
    """True on every process if ``flag`` (a bool or a one-element bool tensor) is true on any:
    every process must take the same branch (skip a step, stop, give up a save), or the next
    collective operation would hang."""
    flag = torch.as_tensor(flag, device=accelerator.device).float().reshape(1)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, "sum")
    return bool(flag.item() > 0)


def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

"""What a timing belongs to: the machine's CPU name, for the benchmarks' records. Nothing here
imports torch (the GPU run's driver must not)."""

import platform


def cpu_name():
    """The CPU's model name (Linux ``/proc/cpuinfo``), else the architecture."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()

"""
Preemption: SIGTERM and SIGUSR1 (what a cluster scheduler such as SLURM sends before a job's
time limit or when it preempts it) ask a training run to stop after its current step, write
a checkpoint on every process and exit with ``PREEMPTED_EXIT``; ``resume: auto`` then
continues it when the job is requeued. While a run holds ``StopSignals``, the signals only
set a flag, so a second one during that save is recorded and changes nothing.
"""

import signal
import threading

# EX_TEMPFAIL of sysexits.h: "a temporary failure; the user is invited to retry".
PREEMPTED_EXIT = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    """
    A context manager that turns ``STOP_SIGNALS`` into a request to stop: ``received`` is the
    first signal's name (e.g. "SIGTERM"), None until one arrives; ``count`` how many came.
    With ``install=False``, or outside the main thread (where Python cannot install
    handlers), it installs nothing and ``received`` stays None.
    """

    def __init__(self, install=True):
        self.install, self.received, self.count, self.previous = install, None, 0, {}

    def handle(self, signum, frame):
        self.received = self.received or signal.Signals(signum).name
        self.count += 1

    def __enter__(self):
        if self.install and threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self.handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        return False

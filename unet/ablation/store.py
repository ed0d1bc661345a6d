"""
The ablation's files and processes: one folder per run whose ``result.json`` appears whole
or not at all, the check that a saved run was made with the same config (so a changed grid
is refused rather than mixed in), which process does which runs, and the progress line.
"""

import json
import os
import shutil
import subprocess
import time

from unet.config import ConfigError
from unet.utils.jsonfile import clean_json


def claim_process():
    """This process's (rank, world size). Under ``accelerate launch``/torchrun each process
    runs whole runs of its own, so the launcher's distributed variables are removed (each
    run's Accelerator is then a single-process one) and the process keeps to one GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    os.environ["CUDA_VISIBLE_DEVICES"] = visible[local % len(visible)] if visible else str(local)
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
              "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(k, None)
    return rank, world


def load_result(cfg):
    """The saved result of a finished run with this config, or None if there is none yet."""
    path = os.path.join(cfg.output_dir, "result.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            res = json.load(f)
    except (OSError, ValueError):
        return None  # a damaged result: the run is done again
    if not isinstance(res, dict) or not isinstance(res.get("config", {}), dict):
        raise ConfigError(f"'{path}' is not a run's result (a JSON {type(res).__name__} where an object with a "
                          "'config' mapping belongs); delete it to run that cell again")
    saved = res.get("config", {})
    # Keys the saved run does not have were added to TrainConfig after it ran, with defaults
    # that keep the old behaviour (the ablation's divergence window reproduces its old rule).
    # cpu_threads: a run split over processes shares the cores; threads change float summation order only.
    ignore = ("group", "tags", "progress", "report_to", "project", "cpu_threads")
    same = {k: v for k, v in saved.items() if k not in ignore} == \
        {k: v for k, v in clean_json(cfg.to_dict()).items() if k not in ignore and k in saved}
    if not same:
        raise ConfigError(f"'{path}' holds a run with a different config; use a new --output_dir "
                          f"(or delete that folder) to run this grid")
    return res


def fresh_run_dir(cfg):
    """An empty output folder for a run about to start."""
    if os.path.isdir(cfg.output_dir):
        shutil.rmtree(cfg.output_dir)  # an interrupted run starts over; finished ones are kept


CLAIMS_ENV = "UNET_ABLATION_CLAIMS"


def spawn_workers(processes: int, cmd: list[str], out_dir: str) -> "list[subprocess.Popen]":
    """``processes - 1`` more processes running the command line ``cmd`` (ranks 1..;
    this one becomes rank 0), unless a launcher already started several. They take runs
    from one queue (``claim_run``), so cheap diverging runs do not unbalance the split.
    :return: the worker ``Popen``s."""
    if processes <= 1 or "WORLD_SIZE" in os.environ:
        return []
    claims = os.path.join(out_dir, "claims", f"{os.getpid()}-{time.time_ns()}")  # this invocation's queue
    os.makedirs(claims)
    os.environ.update({"WORLD_SIZE": str(processes), "RANK": "0", CLAIMS_ENV: claims})
    return [subprocess.Popen(cmd, env={**os.environ, "RANK": str(r)}) for r in range(1, processes)]


def owns_run(index, run_id, rank, world):
    """Whether this process trains run ``index``: the first to claim it in the shared queue
    (processes started by ``spawn_workers``), else every ``world``-th run (a launcher's)."""
    claims = os.environ.get(CLAIMS_ENV)
    if not claims:
        return index % world == rank
    try:
        os.close(os.open(os.path.join(claims, run_id), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def drop_claims() -> None:
    """Remove this invocation's claim files once every run is done."""
    claims = os.environ.pop(CLAIMS_ENV, None)
    if claims:
        shutil.rmtree(os.path.dirname(claims), ignore_errors=True)


def finished_runs(runs):
    """How many of ``runs`` (RunSpecs) have a saved result, by any process."""
    return sum(os.path.isfile(os.path.join(s.cfg.output_dir, "result.json")) for s in runs)


def _duration(seconds):
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def progress_words(done, total, started_with, elapsed):
    """'runs 12/90, 1m40s elapsed, about 10m50s left': the time left extrapolates this
    invocation's pace (runs finished by any process since it started) to the runs still to do."""
    text = f"runs {done}/{total}, {_duration(elapsed)} elapsed"
    if done > started_with and done < total:
        text += f", about {_duration(elapsed / (done - started_with) * (total - done))} left"
    return text

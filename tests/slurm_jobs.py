"""Helpers of tests/test_slurm.py: submit the batch scripts of scripts/slurm/ to a (local) SLURM
cluster, drive the jobs from a background thread (signals at chosen checkpoints, early release of
requeued jobs), and read back what a job's own log says about each of its runs."""

import glob
import os
import re
import shutil
import subprocess
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts", "slurm")
STATE = os.environ.get("UNET_SLURM_STATE", "/var/lib/unet-local-slurm")
RELEASE_AFTER = 3  # seconds a requeued job stays held before the driver lets it start
DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
        "PREEMPTED")
# A few seconds' runs: 8x8 digits, a one-block U-Net, 20 diffusion steps, one thread.
TINY = ("--batch_size 8 --num_res_blocks 1 --diffusion_steps 20 --report_to none --progress false "
        "--keep_checkpoints 2 --diagnostics_every 0 --eval_every 0 --sample_every -1 --warmup_steps 2 "
        "--cpu_threads 1 --dropout 0.1")


def slurm_env(**extra):
    """This process's environment for sbatch (which hands it on to the job), pointed at the
    local cluster's slurm.conf unless SLURM_CONF already names one, without a wandb key."""
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_MODE")}
    if "SLURM_CONF" not in env and os.path.exists(os.path.join(STATE, "slurm.conf")):
        env["SLURM_CONF"] = os.path.join(STATE, "slurm.conf")
    env.update(OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline", **extra)
    return env


def slurm(*cmd, check=True):
    r = subprocess.run(cmd, env=slurm_env(), capture_output=True, text=True, timeout=60)
    if check and r.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip()}")
    return r.stdout


def cluster_problem():
    """None when a cluster answers with a usable node, else one line saying what is missing."""
    if shutil.which("sbatch") is None:
        return "sbatch not found: start a cluster with `bash scripts/slurm/local_cluster.sh up`"
    try:
        states = slurm("sinfo", "-h", "-o", "%t").split()
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        return f"no SLURM cluster answers ({e}); run `bash scripts/slurm/local_cluster.sh up`"
    if not any(s.rstrip("*~#") in ("idle", "mix", "alloc") for s in states):
        return f"no usable SLURM node (states: {states}); run `bash scripts/slurm/local_cluster.sh up`"
    return None


class Job:
    """One submitted batch job: its id, folder (log ``job.out``, run in ``out/``) and the
    interruptions the driver sends: [(checkpoint step reached, command)], one per run."""

    def __init__(self, name, folder, script, train_args, sbatch_args=(), interruptions=(), **env):
        self.name, self.folder, self.interruptions, self.ended = name, str(folder), list(interruptions), False
        self.out, self.log = os.path.join(self.folder, "out"), os.path.join(self.folder, "job.out")
        os.makedirs(self.folder, exist_ok=True)
        env = slurm_env(UNET_CPU="1", UNET_REPO=ROOT, UNET_OUTPUT_DIR=self.out, UNET_TRAIN_ARGS=train_args,
                        **env)
        r = subprocess.run(["sbatch", "--parsable", f"--job-name={name}", f"--output={self.log}", *sbatch_args,
                            os.path.join(SCRIPTS, script)], env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        self.id = r.stdout.strip().split(";")[0]

    def info(self):
        """``scontrol show job``'s fields (JobState, Restarts, ExitCode, Reason, ...)."""
        line = slurm("scontrol", "show", "job", "-o", self.id)
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def text(self):
        with open(self.log) as f:
            return f.read()

    def checkpoint_step(self):
        steps = [int(p.rsplit("_", 1)[1]) for p in glob.glob(os.path.join(self.out, "checkpoints", "checkpoint_*"))]
        return max(steps, default=0)

    def wait(self, timeout):
        """Wait until the job has ended for good; returns ``info()``."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.info()
            if info["JobState"] in DONE:
                return info
            time.sleep(1)
        raise AssertionError(f"job {self.name} ({self.id}) still {self.info()['JobState']} after {timeout} s:\n"
                             + self.text()[-3000:])


class Driver(threading.Thread):
    """Every half second: sends each job the interruption of its current run once that run has
    written the checkpoint it waits for, and lets a requeued job start again a few seconds after
    its requeue rather than after SLURM's hold (``scontrol update JobId=N StartTime=now``). ``released`` lists
    (job name, time) of each release."""

    def __init__(self, jobs):
        super().__init__(daemon=True)
        self.jobs, self.stopped, self.released, self.errors, self.held = jobs, threading.Event(), [], [], {}

    def step(self):
        for job in self.jobs:
            if job.ended:
                continue
            info = job.info()
            job.ended = info["JobState"] in DONE
            run = int(info["Restarts"])
            if info["JobState"] == "PENDING" and info["Reason"] == "BeginTime":
                # Released within the second of its requeue, a job can fail to start ("Job
                # credential revoked": slurmd compares whole seconds): wait a little first.
                held = self.held.setdefault((job.id, run), time.time())
                if time.time() - held >= RELEASE_AFTER:
                    slurm("scontrol", "update", f"JobId={job.id}", "StartTime=now")
                    self.released.append((job.name, time.time()))
            elif info["JobState"] == "RUNNING" and run < len(job.interruptions):
                at, cmd = job.interruptions[run]
                if at is not None and job.checkpoint_step() >= at:
                    slurm(*cmd, job.id)
                    job.interruptions[run] = (None, cmd)  # sent once per run

    def run(self):
        while not self.stopped.wait(0.5):
            try:
                self.step()
            except Exception as e:  # reported by the tests; the thread goes on
                self.errors.append(repr(e))


START = re.compile(r"^\[sbatch ([\d.]+) job \d+ restart (\d+)\] starting")
EVENT = re.compile(r"^\[sbatch ([\d.]+) job \d+ restart \d+\] (got SIG(\w+);|stopped by SIG\w+ \(status (\d+)\); "
                   r"(requeueing|requeued by SLURM|.*not requeueing)|exit (\d+))")
STOPPED = re.compile(r"^(?:(\d+): )?stopped by SIG(\w+) at step (\d+); checkpoint: (\S+);")
RESUMED = re.compile(r"^(?:(\d+): )?resumed from \S+ at step (\d+)$")
# torchrun's own warning when it handles a signal (rather than being killed by it).
FORWARDED = re.compile(r"^(?:(\d+): )?.*Received \S+ death signal, shutting down workers")


def runs(text):
    """A job log (every run appends to it) as one dict per run, in order: ``start`` (time),
    ``signals`` [(time, name)] the batch shell trapped, ``stopped`` [(task, signal, step)] as
    each training process reported it (task 0 without srun's labels), ``forwarded`` [task] for
    each launcher that passed a signal on, ``resumed`` {task: step}, and how the run ended:
    ``requeued`` (time, status, "requeueing" or "requeued by SLURM"), ``not_requeued`` (the
    script's reason) and/or ``exit`` status."""
    out = []
    for line in text.splitlines():
        m = START.match(line)
        if m:
            out.append(dict(start=float(m[1]), restart=int(m[2]), signals=[], stopped=[], forwarded=[], resumed={},
                            requeued=None, not_requeued=None, exit=None))
            continue
        if not out:
            continue
        run = out[-1]
        if m := EVENT.match(line):
            if m[3]:
                run["signals"].append((float(m[1]), m[3]))
            elif m[4] and m[5].endswith("not requeueing"):
                run["not_requeued"] = m[5]
            elif m[4]:
                run["requeued"] = (float(m[1]), int(m[4]), m[5])
            else:
                run["exit"] = int(m[6])
        elif m := STOPPED.match(line):
            run["stopped"].append((int(m[1] or 0), m[2], int(m[3])))
        elif m := RESUMED.match(line):
            run["resumed"][int(m[1] or 0)] = int(m[2])
        elif m := FORWARDED.match(line):
            run["forwarded"].append(int(m[1] or 0))
    return out

"""
The GPU run: every speed figure a CUDA machine can give this package, in one command and one
JSON file.

    bash benchmarks/gpu.sh --out gpu.json                 # on a CUDA machine (~8 minutes)
    bash benchmarks/gpu.sh --device cpu --out dry.json    # the same parts, tiny, on a CPU

Parts, run in this order, each as its own subprocess (a part that fails or runs out of time
is recorded with its command, exit status and the tail of its output, and the next part runs):

1. ``bench/<preset>/eager``: ``benchmarks/bench.py --preset P --dtype bf16`` for each preset
   (ours against diffusers' ``UNet2DModel``).
2. ``train``: a training run of ``configs/cifar10.yaml`` (500 steps on CUDA) through
   ``accelerate launch``; steps/s and images/s over the steps after a warm-up, and the peak
   memory of the process.
3. ``ddp``: the same config for a few steps on 2 processes (``accelerate launch --multi_gpu
   --num_processes 2``); checks that both ranks saw 2 processes, logged the same losses and
   ended with the same weights. Skipped, with the reason, on fewer than 2 GPUs; on CPU it runs
   over gloo, as ``tests/test_training.py``'s two-process test does.
4. ``bench/<preset>/compile``: the same benchmarks under ``torch.compile`` (last: compiling
   costs minutes, and a time budget may cut them).

The machine has no network: training reads a folder of synthetic 32x32 RGB PNG files written
here (``dataset: imagefolder``), and the JSON says so. Throughput does not depend on what the
pixels show; the files are decoded like CIFAR-10's PNGs.

Training runs go through ``train-worker`` below: ``unet.train.loop.train`` exactly as
``train.py`` calls it, plus a hook that times every optimizer step (after a CUDA synchronize)
and, at the end, the peak memory and a checksum of the weights. The driver itself never
imports torch (``machine-info`` runs in a subprocess), so it holds no GPU memory.
Exit status: 0 every part ok or skipped, 1 a part failed, 2 bad arguments or no CUDA device.
"""

import argparse
import json
import math
import os
import platform
import random
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR10 = os.path.join("configs", "cifar10.yaml")
SCHEMA = "unet-gpu-run/1"
MODES = ("eager", "compile")
PARTS = ("bench", "train", "ddp")

# Per device: what runs and how long it may take. CUDA sizes fit an ~8 minute window:
# eager benchmarks ~30 s per preset, 500 training steps ~1-3 min, then compiled benchmarks
# as far as the budget goes.
DEFAULTS = {
    # Benchmarks at the paper's CIFAR-10 batch (128): the presets' CPU batches (8 to 64) leave
    # a large GPU waiting on kernel launches.
    "cuda": dict(presets="digits,cifar-small,cifar10", modes="eager,compile", dtype="bf16", repeats=10,
                 bench_steps=5, bench_warmup=3, bench_batch_size=128, train_steps=500, timed_from=50,
                 ddp_steps=20, images=1024, budget_s=480, bench_timeout_s=150, compile_timeout_s=240,
                 train_timeout_s=300, ddp_timeout_s=180),
    # fp32: bench.py times 2048x2048 matmuls in --dtype for its peak, and a bf16 one takes ~60 s
    # on a CPU without AVX512-BF16 (measured on an AMD EPYC; fp32: 0.14 s).
    "cpu": dict(presets="tiny", modes="eager", dtype="fp32", repeats=2, bench_steps=1, bench_warmup=1,
                bench_batch_size=0, train_steps=6, timed_from=2, ddp_steps=3, images=48, budget_s=600,
                bench_timeout_s=180, compile_timeout_s=600, train_timeout_s=180, ddp_timeout_s=240),
}
# The dry run trains a small model on the same 32x32 data (the CIFAR-10 model is ~1 s a step here).
CPU_MODEL = ["--model_channels", "32", "--num_res_blocks", "1", "--channel_mult", "1,2",
             "--attention_resolutions", "16", "--dropout", "0.1", "--diffusion_steps", "100",
             "--batch_size", "8", "--num_workers", "0"]


# --- arguments ---------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line on stderr and exit status 2, no usage block."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser():
    p = _Parser(
        prog="benchmarks/gpu.sh",
        allow_abbrev=False,
        description="Benchmarks, a DDP smoke test and a CIFAR-10-config training run; "
        "one JSON. Unset options take the --device's defaults (see docs/gpu.md).",
    )
    p.add_argument("--out", required=True, help="the JSON file to write (its logs go to OUT.logs/)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a tiny dry run")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of: " + ", ".join(PARTS))
    p.add_argument("--presets", help="bench.py presets, comma-separated")
    p.add_argument("--modes", help="comma-separated subset of: eager, compile (torch.compile)")
    p.add_argument("--dtype", help="bench.py --dtype (autocast)")
    p.add_argument("--repeats", type=int, help="bench.py --repeats")
    p.add_argument("--bench_steps", type=int, help="bench.py --steps (steps per model per repeat)")
    p.add_argument("--bench_warmup", type=int, help="bench.py --warmup")
    p.add_argument("--bench_batch_size", type=int, help="bench.py --batch_size (0: the preset's; CUDA default 128)")
    p.add_argument("--train_steps", type=int, help="steps of the training run")
    p.add_argument("--timed_from", type=int, help="throughput is timed from this step to the last")
    p.add_argument("--ddp_steps", type=int, help="steps of the 2-process run")
    p.add_argument("--images", type=int, help="synthetic training images to write")
    p.add_argument("--train_extra", default="", help="extra train.py flags for the training run, "
                   "given with '=': --train_extra='--mixed_precision bf16'")
    p.add_argument("--ddp_extra", default="", help="extra train.py flags for the 2-process run (as --train_extra)")
    p.add_argument("--budget_s", type=float, help="total seconds; parts that would start later are skipped")
    for part in ("bench", "compile", "train", "ddp"):
        p.add_argument(f"--{part}_timeout_s", type=float, help=f"seconds one {part} subprocess may run")
    p.add_argument("--work_dir", default="", help="data and checkpoints (default: a temporary folder, removed)")
    return p


def parse_args(argv):
    p = build_parser()
    args = p.parse_args(argv)
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.parts, args.modes = _names(p, args.parts, PARTS, "--parts"), _names(p, args.modes, MODES, "--modes")
    args.presets = [s for s in args.presets.split(",") if s]  # bench.py owns the list and refuses a bad name
    for key, least in (("repeats", 1), ("bench_steps", 1), ("bench_warmup", 0), ("bench_batch_size", 0),
                       ("train_steps", 2), ("ddp_steps", 2), ("images", 1)):
        if getattr(args, key) < least:
            p.error(f"--{key} must be at least {least}")
    if not 0 <= args.timed_from < args.train_steps - 1:
        p.error(f"--timed_from must be in [0, --train_steps - 1); got {args.timed_from} with {args.train_steps} steps")
    args.ddp_timed_from = min(args.timed_from, args.ddp_steps // 4)  # timed after step k (0: after the first)
    for key in ("train_extra", "ddp_extra"):
        try:
            setattr(args, key, shlex.split(getattr(args, key)))
        except ValueError as e:
            p.error(f"--{key}: {e}")
    return args


def _names(parser, text, allowed, flag):
    names = [s for s in text.split(",") if s]
    bad = [n for n in names if n not in allowed]
    if bad:
        parser.error(f"{flag}: unknown {', '.join(bad)} (choose from {', '.join(allowed)})")
    return names


# --- running one part ----------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra):
    """Offline (the GPU machine has no network), this checkout importable, no wandb key."""
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY",)}
    path = env.get("PYTHONPATH", "")
    env.update(PYTHONPATH=ROOT + (os.pathsep + path if path else ""), HF_DATASETS_OFFLINE="1",
               HF_HUB_OFFLINE="1", WANDB_MODE="offline", **extra)
    return env


def tail(path, n=12000):
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return ""


def run_command(cmd, timeout, log_path, env=None):
    """Run ``cmd`` in its own process group, output to ``log_path``; on timeout, or when this
    driver is stopped, the whole group (accelerate's children too) is stopped.
    Returns (returncode or None, seconds, timed_out)."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env or child_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            return proc.wait(timeout=timeout), time.perf_counter() - start, False
        except subprocess.TimeoutExpired:
            return None, time.perf_counter() - start, True
        finally:
            stop_group(proc)


def stop_group(proc):
    """SIGTERM to the process group, SIGKILL after 10 s, and SIGKILL to any straggler."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


class Stopped(Exception):
    """The driver got SIGTERM or SIGINT (e.g. the machine's time limit)."""


def _stop(signum, frame):
    raise Stopped(signal.Signals(signum).name)


class Runner:
    """Runs the parts in order under one time budget and rewrites the JSON after each."""

    def __init__(self, args, report, start):
        self.args, self.report, self.start = args, report, start
        self.logs = args.out + ".logs"
        os.makedirs(self.logs, exist_ok=True)

    def remaining(self):
        return self.args.budget_s - (time.monotonic() - self.start)

    def skip(self, name, reason):
        self.record(name, dict(status="skipped", reason=reason))

    def record(self, name, entry):
        self.report["parts"][name] = dict(name=name, **entry)
        print(f"[gpu_run] {name}: {entry['status']}" + (f" ({entry['reason']})" if entry.get("reason") else ""),
              flush=True)
        write_json(self.args.out, self.report)

    def run(self, name, cmd, timeout, read_result, env=None):
        """One part: its command under min(timeout, what is left of the budget); ``read_result``
        turns the finished command into (result dict, failure reason or None)."""
        left = self.remaining()
        if left < 5:
            return self.skip(name, f"time budget spent ({self.args.budget_s:g} s, --budget_s)")
        limit = min(timeout, left)
        log_path = os.path.join(self.logs, name.replace("/", "_") + ".log")
        print(f"[gpu_run] {name}: {shlex.join(cmd)}", flush=True)
        rc, seconds, timed_out = run_command(cmd, limit, log_path, env)
        entry = dict(command=cmd, command_line=shlex.join(cmd), returncode=rc, seconds=seconds,
                     timeout_s=limit, log=os.path.relpath(log_path, os.path.dirname(os.path.abspath(self.args.out))))
        if timed_out:
            entry.update(status="failed", reason=f"timed out after {limit:.0f} s")
        elif rc != 0:
            entry.update(status="failed", reason=f"exit status {rc}: " + last_line(tail(log_path)))
        else:
            try:
                result, problem = read_result()
            except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
                result, problem = None, f"its result could not be read: {type(e).__name__}: {e}"
            entry.update(result=result, status="failed" if problem else "ok", reason=problem)
        if entry["status"] == "failed":
            entry["output_tail"] = tail(log_path)
        self.record(name, entry)


def last_line(text):
    """The one line that says why a command failed: its last 'error: ...' line (what this
    package's tools print; accelerate adds a traceback after it), else its last line."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:") or ": error: " in ln]
    return (errors or lines or ["(no output)"])[-1][:300]


def write_json(path, report):
    from unet.utils.jsonfile import write_json as write_whole  # torch-free

    write_whole(path, report, indent=1, allow_nan=True)


# --- the parts -------------------------------------------------------------------------------

def bench_part(runner, preset, mode):
    a = runner.args
    out = os.path.join(runner.logs, f"bench_{preset}_{mode}.json")
    cmd = [sys.executable, "benchmarks/bench.py", "--preset", preset, "--device", a.device, "--dtype", a.dtype,
           "--repeats", str(a.repeats), "--steps", str(a.bench_steps), "--warmup", str(a.bench_warmup),
           "--json", out]
    if a.bench_batch_size:
        cmd += ["--batch_size", str(a.bench_batch_size)]
    if a.device == "cpu":
        cmd.append("--no_memory")  # a fresh process per model: seconds a dry run does not need
    if mode == "compile":
        cmd.append("--compile")

    def read():
        with open(out) as f:
            full = json.load(f)
        summary = bench_summary(full)
        return dict(summary=summary, full=full), nonpositive(summary)

    timeout = a.compile_timeout_s if mode == "compile" else a.bench_timeout_s
    runner.run(f"bench/{preset}/{mode}", cmd, timeout, read)


def bench_summary(full):
    """The figures a reader wants from one bench.py JSON."""
    s = dict(preset=full["preset"], dtype=full["dtype"], compile=full["compile"], device_name=full["device_name"],
             batch_size=full["config"]["batch_size"], params=full["params"]["ours"])
    for kind in ("train", "sample"):
        r = full[kind]
        s[kind] = dict(images_per_second=r["images_per_second"], paired_ratio_geomean=r["paired_ratio_geomean"],
                       paired_ratio_ci95=list(r["paired_ratio_ci95"]), ratio_of_medians=r["ratio"],
                       fraction_of_matmul_peak=r["fraction_of_matmul_peak"])
    if "peak_train_memory_bytes" in full:
        s["peak_train_memory_bytes"] = full["peak_train_memory_bytes"]
    return s


def nonpositive(tree, path=""):
    """A reason if any number in ``tree`` is not finite or not positive, else None."""
    if isinstance(tree, dict):
        return next((r for k, v in tree.items() if (r := nonpositive(v, f"{path}.{k}".lstrip(".")))), None)
    if isinstance(tree, (list, tuple)):
        return next((r for i, v in enumerate(tree) if (r := nonpositive(v, f"{path}[{i}]"))), None)
    if isinstance(tree, (int, float)) and not isinstance(tree, bool) and not (math.isfinite(tree) and tree > 0):
        return f"{path} is {tree}"
    return None


def launch(processes, port):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if processes > 1:
        cmd += ["--multi_gpu", "--main_process_port", str(port)]
    return cmd


def train_args(args, output_dir, steps, extra):
    """train.py flags: configs/cifar10.yaml on the synthetic folder, nothing but training steps
    (no eval, samples, diagnostics or tracker; one checkpoint at the end), always from step 0
    (the config resumes by default; a reused --work_dir must not turn a timing into a no-op)."""
    flags = ["--config", CIFAR10, "--dataset", "imagefolder", "--data_dir", args.data_dir,
             "--output_dir", output_dir, "--resume", "", "--overwrite", "true", "--max_steps", str(steps),
             "--eval_every", "0", "--sample_every", "-1",
             "--diagnostics_every", "0", "--checkpoint_every", "0", "--keep_checkpoints", "1", "--report_to", "none",
             "--progress", "false", "--log_every", str(max(1, min(100, steps)))]
    return flags + (CPU_MODEL if args.device == "cpu" else []) + list(extra)


def train_part(runner, name, processes, steps, timed_from, extra, timeout, env=None):
    a = runner.args
    out_dir = os.path.join(a.work_dir, name)
    result_file = os.path.join(out_dir + "-result", "rank{rank}.json")
    os.makedirs(os.path.dirname(result_file), exist_ok=True)
    cmd = launch(processes, free_port()) + [
        os.path.join("benchmarks", "gpu_run.py"), "train-worker", "--result_file", result_file,
        "--timed_from", str(timed_from)] + train_args(a, out_dir, steps, extra)

    def read():
        ranks = []
        for i in range(processes):
            with open(result_file.format(rank=i)) as f:
                ranks.append(json.load(f))
        return check_ranks(ranks, processes, steps)

    runner.run(name, cmd, timeout, read, env)


def check_ranks(ranks, processes, steps):
    """The training result (rank 0's, with every rank's memory) and a failure reason if the run
    did not do what was asked: the world size, every step, finite losses, and across ranks the
    same logged losses and the same final weights."""
    r0 = ranks[0]
    result = {k: v for k, v in r0.items() if k != "losses"}
    result.update(first_loss=r0["losses"][0], final_loss=r0["losses"][-1], losses=r0["losses"],
                  peak_memory_bytes_per_rank=[r["peak_memory_bytes"] for r in ranks])
    problems = []
    if any(r["world_size"] != processes for r in ranks):
        problems.append(f"world sizes {[r['world_size'] for r in ranks]}, expected {processes}")
    if r0["steps"] != steps:
        problems.append(f"{r0['steps']} steps ran, expected {steps}")
    if not all(math.isfinite(x) for x in r0["losses"]):
        problems.append("a non-finite loss")
    if processes > 1:
        same_losses = all(r["losses"] == r0["losses"] for r in ranks)
        same_weights = all(r["weights_checksum"] == r0["weights_checksum"] for r in ranks)
        result["checks"] = dict(same_losses_on_every_rank=same_losses, same_weights_on_every_rank=same_weights)
        if not (same_losses and same_weights):
            problems.append(f"ranks disagree: {result['checks']}")
    numbers = {k: result[k] for k in ("steps_per_second", "images_per_second", "peak_memory_bytes")}
    problem = "; ".join(problems) or nonpositive(numbers)
    return result, problem


# --- the synthetic data and the machine ------------------------------------------------------

def write_images(folder, n, size=32, seed=0):
    """``n`` random RGB PNG files of ``size`` x ``size`` pixels (the format CIFAR-10's hub copy
    stores). Smooth random gradients plus noise, so they compress like photographs, not like
    pure noise or flat colour."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = random.Random(seed)
    for i in range(n):
        base = [rng.randrange(256) for _ in range(6)]
        px = bytearray()
        for y in range(size):
            for x in range(size):
                for c in range(3):
                    v = base[c] + (base[c + 3] - base[c]) * (x + y) / (2 * size - 2) + rng.gauss(0, 12)
                    px.append(max(0, min(255, int(v))))
        Image.frombytes("RGB", (size, size), bytes(px)).save(os.path.join(folder, f"{i:05d}.png"))
    return dict(synthetic=True, images=n, size=size, channels=3, format="PNG", folder=folder, seed=seed,
                note="synthetic 32x32 RGB images (random gradients plus noise), written offline because the "
                     "machine has no network; throughput does not depend on image content")


def machine_info_child():
    """Printed as JSON by ``gpu_run.py machine-info`` (a subprocess: the driver never imports torch)."""
    import importlib.metadata as md

    import torch

    info = dict(
        torch=torch.__version__,
        cuda_runtime=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        cuda_available=torch.cuda.is_available(),
        gpu_count=torch.cuda.device_count(),
        threads=torch.get_num_threads(),
    )
    info["gpus"] = [dict(name=p.name, total_memory_bytes=p.total_memory, capability=f"{p.major}.{p.minor}",
                         multiprocessors=p.multi_processor_count)
                    for p in (torch.cuda.get_device_properties(i) for i in range(info["gpu_count"]))]
    info["gpu_name"] = info["gpus"][0]["name"] if info["gpus"] else None
    for pkg in ("accelerate", "diffusers", "datasets", "numpy"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = None
    print(json.dumps(info))


def machine_info():
    from benchmarks.machine import cpu_name  # torch-free, like everything this driver imports itself

    info = dict(python=platform.python_version(), platform=platform.platform(), cpu=cpu_name(),
                cpu_count=os.cpu_count())
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "machine-info"], cwd=ROOT, env=child_env(),
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        info["error"] = "torch could not be inspected: " + last_line(r.stderr)
    else:
        info.update(json.loads(r.stdout.strip().splitlines()[-1]))
    smi = shutil.which("nvidia-smi")
    if smi:
        q = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=60)
        info["nvidia_smi"] = q.stdout.strip().splitlines() if q.returncode == 0 else None
    info["git"] = git_state()
    return info



def git_state():
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=30)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return dict(commit=head.stdout.strip(), modified_tracked_files=bool(dirty.stdout.strip()))


# --- the training worker (run by accelerate launch) -------------------------------------------

def train_worker(argv):
    """``unet.train.loop.train`` as ``train.py`` runs it, timed: every rank writes its step times,
    losses, peak memory and a weights checksum to ``--result_file`` ('{rank}' filled in)."""
    p = argparse.ArgumentParser(prog="gpu_run.py train-worker")
    p.add_argument("--result_file", required=True)
    p.add_argument("--timed_from", type=int, default=0)
    own, rest = p.parse_known_args(argv)
    from unet.config import ConfigError, load_config

    try:
        cfg = load_config(rest)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from accelerate import PartialState

    from benchmarks.layout import wait_for
    from unet.train.loop import train

    stamps, weights = [], {}

    def hook(step, row, model):
        wait_for(next(model.parameters()).device)  # the step's kernels, not only their launch
        stamps.append((step, time.perf_counter(), row["loss"]))
        if step == cfg.max_steps:
            weights["checksum"] = sum(float(t.detach().double().sum()) for t in model.state_dict().values())
            weights["params"] = sum(t.numel() for t in model.parameters())

    started = time.perf_counter()
    summary = train(cfg, hooks=[hook])
    state = PartialState()
    result = worker_result(cfg, stamps, started, own.timed_from, state, summary, weights)
    write_json(own.result_file.format(rank=state.process_index), result)
    return 0 if summary["stop_reason"] == "max_steps" else 3


def worker_result(cfg, stamps, started, timed_from, state, summary, weights):
    import torch
    from accelerate.state import AcceleratorState

    timed = [s for s in stamps if s[0] >= timed_from]  # hook stamps are taken after steps 1..N
    seconds = timed[-1][1] - timed[0][1]
    steps = len(timed) - 1
    per_step = [b[1] - a[1] for a, b in zip(timed, timed[1:])]
    cuda = state.device.type == "cuda"
    result = dict(steps=len(stamps), stop_reason=summary["stop_reason"], world_size=state.num_processes,
                  device=str(state.device), global_batch_size=cfg.batch_size,
                  mixed_precision=AcceleratorState().mixed_precision,  # the run's, where the config says auto
                  compile=cfg.compile, timed_steps=steps, timed_from_step=timed[0][0], timed_seconds=seconds,
                  steps_per_second=steps / seconds if seconds > 0 else float("nan"),
                  step_seconds_median=statistics.median(per_step) if per_step else float("nan"),
                  seconds_to_first_step=stamps[0][1] - started, losses=[s[2] for s in stamps],
                  weights_checksum=weights.get("checksum"), params=weights.get("params"))
    result["images_per_second"] = result["steps_per_second"] * cfg.batch_size
    if cuda:
        result.update(peak_memory_bytes=torch.cuda.max_memory_allocated(state.device),
                      peak_memory_reserved_bytes=torch.cuda.max_memory_reserved(state.device),
                      peak_memory_method="torch.cuda.max_memory_allocated over the whole run (this rank)",
                      float32_matmul_precision=torch.get_float32_matmul_precision(),
                      cudnn_allow_tf32=torch.backends.cudnn.allow_tf32)
    else:
        result.update(peak_memory_bytes=_vm_hwm(), peak_memory_method="peak RSS (VmHWM) of this process")
    result["config"] = cfg.to_dict()
    return result


def _vm_hwm():
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) * 1024


# --- the driver ------------------------------------------------------------------------------

def run_all(args, report, start):
    runner = Runner(args, report, start)
    device = report["machine"]
    gpus = device.get("gpu_count") or 0
    bench, train, ddp = ("bench" in args.parts), ("train" in args.parts), ("ddp" in args.parts)
    for mode in ("eager", "compile"):
        for preset in args.presets:
            name = f"bench/{preset}/{mode}"
            if not bench:
                runner.skip(name, "not in --parts")
            elif mode not in args.modes:
                runner.skip(name, f"{mode} not in --modes ({','.join(args.modes)})")
            else:
                bench_part(runner, preset, mode)
        if mode == "eager":
            if train:
                train_part(runner, "train", 1, args.train_steps, args.timed_from, args.train_extra,
                           args.train_timeout_s)
            else:
                runner.skip("train", "not in --parts")
            if not ddp:
                runner.skip("ddp", "not in --parts")
            elif args.device == "cuda" and gpus < 2:
                runner.skip("ddp", f"{gpus} CUDA device(s); the 2-process DDP run needs 2")
            else:
                env = child_env(OMP_NUM_THREADS="1") if args.device == "cpu" else None
                train_part(runner, "ddp", 2, args.ddp_steps, args.ddp_timed_from, args.ddp_extra,
                           args.ddp_timeout_s, env)


def print_summary(report):
    """One line per finished part: what a reader looks at first."""
    for name, part in report["parts"].items():
        r = part.get("result") or {}
        if part["status"] != "ok":
            line = f"{part['status']}: {part['reason']}"
        elif "summary" in r:
            s = r["summary"]
            line = "  ".join(f"{kind} {s[kind]['images_per_second']['ours']:.1f} img/s, "
                             f"x{s[kind]['paired_ratio_geomean']:.2f} diffusers "
                             f"[{s[kind]['paired_ratio_ci95'][0]:.2f}, {s[kind]['paired_ratio_ci95'][1]:.2f}]"
                             for kind in ("train", "sample"))
        else:
            line = (f"{r['steps_per_second']:.2f} steps/s, {r['images_per_second']:.1f} img/s "
                    f"(batch {r['global_batch_size']}, {r['world_size']} process(es)), peak memory "
                    f"{max(r['peak_memory_bytes_per_rank']) / 2**30:.2f} GiB")
        print(f"[gpu_run] {name:28s} {line}", flush=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train-worker"]:
        return train_worker(argv[1:])
    if argv[:1] == ["machine-info"]:
        return machine_info_child()
    args = parse_args(argv)
    started, start = time.time(), time.monotonic()  # the budget counts from here
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        print(f"error: --out: folder {out_dir} does not exist", file=sys.stderr)
        return 2
    args.out = os.path.abspath(args.out)
    report = dict(schema=SCHEMA, device=args.device, dry_run=args.device == "cpu",
                  started=time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
                  argv=argv, command_line=shlex.join(["bash", "benchmarks/gpu.sh", *argv]),
                  settings={k: v for k, v in vars(args).items() if k not in ("out", "work_dir")},
                  machine=machine_info(), parts={})
    if args.device == "cuda" and not report["machine"].get("cuda_available"):
        report["error"] = (f"--device cuda but torch sees no CUDA device (torch {report['machine'].get('torch')}, "
                           f"CUDA {report['machine'].get('cuda_runtime')})")
        write_json(args.out, report)
        print("error: " + report["error"] + "; use --device cpu for a dry run", file=sys.stderr)
        return 2
    temporary = not args.work_dir
    args.work_dir = os.path.abspath(args.work_dir or tempfile.mkdtemp(prefix="unet-gpu-run-"))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    try:
        args.data_dir = os.path.join(args.work_dir, "synthetic-32x32")
        report["data"] = write_images(args.data_dir, args.images)
        run_all(args, report, start)
    except Stopped as e:  # the parts finished so far are in the JSON; say where it stopped
        report["stopped"] = f"{e} received; parts after the last recorded one did not run"
    finally:
        if temporary:
            shutil.rmtree(args.work_dir, ignore_errors=True)
    parts = report["parts"].values()
    for status in ("ok", "failed", "skipped"):
        report[status] = [p["name"] for p in parts if p["status"] == status]
    report["seconds"] = time.time() - started
    write_json(args.out, report)
    print_summary(report)
    print(f"[gpu_run] {len(report['ok'])} ok, {len(report['failed'])} failed, {len(report['skipped'])} skipped "
          f"in {report['seconds']:.0f} s; {args.out}", flush=True)
    return 1 if report["failed"] or "stopped" in report else 0


if __name__ == "__main__":
    sys.exit(main())

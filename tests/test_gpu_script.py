"""benchmarks/gpu.sh, the GPU run, as its CPU dry run: every part runs (bench.py, the training
run through accelerate, the 2-process DDP run over gloo), and the one JSON records each
part's command, figures and status; a failing part is recorded and the next one still runs.
What is CUDA-specific (bf16 benchmarks, torch.compile, GPU memory) is not exercised here."""

import json
import math
import os
import shlex
import subprocess
import sys

import pytest

from benchmarks import gpu_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PART_NAMES = ["bench/tiny/eager", "train", "ddp", "bench/tiny/compile"]


def run_script(tmp_path, *args, timeout=600):
    out = tmp_path / "gpu.json"
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    r = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu.sh"), "--device", "cpu", "--out", str(out),
                        *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    report = json.loads(out.read_text()) if out.exists() else None
    return r, report


def finite_positive(tree):
    """Every number in a JSON tree is finite and > 0 (None where nothing was found)."""
    return gpu_run.nonpositive(tree)


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dry")
    r, report = run_script(tmp)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return tmp, report


def test_dry_run_records_every_part_with_its_command(dry):
    tmp, report = dry
    assert report["schema"] == gpu_run.SCHEMA and report["device"] == "cpu" and report["dry_run"] is True
    assert list(report["parts"]) == PART_NAMES
    assert report["ok"] == ["bench/tiny/eager", "train", "ddp"] and report["failed"] == []
    assert report["skipped"] == ["bench/tiny/compile"]
    assert "--modes" in report["parts"]["bench/tiny/compile"]["reason"]
    assert report["command_line"] == shlex.join(["bash", "benchmarks/gpu.sh", "--device", "cpu", "--out",
                                                 str(tmp / "gpu.json")])
    for name in PART_NAMES[:3]:
        part = report["parts"][name]
        assert part["command_line"] == shlex.join(part["command"]) and part["returncode"] == 0
        assert part["seconds"] > 0 and os.path.isfile(os.path.join(tmp, part["log"]))
        assert part["command_line"] in open(os.path.join(tmp, part["log"])).readline()
    bench = " ".join(report["parts"]["bench/tiny/eager"]["command"])
    for flag in ("benchmarks/bench.py", "--preset tiny", "--device cpu", "--dtype fp32", "--repeats 2",
                 "--steps 1", "--warmup 1", "--json"):
        assert flag in bench
    assert "--compile" not in bench
    train = " ".join(report["parts"]["train"]["command"])
    ddp = " ".join(report["parts"]["ddp"]["command"])
    for cmd in (train, ddp):
        assert "accelerate.commands.launch" in cmd and "gpu_run.py train-worker" in cmd
        assert "--config configs/cifar10.yaml --dataset imagefolder" in cmd
    assert "--num_processes 1 " in train and "--max_steps 6 " in train and "--multi_gpu" not in train
    assert "--num_processes 2 " in ddp and "--multi_gpu" in ddp and "--max_steps 3 " in ddp


def test_dry_run_machine_and_data(dry):
    import torch

    _, report = dry
    m = report["machine"]
    assert m["torch"] == torch.__version__ and m["cuda_runtime"] == torch.version.cuda
    assert m["cpu_count"] == os.cpu_count() and m["python"] == ".".join(map(str, sys.version_info[:3]))
    data = report["data"]
    assert data["synthetic"] is True and "synthetic" in data["note"]
    assert (data["images"], data["size"], data["channels"], data["format"]) == (48, 32, 3, "PNG")
    assert not os.path.exists(data["folder"])  # the temporary work folder is removed


def test_dry_run_bench_figures(dry):
    from benchmarks.bench import PRESETS, count_params
    from unet.train.factory import create_model

    _, report = dry
    part = report["parts"]["bench/tiny/eager"]
    s, full = part["result"]["summary"], part["result"]["full"]
    assert finite_positive(s) is None, finite_positive(s)
    assert (s["preset"], s["dtype"], s["compile"]) == ("tiny", "fp32", False)
    assert s["params"] == count_params(create_model(PRESETS["tiny"]()))
    assert s["batch_size"] == PRESETS["tiny"]().batch_size
    for kind in ("train", "sample"):  # the summary is the bench JSON's own figures
        assert s[kind]["images_per_second"] == full[kind]["images_per_second"]
        lo, hi = s[kind]["paired_ratio_ci95"]
        assert lo <= s[kind]["paired_ratio_geomean"] <= hi
        assert full[kind]["images_per_second"]["ours"] == pytest.approx(
            s["batch_size"] / full[kind]["median_seconds"]["ours"], rel=1e-12)
    assert len(full["train"]["seconds_per_step"]["ours"]) == 2  # --repeats 2


def test_dry_run_training_figures(dry):
    from unet.config import TrainConfig
    from unet.train.factory import create_model

    _, report = dry
    for name, procs, steps, timed_from in (("train", 1, 6, 2), ("ddp", 2, 3, 0)):
        r = report["parts"][name]["result"]
        numbers = {k: r[k] for k in ("steps_per_second", "images_per_second", "timed_seconds",
                                     "step_seconds_median", "peak_memory_bytes_per_rank")}
        assert finite_positive(numbers) is None, (name, numbers)
        assert (r["world_size"], r["steps"], r["stop_reason"]) == (procs, steps, "max_steps")
        assert len(r["losses"]) == steps and all(math.isfinite(x) and x > 0 for x in r["losses"])
        assert len(r["peak_memory_bytes_per_rank"]) == procs
        # Timed from the stamp after step max(1, timed_from) to the one after the last step.
        assert r["timed_steps"] == steps - max(1, timed_from) and r["timed_from_step"] == max(1, timed_from)
        assert r["steps_per_second"] == pytest.approx(r["timed_steps"] / r["timed_seconds"], rel=1e-12)
        assert r["images_per_second"] == pytest.approx(r["steps_per_second"] * 8, rel=1e-12)
        cfg = TrainConfig(**r["config"])
        # configs/cifar10.yaml with the dry run's small model on the synthetic folder
        assert (cfg.dataset, cfg.image_size, cfg.channels, cfg.batch_size) == ("imagefolder", 32, 3, 8)
        assert (cfg.noise_schedule, cfg.learn_sigma, cfg.use_scale_shift_norm) == ("cosine", True, True)
        assert (cfg.model_channels, cfg.channel_mult) == (32, [1, 2])
        assert r["params"] == sum(p.numel() for p in create_model(cfg).parameters())
    assert report["parts"]["ddp"]["result"]["checks"] == dict(same_losses_on_every_rank=True,
                                                              same_weights_on_every_rank=True)


def test_a_failing_part_is_recorded_and_the_next_still_runs(tmp_path):
    r, report = run_script(tmp_path, "--parts", "bench,train", "--presets", "no-such-preset,tiny",
                           "--train_extra", "--no_such_key 1")
    assert r.returncode == 1, r.stderr[-3000:]
    parts = report["parts"]
    assert list(parts) == ["bench/no-such-preset/eager", "bench/tiny/eager", "train", "ddp",
                           "bench/no-such-preset/compile", "bench/tiny/compile"]
    assert report["failed"] == ["bench/no-such-preset/eager", "train"] and report["ok"] == ["bench/tiny/eager"]
    bad = parts["bench/no-such-preset/eager"]
    assert bad["returncode"] == 2 and "invalid choice: 'no-such-preset'" in bad["reason"]
    assert "--preset no-such-preset" in bad["command_line"] and "invalid choice" in bad["output_tail"]
    assert finite_positive(parts["bench/tiny/eager"]["result"]["summary"]) is None
    train = parts["train"]
    assert train["returncode"] != 0 and train["reason"].startswith("exit status")
    assert "no_such_key" in train["reason"] and train["command"][-2:] == ["--no_such_key", "1"]
    assert parts["ddp"] == dict(name="ddp", status="skipped", reason="not in --parts")


def test_spent_budget_skips_every_part(tmp_path):
    r, report = run_script(tmp_path, "--budget_s", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert list(report["parts"]) == PART_NAMES and report["ok"] == report["failed"] == []
    assert all("time budget spent" in p["reason"] for n, p in report["parts"].items() if n != "bench/tiny/compile")


@pytest.mark.parametrize("args, message", [
    (["--parts", "bench,nope"], "--parts: unknown nope"),
    (["--modes", "jit"], "--modes: unknown jit"),
    (["--train_steps", "1"], "--train_steps must be at least 2"),
    (["--bench_batch_size", "-8"], "--bench_batch_size must be at least 0"),
    (["--timed_from", "5", "--train_steps", "6"], "--timed_from must be in [0, --train_steps - 1)"),
    (["--device", "tpu"], "argument --device: invalid choice"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, args, message):
    r, report = run_script(tmp_path, *args, timeout=60)
    assert r.returncode == 2 and report is None
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr


def test_a_part_over_its_time_limit_is_stopped_and_recorded(tmp_path):
    r, report = run_script(tmp_path, "--parts", "bench", "--bench_timeout_s", "1", timeout=120)
    assert r.returncode == 1, r.stderr[-3000:]
    part = report["parts"]["bench/tiny/eager"]
    assert part["status"] == "failed" and part["returncode"] is None and part["timeout_s"] == 1
    assert part["reason"] == "timed out after 1 s" and 1 <= part["seconds"] < 30
    assert "result" not in part and "benchmarks/bench.py" in part["output_tail"]
    # the whole process group was stopped: no bench.py of this run is left
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert part["command_line"] not in ps


def test_cuda_benchmarks_run_at_batch_128_unless_told_otherwise(tmp_path):
    """On CUDA the presets' CPU batches (8 to 64) left the H200 waiting on the host, so the
    GPU run benchmarks at the paper's CIFAR-10 batch; the CPU dry run keeps the presets'."""
    class Recorder:
        logs = str(tmp_path)

        def __init__(self, args):
            self.args, self.commands = args, []

        def run(self, name, cmd, timeout, read_result, env=None):
            self.commands.append(cmd)

    def bench_command(*argv):
        r = Recorder(gpu_run.parse_args(["--out", str(tmp_path / "g.json"), *argv]))
        gpu_run.bench_part(r, "cifar10", "eager")
        return r.commands[0]

    cuda = bench_command()
    assert cuda[cuda.index("--batch_size") + 1] == "128" and cuda[cuda.index("--device") + 1] == "cuda"
    assert "--batch_size" not in bench_command("--bench_batch_size", "0")
    assert "--batch_size" not in bench_command("--device", "cpu")
    own = bench_command("--bench_batch_size", "32")
    assert own[own.index("--batch_size") + 1] == "32"

"""Fault injection: a training run SIGKILLed at random points (after a step, and at every
phase of a checkpoint save: its files half-written, before the flush, before the publishing
rename, before rotation, half-way through deleting an old checkpoint), resumed with
``resume: auto`` each time, ends with weights bit-identical to an uninterrupted run.
The short version runs in CI; the long one (every point, then kills at random times) is slow."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from test_training import ROOT, files_equal, subprocess_env, tiny

from unet.checkpoint.load import load_checkpoint
from unet.train.checkpoint import latest_checkpoint, list_checkpoints
from unet.train.loop import train

DRIVER = textwrap.dedent("""
    import os, signal, sys
    from unet.train import checkpoint as c
    run_dir = c
    from unet.config import TrainConfig
    from unet.train.loop import train

    kind, step = os.environ.get("KILL_AT", "none:0").split(":")
    tag = f"checkpoint_{int(step):08d}"

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def before(name, fn):  # die when fn is called for the save of step `step`
        def wrapped(*a, **k):
            if kind == name and any(tag in str(x) for x in a):
                die()
            return fn(*a, **k)
        return wrapped

    def half_written(folder, *a, **k):  # model.safetensors written, the rest not
        real_files(folder, *a, **k)
        if kind == "files" and tag in folder:
            os.remove(os.path.join(folder, "config.yaml"))
            die()

    def half_deleted(path):  # renamed out of the listing, then killed before the removal
        if kind == "delete" and deleting:
            os.replace(path, os.path.join(os.path.dirname(path), run_dir.DEL_PREFIX + os.path.basename(path)))
            die()
        real_remove(path)

    deleting = False
    def rotating(output_dir, final, keep):
        global deleting
        deleting = tag in final
        return real_rotate(output_dir, final, keep)

    real_files, real_remove, real_rotate = c.write_own_files, run_dir.remove_folder, c.rotate
    c.write_own_files, run_dir.remove_folder = half_written, half_deleted
    c.fsync_tree, c.publish = before("fsync", c.fsync_tree), before("publish", c.publish)
    c.rotate = before("rotate", rotating)
    hook = lambda s, row, model: kind == "step" and s == int(step) and die()
    train(TrainConfig.load(sys.argv[1]), hooks=[hook])
""")

STEPS, EVERY = 8, 2
PHASES = ("step", "files", "fsync", "publish", "rotate", "delete")


def kill_points():
    """Every (phase, step) a kill can hit, in the order a run reaches them."""
    saves = range(EVERY, STEPS + 1, EVERY)
    points = [("step", s) for s in range(1, STEPS + 1)]
    points += [(p, s) for p in ("files", "fsync", "publish", "rotate") for s in saves]
    points += [("delete", s) for s in saves if s > 2 * EVERY]  # keep 2: rotation deletes from the third save
    return sorted(points, key=lambda p: (p[1], PHASES.index(p[0])))


def config(out):
    return tiny(out, max_steps=STEPS, checkpoint_every=EVERY, keep_checkpoints=2, resume="auto",
                schedule_sampler="loss-second-moment", diffusion_steps=4, dropout=0.1)


def run_driver(tmp_path, point):
    env = subprocess_env(**({"KILL_AT": f"{point[0]}:{point[1]}"} if point else {}))
    return subprocess.run([sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "c.yaml")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


def survive(tmp_path, points):
    """Run, kill at each point in turn, resume; return the finished run's last checkpoint."""
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "driver.py").write_text(DRIVER)
    config(tmp_path / "run").save(tmp_path / "c.yaml")
    for point in points:
        r = run_driver(tmp_path, point)
        assert r.returncode == -signal.SIGKILL, (point, r.stderr[-2000:])
        latest = latest_checkpoint(str(tmp_path / "run"))
        if latest:
            load_checkpoint(latest)  # what is listed is always loadable
    r = run_driver(tmp_path, None)
    assert r.returncode == 0, r.stderr[-2000:]
    root = tmp_path / "run" / "checkpoints"
    assert sorted(os.listdir(root)) == [os.path.basename(p) for p in list_checkpoints(str(tmp_path / "run"))]
    return latest_checkpoint(str(tmp_path / "run"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return train(config(tmp_path_factory.mktemp("straight")))["checkpoint"]


def assert_same(a, b):
    assert os.path.basename(a) == os.path.basename(b) == f"checkpoint_{STEPS:08d}"
    for name in ("model.safetensors", "ema_0.999.safetensors", "train_state.safetensors"):
        assert files_equal(a, b, name), name


def test_sigkill_at_random_points_then_resume_is_bit_identical(uninterrupted, tmp_path):
    """One random point of each kind: after a step, while a save is unpublished, after it."""
    rng, order = random.Random(0), kill_points()
    groups = [("step",), ("files", "fsync", "publish"), ("rotate", "delete")]
    points = sorted({rng.choice([p for p in order if p[0] in g]) for g in groups}, key=order.index)
    assert len(points) == 3
    assert_same(survive(tmp_path, points), uninterrupted)


@pytest.mark.slow
def test_sigkill_at_every_point_then_resume_is_bit_identical(uninterrupted, tmp_path):
    """Two runs: every point but the deletions, then the deletions (a kill before rotating
    a save publishes it, so the same save's deletion is never reached in the same run)."""
    points = kill_points()
    assert len(points) == 26
    assert_same(survive(tmp_path / "a", [p for p in points if p[0] != "delete"]), uninterrupted)
    assert_same(survive(tmp_path / "b", [p for p in points if p[0] == "delete"]), uninterrupted)


@pytest.mark.slow
def test_sigkill_at_random_times_then_resume_is_bit_identical(uninterrupted, tmp_path):
    """Kills from outside at random moments (start-up, steps, saves), until the run finishes."""
    (tmp_path / "driver.py").write_text(DRIVER)
    config(tmp_path / "run").save(tmp_path / "c.yaml")
    rng, kills = random.Random(7), 0
    cmd = [sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "c.yaml")]
    while True:
        p = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
        time.sleep(rng.uniform(2.0, 9.0))
        if p.poll() is not None:
            assert p.returncode == 0, p.stderr.read()[-2000:]
            break
        p.kill()
        p.wait()
        kills += 1
        assert kills < 40, "the run never finished"
    print(f"{kills} kills at random times survived")
    assert_same(latest_checkpoint(str(tmp_path / "run")), uninterrupted)

"""Nothing lost, nothing silently wrong (issue 12): what a run does with a folder that holds
checkpoints, non-finite weights, keys changed on resume, corrupt checkpoint parts, failed
writes, the barrier before publishing, and SIGTERM/SIGUSR1 preemption."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_bad_input import tree_digest
from test_training import ROOT, files_equal, subprocess_env, tiny

from unet.checkpoint.load import load_checkpoint
from unet.cli import train as train_script
from unet.config import ConfigError
from unet.train import checkpoint as ckpt_mod
from unet.train.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, log_process_count_change
from unet.train.loop import train
from unet.train.preemption import PREEMPTED_EXIT


def names(out):
    return [os.path.basename(p) for p in list_checkpoints(str(out))]


def one_error_line(capsys):
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """6 steps in one go, a checkpoint every 2 (with dropout: resume must restore the RNG)."""
    cfg = tiny(tmp_path_factory.mktemp("straight"))
    return cfg, train(cfg)


# --- item 1: a folder that already holds checkpoints --------------------------------------

def test_a_fresh_run_never_mixes_with_checkpoints_already_there(straight, tmp_path, capsys):
    cfg, _ = straight
    out = tmp_path / "run"
    shutil.copytree(cfg.output_dir, out)
    before = tree_digest(out / "checkpoints")
    again = cfg.replace(output_dir=str(out), max_steps=2, seed=1)
    again.save(tmp_path / "c.yaml")
    assert train_script.main(["--config", str(tmp_path / "c.yaml")]) == 2
    assert "--resume latest" in one_error_line(capsys) and tree_digest(out / "checkpoints") == before
    # told to overwrite: the old checkpoints go (logged), the new one is the run's latest
    s = train(again.replace(overwrite=True))
    assert "overwrite: removed 2 checkpoint(s)" in capsys.readouterr().out
    assert names(out) == ["checkpoint_00000002"] and s["checkpoint"] == latest_checkpoint(str(out))
    assert load_checkpoint(str(out)).config["seed"] == 1


def test_resuming_an_older_checkpoint_keeps_newer_ones_unless_told(straight, tmp_path, capsys):
    cfg, _ = straight
    out = tmp_path / "run"
    shutil.copytree(cfg.output_dir, out)  # checkpoints 4 and 6
    older = cfg.replace(output_dir=str(out), resume=str(out / "checkpoints" / "checkpoint_00000004"), max_steps=5)
    with pytest.raises(ConfigError, match="would leave 1 other checkpoint.*checkpoint_00000006"):
        train(older)
    assert names(out) == ["checkpoint_00000004", "checkpoint_00000006"]
    train(older.replace(overwrite=True))
    assert "removed 1 checkpoint(s)" in capsys.readouterr().out
    assert names(out) == ["checkpoint_00000004", "checkpoint_00000005"]  # rotation kept the one just written


# --- item 3: non-finite weights ------------------------------------------------------------

def test_non_finite_weights_are_never_checkpointed_and_last_good_is_good(tmp_path, capsys):
    def poison(step, row, model):
        if step == 3:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))

    s = train(tiny(tmp_path, max_steps=20, checkpoint_every=1, keep_checkpoints=3, max_nan_steps=2),
              hooks=[poison])
    assert s["stop_reason"] == "nan" and s["steps"] == 4  # steps 4 and 5 skipped; 4 were done
    assert s["checkpoint"].endswith("checkpoint_00000002") and s["checkpoint"] == latest_checkpoint(str(tmp_path))
    assert names(tmp_path) == ["checkpoint_00000001", "checkpoint_00000002"]  # the good ones were kept
    for ema in (False, True):
        model = load_checkpoint(s["checkpoint"], ema=ema).model
        assert all(torch.isfinite(p).all() for p in model.parameters())
    assert "step 3: checkpoint not written (non-finite loss or weights)" in capsys.readouterr().out


# --- item 2: keys changed on resume --------------------------------------------------------

def test_resume_applies_a_new_lr_and_weight_decay(straight, tmp_path, capsys):
    cfg, _ = straight
    shutil.copytree(cfg.output_dir, tmp_path / "run")
    s = train(cfg.replace(output_dir=str(tmp_path / "run"), resume="latest", max_steps=8, lr=1e-4,
                          weight_decay=0.1))
    out = capsys.readouterr().out
    assert "resume: lr changed from 0.001 to 0.0001" in out and "weight_decay changed from 0.0 to 0.1" in out
    assert [r["lr"] for r in s["history"]] == [1e-4, 1e-4]  # warm-up (2 steps) is over
    groups = torch.load(os.path.join(s["checkpoint"], "optimizer.bin"), weights_only=True)["param_groups"]
    assert all(g["lr"] == 1e-4 and g["weight_decay"] == 0.1 for g in groups)


@pytest.mark.parametrize("key, value", [("diffusion_steps", 10), ("schedule_sampler", "loss-second-moment"),
                                        ("batch_size", 16), ("model_channels", 64), ("seed", 3)])
def test_resume_refuses_a_changed_fixed_key(straight, key, value, capsys):
    cfg, _ = straight
    before = tree_digest(cfg.output_dir + "/checkpoints")
    bad = cfg.replace(resume="latest", max_steps=8, **{key: value})
    with pytest.raises(ConfigError, match=rf"^config key '{key}': the checkpoint .* was trained with "
                                          rf"{getattr(cfg, key)!r}, this run asks for {value!r}"):
        train(bad)
    if key == "diffusion_steps":  # and through the script: exit 2, one line
        bad.save(os.path.join(os.path.dirname(cfg.output_dir), "bad.yaml"))
        assert train_script.main(["--config", os.path.join(os.path.dirname(cfg.output_dir), "bad.yaml")]) == 2
        assert "'diffusion_steps'" in one_error_line(capsys)
    assert tree_digest(cfg.output_dir + "/checkpoints") == before


# --- item 4: corrupt checkpoint parts ------------------------------------------------------

def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize("name, damage, words", [
    ("optimizer.bin", truncate, "optimizer.bin is unreadable"),
    ("scheduler.bin", truncate, "scheduler.bin is unreadable"),
    ("random_states_0.pkl", lambda p: open(p, "w").close(), "random_states_0.pkl is empty"),
    ("random_states_0.pkl", os.remove, "random_states_0.pkl is missing"),
    ("random_states_0.pkl", truncate, "random_states_0.pkl is unreadable"),
    ("optimizer.bin", os.remove, "optimizer.bin is missing"),
    ("train_state.json", truncate, "train_state.json is unreadable"),
])
@pytest.mark.parametrize("manifest", [True, False], ids=["manifest", "no-manifest"])
def test_a_corrupt_checkpoint_part_is_one_line_naming_the_file(straight, tmp_path, name, damage, words, manifest):
    """With its manifest (issue 34) a damaged file is named by its size or sha256 before anything
    reads it; a checkpoint written before manifests still gets the checks of each file's reader."""
    cfg, _ = straight
    shutil.copytree(cfg.output_dir, tmp_path / "run")
    ckpt = latest_checkpoint(str(tmp_path / "run"))
    if not manifest:
        os.remove(os.path.join(ckpt, "manifest.json"))
    damage(os.path.join(ckpt, name))
    with pytest.raises(CheckpointError) as e:
        train(cfg.replace(output_dir=str(tmp_path / "run"), resume="latest", max_steps=7))
    if manifest and damage is not os.remove:
        words = f"{name} is {os.path.getsize(os.path.join(ckpt, name))} bytes, its manifest says"
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_lost_rng_file_of_a_process_that_saved_one_is_an_error(straight, tmp_path):
    """A checkpoint records how many processes saved it, so a missing random_states_<i>.pkl of
    one of them is an error, not mistaken for a process count change (which is an explicit,
    logged fallback: tests/test_multinode.py)."""
    cfg, _ = straight
    shutil.copytree(cfg.output_dir, tmp_path / "run")
    ckpt, emas = latest_checkpoint(str(tmp_path / "run")), {r: None for r in cfg.ema_rates}
    meta_file = os.path.join(ckpt, "train_state.json")
    with open(meta_file) as f:
        meta = json.load(f)
    assert meta["num_processes"] == 1 and ckpt_mod.check_training_files(ckpt, 2, emas) == 1
    with open(meta_file, "w") as f:
        json.dump({**meta, "num_processes": 2}, f)  # as if saved by 2, random_states_1.pkl lost
    with pytest.raises(CheckpointError, match="random_states_1.pkl is missing"):
        ckpt_mod.check_training_files(ckpt, 2, emas)
    assert ckpt_mod.check_training_files(ckpt, 1, emas) == 2  # one process reads only process 0's
    with open(meta_file, "w") as f:
        json.dump({k: v for k, v in meta.items() if k != "num_processes"}, f)
    assert ckpt_mod.rng_writers(ckpt) == 1  # older checkpoints: the RNG files are counted
    lines = []
    log_process_count_change(1, 3, lines.append)
    log_process_count_change(4, 2, lines.append)
    log_process_count_change(2, 2, lines.append)
    assert len(lines) == 2 and "process(es) 1, 2 have no saved RNG state" in lines[0]
    assert "the RNG state(s) of process(es) 2, 3 are not used" in lines[1]


# --- item 5: failed writes, the barrier ----------------------------------------------------

def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    real = ckpt_mod.save_file

    def full(tensors, path, *a, **k):
        if "checkpoint_00000004" in path:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(ckpt_mod, "save_file", full)
    cfg = tiny(tmp_path / "run")
    cfg.save(tmp_path / "c.yaml")
    assert train_script.main(["--config", str(tmp_path / "c.yaml")]) == 1
    line = one_error_line(capsys)
    assert "checkpoint_00000004: [Errno 28] No space left on device; the previous checkpoint" in line
    assert line.endswith("checkpoint_00000002) is kept")
    assert names(tmp_path / "run") == ["checkpoint_00000002"]
    assert os.listdir(tmp_path / "run" / "checkpoints") == ["checkpoint_00000002"]  # no temporary folder left
    load_checkpoint(str(tmp_path / "run"))


def test_an_unwritable_output_dir_is_one_line_before_any_work(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    assert train_script.main(["--output_dir", str(tmp_path / "file" / "run"), "--max_steps", "2"]) == 1
    line = one_error_line(capsys)
    assert "output_dir" in line and "is not writable: Not a directory" in line


class RecordingAccelerator:
    """Just enough of an Accelerator for ``save_checkpoint``, recording what it is asked."""

    is_main_process, process_index, num_processes, device = True, 0, 1, "cpu"

    def __init__(self, events):
        self.events = events

    def wait_for_everyone(self):
        self.events.append("barrier")

    def save_state(self, folder):
        os.makedirs(folder)
        open(os.path.join(folder, "random_states_0.pkl"), "w").write("rng")
        self.events.append("save_state")

    def get_state_dict(self, model):
        return model.state_dict()

    def unwrap_model(self, model):
        return model


def test_every_process_has_saved_before_the_main_one_publishes(tmp_path, monkeypatch):
    events = []
    real = ckpt_mod.publish
    monkeypatch.setattr(ckpt_mod, "publish", lambda tmp, final: events.append("publish") or real(tmp, final))
    final = ckpt_mod.save_checkpoint(RecordingAccelerator(events), str(tmp_path), 3, tiny(tmp_path),
                                     torch.nn.Linear(2, 2), {}, {"step": 3}, keep=2)
    saved, published = events.index("save_state"), events.index("publish")
    assert "barrier" in events[saved:published], events
    assert os.path.isfile(os.path.join(final, "train_state.json"))


# --- preemption ----------------------------------------------------------------------------

def test_sigterm_stops_after_the_step_with_a_checkpoint_and_resumes_exactly(straight, tmp_path, monkeypatch, capsys):
    cfg, full = straight
    real = ckpt_mod.publish

    def signal_again(tmp, final):  # a second and a third signal while the checkpoint is being saved
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR1)
        real(tmp, final)

    monkeypatch.setattr(ckpt_mod, "publish", signal_again)
    run = cfg.replace(output_dir=str(tmp_path), resume="auto")
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    s = train(run, hooks=[lambda step, row, model: step == 3 and os.kill(os.getpid(), signal.SIGTERM)],
              stop_signals=True)
    assert (s["stop_reason"], s["signal"], s["steps"]) == ("preempted", "SIGTERM", 3)
    assert s["checkpoint"].endswith("checkpoint_00000003") and [r["step"] for r in s["history"]] == [1, 2, 3]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)) == handlers  # put back
    monkeypatch.setattr(ckpt_mod, "publish", real)
    rest = train(run)
    assert [r["step"] for r in rest["history"]] == [4, 5, 6]  # nothing repeated, nothing skipped
    assert [r["loss"] for r in s["history"] + rest["history"]] == [r["loss"] for r in full["history"]]
    a, b = latest_checkpoint(cfg.output_dir), latest_checkpoint(str(tmp_path))
    assert files_equal(a, b, "model.safetensors") and files_equal(a, b, "ema_0.999.safetensors")
    # the same command once more: the run is finished, which it says, and nothing changes
    capsys.readouterr()
    again = train(run)
    assert again["history"] == [] and latest_checkpoint(str(tmp_path)) == b
    assert "max_steps is 6: nothing left to train" in capsys.readouterr().out


def wait_for(path, timeout=240):
    t0 = time.time()
    while not os.path.exists(path):
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.05)


def test_sigterm_to_train_py_exits_75_and_the_run_resumes_to_the_same_weights(tmp_path):
    """A real signal from outside, at whatever step the run has reached."""
    cfg = tiny(tmp_path / "run", max_steps=30, checkpoint_every=5, resume="auto", dropout=0.1)
    cfg.save(tmp_path / "c.yaml")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", str(tmp_path / "c.yaml")]
    p = subprocess.Popen(cmd, cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    wait_for(tmp_path / "run" / "checkpoints" / "checkpoint_00000005")
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=300)
    assert p.returncode == PREEMPTED_EXIT, err[-2000:]
    last = err.strip().splitlines()[-1]
    step = int(last.split(" at step ")[1].split(";")[0])
    assert last.startswith("stopped by SIGTERM at step ") and 5 <= step < 30
    assert latest_checkpoint(str(tmp_path / "run")).endswith(f"checkpoint_{step:08d}")
    r = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and f"checkpoint_{step:08d} at step {step}" in r.stdout, r.stderr[-2000:]
    straight = train(cfg.replace(output_dir=str(tmp_path / "straight")))
    a, b = latest_checkpoint(str(tmp_path / "run")), straight["checkpoint"]
    assert a.endswith("checkpoint_00000030") and files_equal(a, b, "model.safetensors")
    assert files_equal(a, b, "ema_0.999.safetensors")

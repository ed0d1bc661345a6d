"""The checkpoints folder: rotation by recency, leftovers of interrupted saves, publishing,
and what a starting run may do with a folder that already holds checkpoints (no torch)."""

import os

import pytest

from unet.config import ConfigError, TrainConfig
from unet.train import checkpoint as run_dir
from unet.train.checkpoint import (
    CheckpointError,
    clean_leftovers,
    latest_checkpoint,
    list_checkpoints,
    plan_start,
    publish,
    rotate,
)


def make(root, step, mtime=None, files=("model.safetensors", "config.yaml", "train_state.json"), name=None):
    """A stand-in checkpoint folder (its files hold the step, so a swap can be told apart)."""
    path = root / "checkpoints" / (name or f"checkpoint_{step:08d}")
    path.mkdir(parents=True)
    for f in files:
        (path / f).write_text(str(step))
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def names(output_dir):
    return [os.path.basename(p) for p in list_checkpoints(str(output_dir))]


def test_rotation_keeps_the_newest_not_the_highest_steps(tmp_path):
    # issue 12 item 1: another run's step-20 and step-10 checkpoints, then this run's step 5
    make(tmp_path, 10, mtime=1000)
    make(tmp_path, 20, mtime=2000)
    five = make(tmp_path, 5, mtime=3000)
    assert rotate(str(tmp_path), str(five), keep=2) == [str(tmp_path / "checkpoints" / "checkpoint_00000010")]
    assert names(tmp_path) == ["checkpoint_00000005", "checkpoint_00000020"]
    assert rotate(str(tmp_path), str(five), keep=1) and names(tmp_path) == ["checkpoint_00000005"]
    assert not any(n.startswith(".del-") for n in os.listdir(tmp_path / "checkpoints"))


def test_incomplete_and_leftover_folders_are_never_listed(tmp_path):
    make(tmp_path, 2)
    make(tmp_path, 4, files=("train_state.json",))  # half-deleted by an older version
    make(tmp_path, 6, name=".tmp-checkpoint_00000006")
    make(tmp_path, 8, name="checkpoint_00000008.old")
    make(tmp_path, 9, name=".del-checkpoint_00000009")
    assert names(tmp_path) == ["checkpoint_00000002"]
    assert latest_checkpoint(str(tmp_path)).endswith("checkpoint_00000002")


def test_clean_leftovers_finishes_or_undoes_an_interrupted_swap(tmp_path):
    root = tmp_path / "checkpoints"
    # killed after moving the old copy aside, before the new one was renamed in: publish the new
    make(tmp_path, 1, name="checkpoint_00000004.old")
    make(tmp_path, 2, name=".tmp-checkpoint_00000004")
    # killed with only the old copy moved aside and no new one: put it back
    make(tmp_path, 3, name="checkpoint_00000006.old")
    # killed after the swap, before the old copy was removed
    make(tmp_path, 8)
    make(tmp_path, 7, name="checkpoint_00000008.old")
    make(tmp_path, 9, name=".tmp-checkpoint_00000010")
    make(tmp_path, 9, name=".del-checkpoint_00000012")
    lines = clean_leftovers(str(tmp_path))
    assert sorted(os.listdir(root)) == ["checkpoint_00000004", "checkpoint_00000006", "checkpoint_00000008"]
    assert [(root / n / "model.safetensors").read_text() for n in sorted(os.listdir(root))] == ["2", "3", "8"]
    assert len(lines) == 4 and clean_leftovers(str(tmp_path)) == []


def test_publish_flushes_before_and_after_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append("rename") or real_replace(a, b))
    tmp = make(tmp_path, 3, name=".tmp-checkpoint_00000003")
    run_dir.fsync_tree(str(tmp))
    publish(str(tmp), str(tmp_path / "checkpoints" / "checkpoint_00000003"))
    assert events == ["fsync"] * 4 + ["rename", "fsync"]  # 3 files and the folder, the rename, the parent
    assert names(tmp_path) == ["checkpoint_00000003"]
    again = make(tmp_path, 33, name=".tmp-checkpoint_00000003")
    publish(str(again), str(tmp_path / "checkpoints" / "checkpoint_00000003"))  # the same step saved again
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["checkpoint_00000003"]
    assert (tmp_path / "checkpoints" / "checkpoint_00000003" / "config.yaml").read_text() == "33"


def cfg(tmp_path, **kw):
    return TrainConfig(output_dir=str(tmp_path), **kw)


def test_a_fresh_run_into_a_folder_with_checkpoints_is_refused(tmp_path):
    assert plan_start(cfg(tmp_path)) == (None, [])  # nothing there yet
    make(tmp_path, 10)
    make(tmp_path, 20)
    with pytest.raises(ConfigError, match=r"already holds 2 checkpoint\(s\) \(newest checkpoint_00000020\): "
                                          r"continue them with --resume latest .*--overwrite true.*--output_dir"):
        plan_start(cfg(tmp_path))
    path, stale = plan_start(cfg(tmp_path, overwrite=True))
    assert path is None and [os.path.basename(s) for s in stale] == ["checkpoint_00000010", "checkpoint_00000020"]


def test_resume_modes(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint in .* to continue .*--resume auto"):
        plan_start(cfg(tmp_path, resume="latest"))
    assert plan_start(cfg(tmp_path, resume="auto")) == (None, [])  # fresh
    make(tmp_path, 10)
    make(tmp_path, 20)
    for mode in ("latest", "auto", str(tmp_path)):
        path, stale = plan_start(cfg(tmp_path, resume=mode))
        assert path.endswith("checkpoint_00000020") and stale == []


def test_resuming_an_older_checkpoint_never_leaves_newer_ones_silently(tmp_path):
    ten = make(tmp_path, 10)
    make(tmp_path, 20)
    with pytest.raises(ConfigError, match=r"resuming from .*checkpoint_00000010' would leave 1 other checkpoint"
                                          r"\(s\) .*newest checkpoint_00000020.*--overwrite true"):
        plan_start(cfg(tmp_path, resume=str(ten)))
    path, stale = plan_start(cfg(tmp_path, resume=str(ten), overwrite=True))
    assert path == str(ten) and [os.path.basename(s) for s in stale] == ["checkpoint_00000020"]
    # another run's checkpoint into this folder: every checkpoint here would be mistaken for its
    other = make(tmp_path / "other", 30)
    with pytest.raises(ConfigError, match="would leave 2 other"):
        plan_start(cfg(tmp_path, resume=str(other)))
    # into an empty folder: fine
    assert plan_start(cfg(tmp_path / "new", resume=str(other))) == (str(other), [])

"""The ablation's process split and progress line, without training: one queue shared by the
worker processes (each run claimed once), a launcher's static split, the time-left estimate."""

import os

import pytest

from unet.ablation import store as ablation_store
from unet.ablation.store import CLAIMS_ENV, drop_claims, owns_run, progress_words, spawn_workers


def test_each_run_is_claimed_by_one_process(tmp_path, monkeypatch):
    claims = tmp_path / "claims" / "invocation"
    claims.mkdir(parents=True)
    monkeypatch.setenv(CLAIMS_ENV, str(claims))
    assert owns_run(0, "c00_zero_s0", rank=0, world=2)
    assert not owns_run(0, "c00_zero_s0", rank=1, world=2)  # taken: the other process skips it
    assert owns_run(1, "c00_standard_s0", rank=1, world=2)
    drop_claims()
    assert not (tmp_path / "claims").exists()


def test_launcher_processes_split_by_index(monkeypatch):
    monkeypatch.delenv(CLAIMS_ENV, raising=False)
    assert [i for i in range(7) if owns_run(i, f"r{i}", rank=1, world=3)] == [1, 4]


def test_no_workers_for_one_process_or_under_a_launcher(tmp_path, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", CLAIMS_ENV):  # undone after the test, whatever spawn_workers sets
        monkeypatch.delenv(k, raising=False)
    started = []
    monkeypatch.setattr(ablation_store.subprocess, "Popen", lambda *a, **k: started.append(k["env"]["RANK"]))
    assert spawn_workers(1, ["--config", "x"], str(tmp_path)) == []
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert spawn_workers(2, ["--config", "x"], str(tmp_path)) == []
    monkeypatch.delenv("WORLD_SIZE")
    spawn_workers(3, ["--config", "x"], str(tmp_path))
    assert started == ["1", "2"]
    assert os.environ["RANK"] == "0" and os.environ["WORLD_SIZE"] == "3" and os.path.isdir(os.environ[CLAIMS_ENV])


@pytest.mark.parametrize("done, started_with, elapsed, words", [
    (10, 0, 60.0, "runs 10/40, 1m00s elapsed, about 3m00s left"),  # 6 s a run, 30 to go
    (12, 10, 30.0, "runs 12/40, 0m30s elapsed, about 7m00s left"),  # continuing: only this invocation's pace
    (10, 10, 5.0, "runs 10/40, 0m05s elapsed"),  # nothing finished yet: no estimate
    (40, 0, 125.0, "runs 40/40, 2m05s elapsed"),
])
def test_progress_words(done, started_with, elapsed, words):
    assert progress_words(done, 40, started_with, elapsed) == words

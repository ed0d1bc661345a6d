"""One wandb run across resumes and requeues (issue 26): the run id saved in output_dir is
passed back with resume="allow", so the offline run folders of a run resumed once decode to one
id with every step logged once; a fresh run with --overwrite true starts a new id."""

import glob
import os

from test_training import tiny as _tiny
from wandb_offline import read_run

from unet.config import FIELDS
from unet.train.loop import train
from unet.train.tracking import RUN_ID_FILE


def tiny(out, **kw):
    """test_training's seconds-long run, without the in-training sample-quality measurement."""
    return _tiny(out, **{**({"fid_every": 0} if "fid_every" in FIELDS else {}), **kw})


def offline_runs(out):
    """(run id, logged train steps) of every offline run folder, oldest first (not wandb's latest-run link):
    by when each run's file was last written (a run is finished before the next starts), since two
    short runs can start within the second that names their folders."""
    files = sorted(glob.glob(os.path.join(out, "wandb", "offline-run-*", "run-*.wandb")), key=os.path.getmtime)
    return [(r.run_id, [h["_step"] for h in r.history if "train/loss" in h]) for r in map(read_run, files)]


def test_a_resumed_run_continues_the_same_wandb_run_and_overwrite_starts_a_new_one(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", os.devnull)  # not this machine's `wandb login`: the runs go offline
    out = str(tmp_path / "run")
    cfg = tiny(out, max_steps=3, checkpoint_every=3, report_to="wandb", dropout=0.0)
    train(cfg)
    train(cfg.replace(max_steps=6, resume="latest"))
    runs = offline_runs(out)
    assert len(runs) == 2 and len({rid for rid, _ in runs}) == 1
    steps = [s for _, logged in runs for s in logged]
    assert steps == [1, 2, 3, 4, 5, 6]  # each step once, in order
    with open(os.path.join(out, RUN_ID_FILE)) as f:
        assert f.read().strip() == runs[0][0]
    train(cfg.replace(max_steps=2, overwrite=True))
    fresh = offline_runs(out)[-1]
    assert fresh[0] != runs[0][0] and fresh[1] == [1, 2]

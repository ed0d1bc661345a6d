"""A checkpoint written before manifests: refused for sampling with a line that names the fix, and
loadable again once scripts/add_manifest.py has given it one."""

import os
import subprocess
import sys

import pytest

from unet.checkpoint.load import CheckpointError, load_checkpoint
from unet.config import TrainConfig
from unet.train.loop import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_add_manifest_makes_an_old_checkpoint_load_again(tmp_path):
    cfg = TrainConfig(max_steps=2, batch_size=8, num_res_blocks=1, diffusion_steps=20, report_to="none",
                      progress=False, eval_every=0, diagnostics_every=0, sample_every=-1, fid_every=0,
                      output_dir=str(tmp_path / "run"))
    ckpt = train(cfg)["checkpoint"]
    before = load_checkpoint(ckpt).model.state_dict()
    os.remove(os.path.join(ckpt, "manifest.json"))  # as a checkpoint of 0.2.0 was written
    with pytest.raises(CheckpointError, match="scripts/add_manifest.py"):
        load_checkpoint(ckpt)
    script = os.path.join(ROOT, "scripts", "add_manifest.py")
    r = subprocess.run([sys.executable, script, ckpt], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "manifest.json" in r.stdout, r.stderr
    after = load_checkpoint(ckpt).model.state_dict()
    assert all((before[k] == after[k]).all() for k in before)
    again = subprocess.run([sys.executable, script, ckpt], capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "already has" in again.stderr

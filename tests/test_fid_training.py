"""Sample quality during training: ``eval/fid`` in the offline wandb run (decoded), in the
history and the checkpoint's state; the best pointer moving only when FID falls; a bad
reference refused before training; the end-of-run block; and ``evaluate.py fid`` giving the
same numbers with two processes as with one."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from cli_errors import refused
from wandb_offline import read_run

from unet.checkpoint.load import load_checkpoint
from unet.cli import train as train_script
from unet.cli.evaluate import main as evaluate_main
from unet.config import TrainConfig
from unet.train import quality
from unet.train.loop import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(max_steps=4, batch_size=8, num_res_blocks=1, diffusion_steps=20, fid_every=2, fid_num_samples=24,
             kid_subset_size=12, fid_steps=3, fid_batch_size=24, sample_every=-1, eval_every=2, diagnostics_every=0,
             checkpoint_every=0, progress=False)


@pytest.fixture(scope="module")
def fid_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fid_run")
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        cfg = TrainConfig(output_dir=str(out), keep_best_fid=True, report_to="wandb", **SMALL)
        result = train(cfg)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return out, result


def test_fid_every_logs_to_wandb_history_and_checkpoint(fid_run, capsys):
    out, result = fid_run
    logged = [h for h in read_run(str(out / "wandb")).history if "eval/fid" in h]
    assert [h["_step"] for h in logged] == [2, 4]
    for h in logged:
        assert h["eval/fid"] >= 0 and h["eval/kid_std"] >= 0 and 0 <= h["eval/precision"] <= 1
        assert 0 <= h["eval/judge_accuracy"] <= 1
        # Judge features against the held-out split: eval/fid and the judge's distance are one number.
        assert h["eval/judge_fd"] == pytest.approx(h["eval/fid"], rel=1e-9)
        assert h["eval/judge_fd_floor"] > 0  # the real-vs-real floor beside every distance
    rows = {r["step"]: r for r in result["history"] if "eval/fid" in r}
    assert [rows[h["_step"]]["eval/fid"] for h in logged] == [h["eval/fid"] for h in logged]
    with open(os.path.join(result["checkpoint"], "train_state.json")) as f:
        saved = json.load(f)["quality"]
    assert [r["eval/fid"] for r in saved["history"]] == [h["eval/fid"] for h in logged]
    # The best pointer: the step of the lowest FID, a loadable copy of that step's checkpoint.
    best = min(logged, key=lambda h: (h["eval/fid"], h["_step"]))
    with open(out / "best" / "best.json") as f:
        kept = json.load(f)
    assert kept["step"] == best["_step"] == saved["best_step"] and kept["fid"] == best["eval/fid"]
    assert kept["checkpoint"].endswith(f"checkpoint_{best['_step']:08d}")
    assert load_checkpoint(str(out / "best")).config["max_steps"] == 4


def test_best_pointer_moves_only_when_fid_falls(monkeypatch):
    fids = iter([5.0, 3.0, 4.0, 2.0, 2.0])
    monkeypatch.setattr(quality, "measure", lambda run: {"eval/fid": next(fids)})
    run = SimpleNamespace(cfg=SimpleNamespace(fid_every=1, keep_best_fid=True, fid_num_samples=2),
                          accelerator=SimpleNamespace(log=lambda *a, **k: None), log=lambda *a: None,
                          quality=quality.Quality(extractor=None, reference=None))
    state = SimpleNamespace(history=[{}])
    moved = [quality.maybe_measure(run, state, step) for step in range(1, 6)]
    assert moved == [True, True, False, True, False]
    assert (run.quality.best_fid, run.quality.best_step) == (2.0, 4)
    run.cfg.keep_best_fid = False  # measured and recorded, nothing kept
    fids = iter([1.0])
    monkeypatch.setattr(quality, "measure", lambda run: {"eval/fid": next(fids)})
    assert quality.maybe_measure(run, state, 6) is False and run.quality.best_step == 6


def test_the_run_ends_with_a_summary_block(tmp_path, capsys):
    train(TrainConfig(output_dir=str(tmp_path), report_to="none", **SMALL))
    out = capsys.readouterr().out
    block = out[out.index("--- run ended (max_steps): step 4 of 4"):].splitlines()
    assert block[1].startswith("held-out loss (fixed batch): EMA ") and ", raw " in block[1]
    assert block[2].startswith("sample quality at step 4 (24 samples): fid ") and "judge_accuracy" in block[2]
    assert block[3].startswith("measuring sample quality took ") and block[4].startswith("lowest FID ")
    # each measurement is also a line of the log as it happens
    lines = [ln for ln in out[:out.index("--- run ended")].splitlines() if ": sample quality (24 samples, " in ln]
    assert [ln.split(":")[0] for ln in lines] == ["step 2", "step 4"] and all(" judge_fd " in ln for ln in lines)
    assert block[5] == f"checkpoint: {tmp_path}/checkpoints/checkpoint_00000004"


def test_a_bad_reference_is_refused_before_training(tmp_path, capsys):
    np.savez(tmp_path / "big.npz", np.zeros((20, 16, 16, 1), np.uint8))
    np.savez(tmp_path / "rgb.npz", np.zeros((20, 8, 8, 3), np.uint8))
    (tmp_path / "bad.npz").write_text("not a zip")
    base = ["--output_dir", str(tmp_path / "run"), "--report_to", "none", "--max_steps", "4", "--fid_every", "2"]
    for argv, words in ((["--fid_ref", str(tmp_path / "none.npz")], "reference not found"),
                        (["--fid_ref", str(tmp_path / "bad.npz")], "cannot read reference"),
                        (["--fid_ref", str(tmp_path / "big.npz")], "reference images are 16x16x1, the samples 8x8x1"),
                        (["--fid_ref", str(tmp_path / "rgb.npz")], "reference images are 8x8x3, the samples 8x8x1"),
                        (["--fid_num_samples", "1"], "'fid_num_samples'"),
                        (["--kid_subset_size", "200"], "the reference has only 180 images")):
        capsys.readouterr()
        assert train_script.main(base + argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err
        assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_two_processes_give_the_fid_of_one(fid_run, tmp_path, capsys):
    out, _ = fid_run
    evaluate_main(["ref", "--data", "configs/digits.yaml", "--out", str(tmp_path / "ref.npz")])
    args = ["fid", "--checkpoint", str(out), "--ref", str(tmp_path / "ref.npz"), "--num_samples", "30", "--steps",
            "3", "--batch_size", "8", "--json"]
    capsys.readouterr()
    evaluate_main(args)
    one = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "evaluate.py", *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads(r.stdout.strip().splitlines()[-1])
    assert one["processes"] == 1 and two["processes"] == 2
    for key in ("fid", "kid", "kid_std", "precision", "recall", "judge_accuracy", "judge_fd"):
        assert two[key] == pytest.approx(one[key], rel=1e-9, abs=1e-12), key
    assert two["n"] == one["n"] == 30
    assert "between 2 and" in refused(evaluate_main, [*args[:-1], "--kid_subset_size", "31"], capsys)


def test_an_inception_download_that_fails_is_one_line_and_training_goes_on(tmp_path, monkeypatch, capsys):
    """``fid_download_inception`` with no network: the real download (to a closed local port, as an
    offline machine refuses it) fails once, in one line; the run trains without measuring."""
    import functools

    import torch

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))  # an empty cache
    real = quality.ensure_inception_weights
    monkeypatch.setattr(quality, "ensure_inception_weights",
                        functools.partial(real, url="http://127.0.0.1:9/pt_inception.pth", timeout=5))
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=2, batch_size=8, num_res_blocks=1,
                      diffusion_steps=20, report_to="none", progress=False, eval_every=0, sample_every=-1,
                      diagnostics_every=0, fid_every=1, fid_features="inception", fid_download_inception=True)
    summary = train(cfg)
    assert summary["steps"] == 2 and summary["stop_reason"] == "max_steps"
    out = capsys.readouterr().out
    tried = [line for line in out.splitlines() if line.startswith("downloading the Inception weights")]
    failed = [line for line in out.splitlines() if "Inception" in line and "could not" in line.lower()]
    assert len(tried) == 1 and len(failed) == 1, out
    from unet.evaluation.fid import INCEPTION_FILE

    assert not (tmp_path / "hub" / "checkpoints" / INCEPTION_FILE).exists()  # no partial file left
    assert "this run logs no eval/fid" in out

"""Nothing lost, part two (issue 34): the guarantees with real faults (a full tmpfs, the errors
torch and safetensors really raise, two real processes on one folder, a real signal), one owner
per run folder, and a checkpoint that is a checked format (its manifest, its state's schema)."""

import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from checkpoint_files import write_checkpoint
from cli_errors import refused
from PIL import Image
from safetensors.torch import load_file, save_file
from test_bad_input import tree_digest
from test_training import ROOT, nan_diffusion, subprocess_env, tiny

from unet.checkpoint.format import MANIFEST_FILE, CheckpointError, read_manifest, verify_files, write_manifest
from unet.checkpoint.load import load_checkpoint
from unet.checkpoint.phema import snapshot_profiles
from unet.cli import ablation as ablation_script
from unet.cli import phema as phema_script
from unet.cli import sample as sample_script
from unet.cli import train as train_script
from unet.config import ConfigError, TrainConfig, load_config
from unet.core.model import UNetModel
from unet.data.dataset import decode_image
from unet.evaluation.metrics import Reference, ReferenceError, save_reference
from unet.train import checkpoint as ckpt_mod
from unet.train.loop import train


def error_line(capsys):
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def checkpoints(out):
    root = os.path.join(out, "checkpoints")
    return sorted(os.listdir(root)) if os.path.isdir(root) else []


@pytest.fixture(scope="module")
def phema_run(tmp_path_factory):
    """A 4-step tiny run with post-hoc EMA snapshots every step (checkpoints at 2 and 4)."""
    out = tmp_path_factory.mktemp("phema") / "run"
    train(tiny(out, max_steps=4, phema_every=1))
    return str(out)


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """A hand-written checkpoint (weights, EMA, config with absolute local paths, manifest) of an
    8x8 model, no training: (the run folder, the checkpoint folder, its config)."""
    root = tmp_path_factory.mktemp("small") / "run"
    cfg = TrainConfig(image_size=8, channel_mult=[1, 2], attention_resolutions=[4], num_res_blocks=1, num_heads=1,
                      diffusion_steps=50, init="standard", report_to="none", output_dir=str(root),
                      cache_dir=str(root / "cache"))
    torch.manual_seed(0)
    return str(root), str(write_checkpoint(root, cfg, UNetModel(**cfg.model_kwargs()).eval())), cfg


def copy_tree(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return str(dst)


# --- 1. phema.py --out into a training checkpoint ----------------------------------------

def test_phema_out_into_a_training_checkpoint_is_refused_and_changes_nothing(phema_run, tmp_path, capsys):
    run = copy_tree(phema_run, tmp_path / "run")
    before = tree_digest(run)
    latest = os.path.join(run, "checkpoints", checkpoints(run)[-1])
    for out in (latest, run):
        line = refused(phema_script.main, ["--checkpoint", run, "--sigma_rel", "0.07", "--out", out], capsys)
        assert "is a training checkpoint or run folder" in line
    assert tree_digest(run) == before
    # a new folder is written, verified by its manifest, and loads
    phema_script.main(["--checkpoint", run, "--sigma_rel", "0.07", "--out", str(tmp_path / "p")])
    verify_files(str(tmp_path / "p"), read_manifest(str(tmp_path / "p")))
    assert load_checkpoint(str(tmp_path / "p")).image_size == 8
    train(tiny(run, max_steps=6, phema_every=1, resume="auto"))  # the run still resumes


# --- 2. an empty config.yaml -------------------------------------------------------------

def test_an_emptied_config_yaml_is_one_line_for_sample_export_and_resume(phema_run, tmp_path, capsys):
    run = copy_tree(phema_run, tmp_path / "run")
    latest = os.path.join(run, "checkpoints", checkpoints(run)[-1])
    open(os.path.join(latest, "config.yaml"), "w").close()
    line = refused(sample_script.main, ["--checkpoint", run, "--out", str(tmp_path / "s")], capsys)
    assert "config.yaml is 0 bytes, its manifest says" in line
    from unet.cli import export as export_script
    line = refused(export_script.main, [run, str(tmp_path / "e")], capsys)
    assert "config.yaml is 0 bytes" in line
    cfg = tiny(run, max_steps=6, phema_every=1, resume="auto")
    with pytest.raises(CheckpointError, match="config.yaml is 0 bytes"):
        train(cfg)
    # without a manifest to catch it, the reader itself refuses an empty file
    os.remove(os.path.join(latest, MANIFEST_FILE))
    with pytest.raises(CheckpointError, match="config.yaml is empty"):
        train(cfg)


# --- 3. a real full disk ---------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 30 MiB tmpfs (root only): writes past it fail as on a full disk."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=30m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("tmpfs mount refused here")
    yield str(mnt)
    subprocess.run(["umount", "-l", str(mnt)])


def test_a_real_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(small_disk, capsys):
    out = os.path.join(small_disk, "run")
    argv = ["--output_dir", out, "--max_steps", "5", "--batch_size", "8", "--num_res_blocks", "1",
            "--diffusion_steps", "20", "--report_to", "none", "--progress", "false", "--checkpoint_every", "1",
            "--keep_checkpoints", "2", "--log_every", "1", "--diagnostics_every", "0", "--eval_every", "0",
            "--sample_every", "-1", "--warmup_steps", "2", "--fid_every", "0"]
    assert train_script.main(argv) == 1
    line = error_line(capsys)
    assert line.startswith("error: cannot write checkpoint") and "the previous checkpoint" in line, line
    left = checkpoints(out)
    assert left and all(n.startswith("checkpoint_") for n in left), left  # no .tmp-* on the full disk
    kept = os.path.join(out, "checkpoints", left[-1])
    verify_files(kept, read_manifest(kept))  # what is listed is whole
    load_checkpoint(out)


def test_a_real_full_disk_while_writing_a_phema_snapshot_is_one_line(small_disk, capsys):
    out = os.path.join(small_disk, "run")
    argv = ["--output_dir", out, "--max_steps", "40", "--batch_size", "8", "--num_res_blocks", "1",
            "--diffusion_steps", "20", "--report_to", "none", "--progress", "false", "--checkpoint_every", "0",
            "--phema_every", "1", "--diagnostics_every", "0", "--eval_every", "0", "--sample_every", "-1",
            "--fid_every", "0"]
    assert train_script.main(argv) == 1
    line = error_line(capsys)
    assert "cannot write post-hoc EMA snapshot" in line and "earlier snapshots are kept" in line, line
    names = os.listdir(os.path.join(out, "phema"))
    assert names and not [n for n in names if n.endswith(".tmp")]
    assert snapshot_profiles(out)  # every snapshot left reads


@pytest.mark.skipif(os.geteuid() == 0, reason="as root the tmpfs tests above make a real full disk")
def test_a_file_size_limit_while_checkpointing_is_one_line(tmp_path):
    """Without root, a real write failure from a file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored):
    torch.save and safetensors fail as on a full disk."""
    out = str(tmp_path / "run")
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20)); import train; "
            "sys.exit(train.main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "--output_dir", out, "--max_steps", "2", "--batch_size", "8",
                        "--num_res_blocks", "1", "--diffusion_steps", "20", "--report_to", "none", "--progress",
                        "false", "--sample_every", "-1", "--fid_every", "0", "--eval_every", "0"],
                       cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 1 and len(lines) == 1 and "cannot write checkpoint" in lines[0], r.stderr[-2000:]
    assert checkpoints(out) == []  # the temporary folder removed


# --- 4. FID references -------------------------------------------------------------------

class FakeExtractor:
    name, image_shape = "fake", (8, 8, 1)

    def features(self, images):
        return np.zeros((len(images), 4))


@pytest.mark.parametrize("make, words", [
    (lambda p: save_reference(p, Reference("fake", (8, 8, 1), np.array([[np.nan] * 4, [0.0] * 4]))), "non-finite"),
    (lambda p: save_reference(p, Reference("fake", (8, 8, 1), np.ones((5, 3)))), "3 wide"),
    (lambda p: np.savez(p, format=1, extractor="fake", image_shape=np.array([8, 8, 1]), features=np.ones(5)),
     "[N x D]"),
    (lambda p: open(p, "wb").write(b"PK\x03\x04truncated"), "cannot read reference"),
    (lambda p: np.save(open(p, "wb"), np.ones((4, 4))), "not an .npz archive"),
], ids=["nan", "width", "1-d", "truncated", "npy"])
def test_a_bad_fid_reference_is_one_line(tmp_path, make, words):
    from unet.evaluation.fid import reference_from

    path = str(tmp_path / "ref.npz")
    make(path)
    with pytest.raises(ReferenceError, match=None) as e:
        reference_from(path, FakeExtractor())
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_truncated_fid_reference_stops_training_before_the_first_step(tmp_path, capsys):
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.zeros((8, 8, 8, 1), np.uint8))
    ref.write_bytes(ref.read_bytes()[:100])  # truncated mid-archive
    cfg = tiny(tmp_path / "run", max_steps=3, fid_every=2, fid_ref=str(ref), fid_features="judge")
    cfg.save(tmp_path / "c.yaml")
    assert train_script.main(["--config", str(tmp_path / "c.yaml")]) == 2
    assert "fid_ref" in error_line(capsys) and checkpoints(str(tmp_path / "run")) == []


# --- 5. one owner per folder --------------------------------------------------------------

def test_a_second_run_into_a_live_output_dir_is_refused_until_the_first_dies(tmp_path, capsys):
    out = str(tmp_path / "run")
    first = subprocess.Popen(
        [sys.executable, "train.py", "--output_dir", out, "--max_steps", "100000", "--batch_size", "8",
         "--num_res_blocks", "1", "--diffusion_steps", "20", "--report_to", "none", "--progress", "false",
         "--checkpoint_every", "0", "--diagnostics_every", "0", "--eval_every", "0", "--sample_every", "-1",
         "--fid_every", "0", "--cpu_threads", "1"],
        cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = os.path.join(out, ".lock")
        deadline = time.monotonic() + 180
        while not (os.path.isfile(lock) and f"process {first.pid} " in open(lock).read()):
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took its lock"
            time.sleep(0.2)
        argv = ["--output_dir", out, "--max_steps", "2", "--batch_size", "8", "--num_res_blocks", "1",
                "--diffusion_steps", "20", "--report_to", "none", "--progress", "false", "--resume", "auto",
                "--sample_every", "-1", "--fid_every", "0", "--lr", "5e-3"]
        assert train_script.main(argv) == 2
        line = error_line(capsys)
        assert f"is in use by process {first.pid} " in line and "one run writes a folder at a time" in line
    finally:
        first.kill()
        first.wait()
    assert train_script.main(argv) == 0  # the lock died with its process: no stale lock to remove by hand
    assert checkpoints(out) == ["checkpoint_00000002"]


def test_a_second_ablation_into_a_live_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "ab"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from unet.train.checkpoint import RunLock\n"
        f"with RunLock({str(out)!r}, 'x'):\n    print('held', flush=True); time.sleep(600)")],
        cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        rc = ablation_script.main(["--config", os.path.join(ROOT, "configs/ablation/digits_quick.yaml"),
                                   "--output_dir", str(out)])
        assert rc == 1 and "the ablation's output folder" in error_line(capsys)
        assert sorted(os.listdir(out)) == [".lock"]  # nothing trained or deleted
    finally:
        holder.kill()
        holder.wait()


# --- 6. a stop signal goes before optional work -------------------------------------------

def test_a_stop_signal_checkpoints_before_the_sample_grid_and_fid(tmp_path, monkeypatch):
    import unet.train.loop as loop

    measured = []
    real_measure = loop.quality.maybe_measure
    monkeypatch.setattr(loop.quality, "maybe_measure", lambda run, state, step: measured.append(step)
                        or real_measure(run, state, step))
    hook = lambda step, row, model: step == 3 and os.kill(os.getpid(), signal.SIGTERM)  # noqa: E731
    s = train(tiny(tmp_path, max_steps=6, sample_every=3, checkpoint_every=0), hooks=[hook], stop_signals=True)
    assert s["stop_reason"] == "preempted" and s["steps"] == 3
    assert s["checkpoint"].endswith("checkpoint_00000003")
    assert not os.path.exists(tmp_path / "samples" / "samples_00000003.png")  # the grid waits for the resume
    assert measured == [1, 2]  # no FID measurement at the signalled step


# --- 7. a non-finite loss on the last step ------------------------------------------------

def test_a_non_finite_last_step_saves_the_last_good_weights_and_exits_3(monkeypatch, tmp_path, capsys):
    nan_diffusion(monkeypatch, {3})
    cfg = tiny(tmp_path, max_steps=3, checkpoint_every=2)
    cfg.save(tmp_path / "c.yaml")
    assert train_script.main(["--config", str(tmp_path / "c.yaml")]) == 3
    line = error_line(capsys)
    assert "the last step (3) had a non-finite loss" in line and "checkpoint_00000003" in line
    step2 = load_file(str(tmp_path / "checkpoints" / "checkpoint_00000002" / "model.safetensors"))
    step3 = load_file(str(tmp_path / "checkpoints" / "checkpoint_00000003" / "model.safetensors"))
    assert all(torch.equal(step2[k], step3[k]) for k in step2)  # the skipped step changed nothing
    assert json.load(open(tmp_path / "checkpoints" / "checkpoint_00000003" / "train_state.json"))["nan_skipped"] == 1


# --- 8. 16-bit and float images ----------------------------------------------------------

def test_16_bit_images_scale_by_their_range_and_float_images_are_refused(tmp_path):
    cfg = TrainConfig(image_size=8, channels=1, report_to="none")
    ramp = np.linspace(0, 65535, 8).round().astype(np.uint16)[None, :].repeat(8, 0)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, "PNG")
    x = decode_image({"bytes": buf.getvalue(), "path": None}, cfg)
    np.testing.assert_allclose(x[0, 0].numpy(), np.linspace(-1, 1, 8), atol=1e-3)  # not saturated at 255
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(buf, "TIFF")
    with pytest.raises(ValueError, match="has no fixed range"):
        decode_image({"bytes": buf.getvalue(), "path": None}, cfg)


# --- 9. the hub push ---------------------------------------------------------------------

def test_push_uploads_only_the_export_and_the_card_has_no_local_paths(small_checkpoint, tmp_path, monkeypatch):
    from huggingface_hub import HfApi
    from huggingface_hub.utils import filter_repo_objects

    from unet.cli import export as export_script

    uploaded = []

    def upload_folder(self, **kw):  # the hub client's own filter, as upload_folder applies it
        files = [os.path.relpath(os.path.join(d, f), kw["folder_path"]) for d, _, fs in os.walk(kw["folder_path"])
                 for f in fs]
        uploaded.extend(filter_repo_objects(files, allow_patterns=kw.get("allow_patterns")))

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: f"https://huggingface.co/{repo_id}")
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_not_sent")
    out = tmp_path / "pipe"
    out.mkdir()
    (out / ".env").write_text("HF_TOKEN=secret\n")
    (out / "notes.txt").write_text("private\n")
    root, _, cfg = small_checkpoint
    export_script.main([root, str(out), "--push_to_hub", "--hub_model_id", "someone/m"])
    assert ".env" not in uploaded and "notes.txt" not in uploaded and "README.md" in uploaded
    card = (out / "README.md").read_text()
    for key in ("output_dir", "data_dir", "cache_dir", "fid_ref"):
        assert f"{key}:" not in card
    assert cfg.output_dir not in card and cfg.cache_dir not in card


# --- 10. checkpoint contents validated -----------------------------------------------------

@pytest.fixture(scope="module")
def run4(tmp_path_factory):
    out = tmp_path_factory.mktemp("run4") / "run"
    train(tiny(out, max_steps=4))
    return str(out)


def damage_state(edit):
    def apply(ckpt):
        path = os.path.join(ckpt, "train_state.json")
        state = json.load(open(path))
        json.dump(edit(state), open(path, "w"))
    return apply


def reshape_ema(ckpt):
    path = os.path.join(ckpt, "ema_0.999.safetensors")
    state = load_file(path)
    key = next(k for k in state if state[k].ndim == 4)
    save_file({**state, key: torch.zeros(1, *state[key].shape[1:])}, path)


def flip_a_bit(ckpt):
    path = os.path.join(ckpt, "model.safetensors")
    data = bytearray(open(path, "rb").read())
    data[-5] ^= 0x01
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("damage, words", [
    (damage_state(lambda s: {**s, "step": "3"}), "key 'step' is '3', expected int"),
    (damage_state(lambda s: {k: v for k, v in s.items() if k != "sampler"}), "has no 'sampler'"),
    (damage_state(lambda s: [s]), "holds a list, not a mapping"),
    (reshape_ema, "ema_0.999.safetensors does not match the model config: wrong shape"),
    (flip_a_bit, "model.safetensors does not match its sha256"),
], ids=["step-string", "missing-key", "list", "ema-shape", "bit-flip"])
def test_a_damaged_checkpoint_is_one_line_naming_the_file_and_nothing_is_lost(run4, tmp_path, damage, words,
                                                                              capsys):
    run = copy_tree(run4, tmp_path / "run")
    ckpt = os.path.join(run, "checkpoints", checkpoints(run)[-1])
    damage(ckpt)
    if damage is not flip_a_bit:
        # A writer that got it wrong (or an edit with the manifest redone): the manifest agrees,
        # so the schema and shape checks behind it are what must catch it.
        write_manifest(ckpt, read_manifest(ckpt)["architecture"])
    before = tree_digest(run)
    cfg = tiny(run, max_steps=6, resume="auto")
    cfg.save(tmp_path / "c.yaml")
    assert train_script.main(["--config", str(tmp_path / "c.yaml")]) == 1
    line = error_line(capsys)
    assert words in line, line
    after = tree_digest(run)
    assert {k: v for k, v in after.items() if k != ".lock"} == {k: v for k, v in before.items() if k != ".lock"}


def test_a_bit_flip_is_found_by_sample_too(run4, tmp_path, capsys):
    run = copy_tree(run4, tmp_path / "run")
    ckpt = os.path.join(run, "checkpoints", checkpoints(run)[-1])
    path = os.path.join(ckpt, "ema_0.999.safetensors")
    data = bytearray(open(path, "rb").read())
    data[-9] ^= 0x10
    open(path, "wb").write(bytes(data))
    line = refused(sample_script.main, ["--checkpoint", run, "--out", str(tmp_path / "s")], capsys)
    assert "ema_0.999.safetensors does not match its sha256" in line


def test_every_saved_part_is_restored_through_one_list(run4):
    """The symmetric list: what train_state.json holds is the TrainState and PARTS, each with a
    loader, and nothing else (a part saved but never restored would show up here)."""
    ckpt = os.path.join(run4, "checkpoints", checkpoints(run4)[-1])
    saved = set(json.load(open(os.path.join(ckpt, "train_state.json"))))
    state_keys = {"step", "nan_skipped", "nan_streak", "spikes", "divergence", "elapsed_seconds"}
    parts = {p.key for p in ckpt_mod.PARTS}
    assert all(callable(p.save) and callable(p.load) for p in ckpt_mod.PARTS)
    assert saved - state_keys - {"num_processes"} <= parts
    assert {"sampler", "ema_steps", "memory_format"} <= saved


# --- 11. other tracebacks where a line belongs -----------------------------------------------

def test_a_bad_config_yaml_for_sample_is_one_line(tmp_path, capsys):
    (tmp_path / "ema.pt").write_bytes(b"")
    (tmp_path / "flags.yaml").write_text("image_size: [16\n")
    line = refused(sample_script.main, ["--checkpoint", str(tmp_path / "ema.pt"), "--config",
                                        str(tmp_path / "flags.yaml"), "--out", str(tmp_path / "o")], capsys)
    assert "is not readable YAML" in line


def test_a_truncated_samples_npz_is_one_line(tmp_path, capsys):
    from unet.cli import evaluate as evaluate_script

    np.savez(tmp_path / "samples.npz", arr_0=np.zeros((4, 8, 8, 1), np.uint8))
    data = (tmp_path / "samples.npz").read_bytes()
    (tmp_path / "samples.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(SystemExit) as e:
        evaluate_script.main(["fid", "--samples", str(tmp_path / "samples.npz"), "--ref", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "cannot read samples" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("damage", ["truncate", "no-metadata"])
def test_a_corrupt_phema_snapshot_is_one_line(phema_run, tmp_path, damage, capsys):
    run = copy_tree(phema_run, tmp_path / "run")
    path = os.path.join(run, "phema", sorted(os.listdir(os.path.join(run, "phema")))[-1])
    if damage == "truncate":
        open(path, "r+b").truncate(100)
    else:
        save_file(load_file(path), path)  # the tensors without the profile metadata
    line = refused(phema_script.main, ["--checkpoint", run, "--sigma_rel", "0.07", "--out", str(tmp_path / "p")],
                   capsys)
    assert "post-hoc EMA snapshot" in line and os.path.basename(path) in line


def test_an_ablation_result_of_the_wrong_json_type_is_one_line(tmp_path):
    from unet.ablation.store import load_result

    cfg = TrainConfig(output_dir=str(tmp_path), report_to="none")
    (tmp_path / "result.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="not a run's result"):
        load_result(cfg)


def test_a_wrong_weights_file_names_what_does_not_match(small_checkpoint, tmp_path):
    from unet.checkpoint.load import load_weights

    _, ckpt, cfg = small_checkpoint
    other = UNetModel(**{**cfg.model_kwargs(), "model_channels": 64})
    with pytest.raises(CheckpointError) as e:
        load_weights(other, os.path.join(ckpt, "model.safetensors"))
    assert "does not match the model config: wrong shape" in str(e.value) and not str(e.value).endswith(":")


@pytest.mark.parametrize("text, words", [
    ("lr: 0.001\nlr: 0.01\n", "key 'lr' is given twice"),
    ("noise_schedule: linear\ndiffusion_steps: 20\n", "an integer > 20 with the linear noise_schedule"),
])
def test_yaml_duplicates_and_a_nan_schedule_are_refused(tmp_path, text, words):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=words):
        load_config(["--config", str(tmp_path / "c.yaml")])


def test_mixed_precision_no_unquoted_is_no(tmp_path):
    (tmp_path / "c.yaml").write_text("mixed_precision: no\nprogress: off\n")
    cfg = load_config(["--config", str(tmp_path / "c.yaml")])
    assert cfg.mixed_precision == "no" and cfg.progress is False
    assert yaml.safe_load("a: no") == {"a": False}  # what plain YAML 1.1 would have said


def test_the_stream_logs_skipped_images(tmp_path):
    from unet.data import streaming

    lines = []
    good = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(good, "PNG")
    cfg = TrainConfig(image_size=8, channels=1, class_cond=False, report_to="none")
    data = type("D", (), {})()
    data.skipped, data.stream = 0, dict(image_col="image", label_col=None, log=lines.append)
    loader = streaming.StreamBatches.__new__(streaming.StreamBatches)
    loader.data, loader.cfg, loader.per, loader.epoch = data, cfg, 1, 0
    examples = [{"image": {"bytes": b"not an image", "path": None}}, {"image": {"bytes": good.getvalue(),
                                                                                 "path": None}}]
    loader._epoch = lambda: iter(examples)
    next(iter(loader))
    assert data.skipped == 1 and lines and "skipped an image that does not decode (1 skipped" in lines[0]




# --- 12. what loading trusts ----------------------------------------------------------------

class Payload:
    """A pickle that would run a shell command when unpickled without restriction."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_malicious_pickle_is_refused_without_running(run4, tmp_path, capsys):
    run = copy_tree(run4, tmp_path / "run")
    ckpt = os.path.join(run, "checkpoints", checkpoints(run)[-1])
    marker = tmp_path / "ran"
    torch.save({"state": Payload(marker)}, os.path.join(ckpt, "optimizer.bin"))
    write_manifest(ckpt, read_manifest(ckpt)["architecture"])  # the manifest agrees: the unpickler must refuse
    cfg = tiny(run, max_steps=6, resume="auto")
    cfg.save(tmp_path / "c.yaml")
    assert train_script.main(["--config", str(tmp_path / "c.yaml")]) == 1
    assert "optimizer.bin is unreadable (UnpicklingError" in error_line(capsys)
    torch.save(Payload(marker), tmp_path / "ema.pt")
    line = refused(sample_script.main, ["--checkpoint", str(tmp_path / "ema.pt"), "--config", "--image_size 32",
                                        "--out", str(tmp_path / "o")], capsys)
    assert line.startswith("error: cannot read checkpoint") and "UnpicklingError" in line
    assert not marker.exists()

"""The bad-input table of train.py: every value that used to pass validation and crash later
(or be read as something else) is refused before any data or model work, with one line that
names the key and what it accepts, exit status 2, and the checkpoints already in output_dir
untouched. (No torch here: train.py reports these before importing it.)"""

import hashlib
import os
import subprocess
import sys

import pytest

from unet.cli import train as train_script
from unet.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (argv, words the one line must contain): issue 12 item 6, then others of the same kind
CASES = [
    (["--num_heads", "3"], ["'num_heads'", "divisor", "[64]"]),
    (["--num_heads", "64", "--channel_mult", "1,3"], ["'num_heads'", "[96]"]),
    (["--num_heads_upsample", "0"], ["'num_heads_upsample'", "-1", ">= 1"]),
    (["--num_heads", "2", "--num_heads_upsample", "3"], ["'num_heads_upsample'", "divisor"]),
    (["--channels", "2"], ["'channels'", "1 (greyscale) or 3 (RGB)"]),
    (["--channels", "4"], ["'channels'", "1 (greyscale) or 3 (RGB)"]),
    (["--diffusion_steps", "1"], ["'diffusion_steps'", ">= 2"]),
    (["--timestep_respacing", "abc"], ["'timestep_respacing'", "ddimN"]),
    (["--timestep_respacing", "ddim999"], ["'timestep_respacing'", "stride"]),
    (["--timestep_respacing", "2000"], ["'timestep_respacing'", "at most"]),
    (["--timestep_respacing", "10,0"], ["'timestep_respacing'", ">= 1"]),
    (["--sample_steps", "1"], ["'sample_steps'", ">= 2"]),
    (["--seed", "-1"], ["'seed'", "[0, 2^32)"]),
    (["--seed", "4294967296"], ["'seed'", "[0, 2^32)"]),
    (["--data_seed", "-2"], ["'data_seed'", "-1"]),
    (["--output_dir", ""], ["'output_dir'", "not empty"]),
    (["--output_dir", "   "], ["'output_dir'", "not empty"]),
    (["--dataset", ""], ["'dataset'", "digits"]),
    (["--max_steps", "1e400"], ["'max_steps'", "int", "1e400"]),
    (["--max_steps", "3e9"], ["'max_steps'", "< 2^31"]),
    (["--max_steps", "nan"], ["'max_steps'", "int"]),
    (["--lr", "inf"], ["'lr'", "finite"]),
    (["--lr", "nan"], ["'lr'", "finite"]),
    (["--lr", "-0.001"], ["'lr'", "> 0"]),
    (["--lr=-1e-3"], ["'lr'", "> 0"]),
    (["--lr", "-1e-3"], ["'lr'", "needs a value", "--lr=VALUE"]),
    (["--weight_decay", "inf"], ["'weight_decay'", "finite"]),
    (["--weight_decay", "nan"], ["'weight_decay'", "finite"]),
    (["--grad_clip", "-1"], ["'grad_clip'", ">= 0"]),
    (["--divergence_factor", "inf"], ["'divergence_factor'", "finite"]),
    (["--dropout", "1"], ["'dropout'", "[0, 1)"]),
    (["--eval_fraction", "nan"], ["'eval_fraction'", "[0, 1)"]),
    (["--ema_rates", "1"], ["'ema_rates'", "(0, 1)"]),
    (["--ema_rates", "nan"], ["'ema_rates'", "(0, 1)"]),
    (["--class_dropout_prob", "1"], ["'class_dropout_prob'", "[0, 1)"]),
    (["--class_dropout_prob", "0.1", "--class_cond", "false"], ["'class_dropout_prob'", "unconditional"]),
    (["--memory_format", "nchw"], ["'memory_format'", "channels_last", "contiguous", "auto"]),
    (["--channel_mult", "2,2"], ["'channel_mult'", "starting with 1"]),
    (["--channel_mult", "1,0"], ["'channel_mult'", ">= 1"]),
    (["--channel_mult", ""], ["'channel_mult'", ">= 1"]),
    (["--channel_mult", "1,2,2,2,2"], ["'image_size'", "multiple of 16"]),
    (["--image_size", "9"], ["'image_size'", "multiple of 2"]),
    (["--attention_resolutions", "2"], ["'attention_resolutions'", "[8, 4]"]),
    (["--batch_size", "0"], ["'batch_size'", ">= 1"]),
    (["--keep_checkpoints", "0"], ["'keep_checkpoints'", ">= 1"]),
    (["--num_heads", "0"], ["'num_heads'", ">= 1"]),
    (["--sample_every", "-2"], ["'sample_every'", "-1 (never)"]),
    (["--overwrite", "maybe"], ["'overwrite'", "true or false"]),
    (["--resume"], ["'resume'", "needs a value"]),
    (["--lr", "1", "--lr"], ["'lr'", "needs a value"]),
    (["--model-channel", "3"], ["unknown config key 'model_channel'", "did you mean 'model_channels'"]),
]


def tree_digest(folder):
    """Every file under ``folder`` with its size and SHA-256 (what "untouched" means here)."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


@pytest.fixture
def run_with_checkpoint(tmp_path):
    """An output_dir holding a (stand-in) checkpoint that no refusal may touch."""
    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint_00000010"
    ckpt.mkdir(parents=True)
    for name in ("model.safetensors", "config.yaml", "train_state.json", "optimizer.bin"):
        (ckpt / name).write_bytes(os.urandom(64))
    return tmp_path / "run"


def refused(argv, capsys):
    capsys.readouterr()
    rc = train_script.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err.strip()


@pytest.mark.parametrize("argv, words", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_value_is_one_line_exit_2_and_nothing_changes(argv, words, run_with_checkpoint, capsys):
    before = tree_digest(run_with_checkpoint)
    has_dir = "--output_dir" in argv
    err = refused(argv if has_dir else ["--output_dir", str(run_with_checkpoint), *argv], capsys)
    for w in words:
        assert w in err, (w, err)
    assert tree_digest(run_with_checkpoint) == before


YAML_CASES = [
    (b"1: 2\n", ["unknown config key '1'"]),
    (b"true: 2\n", ["unknown config key 'True'"]),
    (b"lr: 0.1\n\xff\xfe: 3\n", ["not UTF-8", "byte"]),
    (b"lr: [1, 2\n", ["not valid YAML"]),
    (b"- lr\n- 1\n", ["must be a mapping"]),
    (b"lr: {a: 1}\n", ["'lr'", "float"]),
    (b"channel_mult: [1, x]\n", ["'channel_mult'", "int"]),
    (b"max_steps: .inf\n", ["'max_steps'", "int"]),
    (b"lr: .nan\n", ["'lr'", "finite"]),
]


@pytest.mark.parametrize("text, words", YAML_CASES, ids=[repr(t) for t, _ in YAML_CASES])
def test_bad_yaml_is_one_line_exit_2_and_nothing_changes(text, words, run_with_checkpoint, tmp_path, capsys):
    before = tree_digest(run_with_checkpoint)
    (tmp_path / "c.yaml").write_bytes(text)
    err = refused(["--config", str(tmp_path / "c.yaml"), "--output_dir", str(run_with_checkpoint)], capsys)
    for w in words:
        assert w in err, (w, err)
    assert tree_digest(run_with_checkpoint) == before


def test_a_list_with_spaces_is_never_one_number():
    assert load_config(["--channel_mult", "1 2"]).channel_mult == [1, 2]  # was [12]
    assert load_config(["--channel_mult", "1, 2"]).channel_mult == [1, 2]
    assert load_config(["--ema_rates", "0.999 0.99"]).ema_rates == [0.999, 0.99]
    assert load_config(["--tags", "a b,c"]).tags == ["a b", "c"]  # strings split on commas only


@pytest.mark.parametrize("argv, word", [(["--num_heads", "3"], "'num_heads'"),
                                        (["--max_steps", "1e400"], "'max_steps'"),
                                        (["--output_dir", ""], "'output_dir'")])
def test_bad_value_through_the_script(argv, word, tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *argv], cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and word in r.stderr, r.stderr
    assert os.listdir(tmp_path) == []  # nothing created (the default output_dir is relative to here)

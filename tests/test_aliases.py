"""The names diffusers' and improved-diffusion's training scripts use: each alias gives exactly the
config its key gives, with one line saying so; a name whose meaning differs is refused with the
conversion; an unknown key's message is short and names the closest keys."""

import subprocess
import sys

import pytest
import yaml

from unet.config import ConfigError, load_config
from unet.config.aliases import REFUSED
from unet.config.train_config import ALIASES, VALUE_MAPS

# A value each aliased key accepts (the run is never started: only the config is built).
VALUES = {"image_size": "16", "lr": "0.002", "lr_schedule": "cosine", "warmup_steps": "7", "grad_accum": "2",
          "checkpoint_every": "9", "keep_checkpoints": "4", "resume": "auto", "max_steps": "11",
          "weight_decay": "0.1", "adam_eps": "1e-7", "data_dir": "some/folder", "dataset": "fashion_mnist",
          "diffusion_steps": "50", "report_to": "none", "num_workers": "0",
          "log_every": "3", "ema_rates": "0.99", "model_channels": "64"}


@pytest.mark.parametrize("alias", sorted(a for a in ALIASES if a not in VALUE_MAPS))
def test_each_alias_gives_the_config_its_key_gives(alias, capsys):
    key = ALIASES[alias]
    assert load_config([f"--{alias}", VALUES[key]]) == load_config([f"--{key}", VALUES[key]])
    assert load_config([f"--{alias}={VALUES[key]}"]) == load_config([f"--{key}", VALUES[key]])
    notes = [line for line in capsys.readouterr().err.splitlines() if alias in line]
    assert notes and f"'{alias}' is read as '{key}'" in notes[0]


def test_use_fp16_maps_to_mixed_precision():
    assert load_config(["--use_fp16", "True"]).mixed_precision == "fp16"
    assert load_config(["--use_fp16", "False"]).mixed_precision == "no"
    with pytest.raises(ConfigError, match="'use_fp16': expected true or false, got 'maybe'"):
        load_config(["--use_fp16", "maybe"])  # not silently "no"


def test_an_alias_in_the_config_file(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"learning_rate": 0.003, "num_channels": 32}))
    cfg = load_config(["--config", str(path)])
    assert (cfg.lr, cfg.model_channels) == (0.003, 32)
    assert "'learning_rate' is read as 'lr'" in capsys.readouterr().err
    # an alias and its key both set: refused, not silently one of them
    path.write_text(yaml.safe_dump({"learning_rate": 0.003, "lr": 0.001}))
    with pytest.raises(ConfigError, match="both 'lr' and 'learning_rate'"):
        load_config(["--config", str(path)])


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_a_name_whose_meaning_differs_is_refused_with_the_conversion(name):
    with pytest.raises(ConfigError) as e:
        load_config([f"--{name}", "8"])
    assert "\n" not in str(e.value) and name in str(e.value)
    if name == "train_batch_size":
        assert "batch_size = train_batch_size x the number of processes" in str(e.value)


def test_an_unknown_key_is_at_most_three_lines_with_the_closest_keys():
    run = subprocess.run([sys.executable, "train.py", "--lrr", "1"], capture_output=True, text=True, timeout=120)
    err = run.stderr.strip().splitlines()
    assert run.returncode == 2 and 1 <= len(err) <= 3, run.stderr
    assert "'lrr'" in err[-1] and "'lr'" in err[-1] and "batch_size" not in err[-1] and "--help" in err[-1]

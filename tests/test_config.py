"""The config schema: shipped files, command-line overrides, and one-line errors."""

import os
import re
import subprocess
import sys

import pytest

from unet.config import ConfigError, TrainConfig, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cfg_path(name):
    return os.path.join(ROOT, "configs", name)


def test_defaults_are_digits_yaml():
    # `accelerate launch train.py` with no arguments must run what configs/digits.yaml says.
    assert load_config([]) == load_config(["--config", cfg_path("digits.yaml")]) == TrainConfig()
    assert TrainConfig().dataset == "digits"


def test_digits_yaml_shows_every_key_in_the_dataclass_order():
    # One source of truth that a reader can see: the default run's file lists every key.
    import yaml

    with open(cfg_path("digits.yaml")) as f:
        keys = list(yaml.safe_load(f))
    assert keys == list(TrainConfig().to_dict())


def test_cifar10_is_the_papers_setup():
    cfg = load_config(["--config", cfg_path("cifar10.yaml")])
    assert (cfg.image_size, cfg.model_channels, cfg.num_res_blocks, cfg.dropout) == (32, 128, 3, 0.3)
    assert cfg.learn_sigma and not cfg.use_kl and cfg.rescale_learned_sigmas  # L_hybrid
    assert (cfg.noise_schedule, cfg.diffusion_steps, cfg.lr, cfg.batch_size) == ("cosine", 4000, 1e-4, 128)
    assert cfg.ema_rates == [0.9999]
    assert cfg.resume == "auto"  # a requeued or restarted job continues its run (docs/cluster.md)
    kw = cfg.model_kwargs()
    # attention at 16 and 8 pixels of a 32-pixel image are downsample factors 2 and 4
    assert kw["attention_resolutions"] == (2, 4) and kw["out_channels"] == 6
    assert cfg.diffusion_kwargs() == dict(steps=4000, learn_sigma=True, sigma_small=False, noise_schedule="cosine",
                                          use_kl=False, predict_xstart=False, rescale_timesteps=True,
                                          rescale_learned_sigmas=True, timestep_respacing="")


def test_imagenet64_loads():
    cfg = load_config(["--config", cfg_path("imagenet64.yaml")])
    assert cfg.model_kwargs()["attention_resolutions"] == (4, 8)
    assert cfg.channel_mult == [1, 2, 3, 4]
    assert cfg.resume == "auto"


def test_overrides_are_typed():
    cfg = load_config(["--config", cfg_path("cifar10.yaml"), "--lr", "2e-4", "--ema_rates", "0.9999,0.999",
                       "--class_cond", "false", "--max_steps=7", "--random_flip", "--tags", "a,b",
                       "--attention_resolutions", "8"])
    assert cfg.lr == 2e-4 and cfg.ema_rates == [0.9999, 0.999] and cfg.class_cond is False
    assert cfg.max_steps == 7 and cfg.random_flip is True and cfg.tags == ["a", "b"]
    assert cfg.model_kwargs()["attention_resolutions"] == (4,) and cfg.model_kwargs()["num_classes"] is None
    assert cfg.image_size == 32  # untouched keys keep the file's value


@pytest.mark.parametrize("argv, words", [
    (["--lrr", "1"], ["'lrr'", "did you mean 'lr'", "--help"]),
    (["--init", "he"], ["'init'", "zero|standard|zero-branches|zero-output|near-zero|kaiming|fixup|all-zero"]),
    (["--norm", "batch"], ["'norm'", "group|none"]),
    (["--mixed_precision", "fp8"], ["'mixed_precision'", "no|fp16|bf16"]),
    (["--report_to", "mlflow"], ["'report_to'", "wandb|tensorboard|none"]),
    (["--lr", "fast"], ["'lr'", "float"]),
    (["--max_steps", "0"], ["'max_steps'", ">= 1"]),
    (["--max_steps", "1.5"], ["'max_steps'", "int"]),
    (["--checkpoint_every", "-1"], ["'checkpoint_every'", ">= 0"]),
    (["--compile", "yes please"], ["'compile'", "true or false"]),
    (["--class_cond", "maybe"], ["'class_cond'", "true or false"]),
    (["--batch_size", "10", "--grad_accum", "4"], ["'batch_size'", "multiple of grad_accum"]),
    (["--attention_resolutions", "3"], ["'attention_resolutions'", "[8, 4]"]),
    (["--model_channels", "48"], ["'model_channels'", "multiple of 32"]),
    (["--ema_rates", "1.5"], ["'ema_rates'", "(0, 1)"]),
    (["--dataset", "imagefolder"], ["'data_dir'"]),
    (["--config", "no/such.yaml"], ["no/such.yaml", "does not exist"]),
    (["--lr"], ["'lr'", "needs a value"]),
])
def test_bad_input_is_one_line_naming_the_key(argv, words):
    with pytest.raises(ConfigError) as e:
        load_config(argv)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_unknown_key_in_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lr: 0.1\nbatchsize: 3\n")
    with pytest.raises(ConfigError, match=r"c.yaml.*'batchsize'.*did you mean 'batch_size'"):
        load_config(["--config", str(p)])


def test_dict_and_yaml_round_trip(tmp_path):
    cfg = load_config(["--config", cfg_path("cifar10.yaml"), "--tags", "x"])
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    cfg.save(tmp_path / "c.yaml")
    assert TrainConfig.load(str(tmp_path / "c.yaml")) == cfg
    assert load_config(["--config", str(tmp_path / "c.yaml")]) == cfg


def test_cli_rejects_before_anything_starts(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "train.py", "--output_dir", str(out), "--init", "nope"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "'init'" in lines[0] and "zero|standard" in lines[0]
    assert not out.exists()


def test_config_choices_mirror_the_package():
    """train_config.py lists the valid names without importing torch; they must stay the package's."""
    from unet.config import CHOICES
    from unet.core.init import INIT_SCHEMES
    from unet.core.model import NORMS
    from unet.core.resample import SCHEDULE_SAMPLERS

    assert CHOICES["init"] == INIT_SCHEMES
    assert CHOICES["norm"] == NORMS
    assert CHOICES["schedule_sampler"] == SCHEDULE_SAMPLERS


def test_help_lists_every_key_with_its_default():
    import dataclasses

    from unet.config import help_text

    text = help_text()
    flat = re.sub(r"(?<=\w)- ", "-", " ".join(text.split()))  # argparse wraps the lines, also after a hyphen
    fields = dataclasses.fields(TrainConfig)
    for f, following in zip(fields, [*fields[1:], None]):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        # the keys the dataset decides when unset say so after their default
        follows = " (follows --dataset when unset)" if f.name in ("output_dir", "image_size", "channel_mult",
                                                                 "attention_resolutions", "class_cond") else ""
        end = rf" --{following.name} " if following else "$"
        entry = re.search(rf" --{f.name} \S+ (.*?){end}", flat).group(1)
        assert re.search(rf"; default {re.escape(repr(default))}{re.escape(follows)}(;|$)", entry), (f.name, entry)
    # with a config file, its values are the defaults shown
    assert re.search(r"--lr FLOAT peak learning rate \(AdamW\); default 0.0001;",
                     " ".join(help_text(["--config", cfg_path("cifar10.yaml")]).split()))
    r = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == text + "\n"


def test_command_line_spellings():
    assert load_config(["--max-steps", "5", "--random_flip"]) == TrainConfig(max_steps=5, random_flip=True)
    assert load_config(["--random_flip", "false", "--sample_every", "-1"]) == TrainConfig(sample_every=-1)
    assert load_config(["--max_steps", "7", "--max_steps=8"]).max_steps == 8  # the last one wins
    with pytest.raises(ConfigError, match="^unexpected argument 'x'; use --key value"):
        load_config(["x"])


# --- each key declared once: the checks, help and aliases come from the declaration ----------

def _declared():
    from unet.config import META, TYPES

    return META, TYPES


def test_every_key_declares_a_help_line_that_help_prints():
    from unet.config import help_text

    meta, _ = _declared()
    text = re.sub(r"(?<=\w)- ", "-", " ".join(help_text().split()))  # argparse wraps the lines
    for name, m in meta.items():
        assert m["help"] and "\n" not in m["help"], name
        assert f"--{name} " in text and " ".join(m["help"].split()) in text, name
        for alias in m["aliases"]:
            assert f"--{alias}" in text, (name, alias)


def _outside(m, typ):
    """Values a key's declared range excludes: just below its least value (or the bound itself
    when that is open), and its upper bound; floats also nan and inf."""
    low = m["low"]
    out = [low] if m["open_low"] else [low - 1 if typ is int else low - 1e-6]
    if m["high"] is not None:
        out.append(m["high"])
    return out + ([float("nan"), float("inf")] if typ is float else [])


def _declared_ranges():
    meta, types = _declared()
    return [(k, v) for k, m in meta.items() if m["low"] is not None for v in _outside(m, types[k])]


@pytest.mark.parametrize("name,value", _declared_ranges(), ids=lambda x: str(x))
def test_a_value_outside_its_declared_range_is_refused_in_one_line(name, value):
    from unet.config.train_config import range_text

    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({name: value})
    got = _declared()[1][name](value)  # the value as the key's type: 0 for a float key reads 0.0
    assert str(e.value) == f"config key '{name}': got {got!r}, allowed: {range_text(name)}"


def test_declared_bounds_are_what_the_messages_say():
    from unet.config.train_config import range_text

    assert range_text("max_steps") == "an integer >= 1 and < 2^31"
    assert range_text("lr") == "a finite number > 0"
    assert range_text("weight_decay") == "a finite number >= 0"
    assert range_text("adam_beta2") == "a number in [0, 1)"
    assert TrainConfig.from_dict({"adam_beta2": 0.0}).adam_beta2 == 0.0  # a closed lower bound is allowed


def test_resume_rules_and_dataset_defaults_come_from_the_declarations():
    from unet.config import RESUME_CHANGEABLE
    from unet.config.train_config import FOLLOW_DATASET

    meta, _ = _declared()
    assert RESUME_CHANGEABLE == {k for k, m in meta.items() if m["resume"]}
    assert {"lr", "max_steps", "output_dir"} <= RESUME_CHANGEABLE
    assert not {"init", "model_channels", "seed", "batch_size", "mixed_precision"} & RESUME_CHANGEABLE
    assert set(FOLLOW_DATASET) == {"output_dir", "image_size", "channel_mult", "attention_resolutions", "class_cond"}

"""The factory: a TrainConfig builds its model and diffusion, and improved-diffusion's flags
become the TrainConfig of the same architecture, with the original's defaults."""

import pytest
import torch
import yaml

from unet.config import TrainConfig
from unet.train.factory import (
    architecture_from_config,
    config_from_iddpm_flags,
    create_diffusion_from_config,
    create_model,
    parse_flag_string,
)


def test_model_and_diffusion_from_a_train_config():
    cfg = TrainConfig(image_size=8, channel_mult=[1, 2], attention_resolutions=[4], diffusion_steps=20,
                      timestep_respacing="5", report_to="none")
    model = create_model(cfg)
    assert model.in_channels == 1 and model.num_classes == 10 and model.norm == "group"
    out = model(torch.zeros(2, 1, 8, 8), torch.tensor([0, 19]), y=torch.tensor([0, 9]))
    assert out.shape == (2, 2, 8, 8)  # learned sigma: mean and variance channels
    assert create_diffusion_from_config(cfg).num_timesteps == 5
    assert create_diffusion_from_config(cfg, timestep_respacing="").num_timesteps == 20


def test_cifar10_flags_give_the_papers_model():
    """The README's CIFAR-10 flags of improved-diffusion, with its defaults for the rest."""
    cfg = config_from_iddpm_flags(parse_flag_string(
        "--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3 "
        "--diffusion_steps 4000 --noise_schedule cosine"))
    m, d = cfg.model_kwargs(), cfg.diffusion_kwargs()
    assert (m["in_channels"], m["out_channels"], m["model_channels"], m["num_res_blocks"]) == (3, 6, 128, 3)
    assert m["channel_mult"] == (1, 2, 2, 2) and m["attention_resolutions"] == (2, 4)  # 16 and 8 px at 32 px
    assert m["num_heads"] == 4 and m["use_scale_shift_norm"] and m["num_classes"] is None and m["dropout"] == 0.3
    assert d["steps"] == 4000 and d["learn_sigma"] and d["rescale_timesteps"] and d["rescale_learned_sigmas"]


def test_class_conditional_flags_default_to_1000_classes():
    assert config_from_iddpm_flags(dict(image_size=64, class_cond=True)).model_kwargs()["num_classes"] == 1000
    assert config_from_iddpm_flags(dict(image_size=64, class_cond=True, num_classes=10)).num_classes == 10
    assert config_from_iddpm_flags(dict(image_size=64)).channel_mult == [1, 2, 3, 4]


@pytest.mark.parametrize("flags,message", [
    (dict(image_size=32, num_chanels=64), "unknown improved-diffusion flag"),
    (dict(image_size=128), "no channel_mult for image_size 128"),
])
def test_bad_flags_are_one_line_errors(flags, message):
    with pytest.raises(ValueError, match=message):
        config_from_iddpm_flags(flags)


def test_flag_strings_parse_like_the_original():
    assert parse_flag_string("--image_size 64 --learn_sigma True --use_kl f --channel_mult 1,2") == dict(
        image_size=64, learn_sigma=True, use_kl=False, channel_mult="1,2")
    with pytest.raises(ValueError, match="pairs"):
        parse_flag_string("--image_size")


def test_architecture_from_each_kind_of_config(tmp_path):
    ours = TrainConfig(report_to="none")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(ours.to_dict()))
    size, model, diffusion, cfg = architecture_from_config(str(tmp_path / "c.yaml"))
    assert cfg == ours and (size, model, diffusion) == (8, ours.model_kwargs(), ours.diffusion_kwargs())
    explicit = dict(image_size=8, model=dict(in_channels=1, model_channels=32, out_channels=1, num_res_blocks=1,
                                             attention_resolutions=[], channel_mult=[1]), diffusion=dict(steps=10))
    size, model, diffusion, cfg = architecture_from_config(explicit)
    assert cfg is None and model["channel_mult"] == (1,) and diffusion == dict(steps=10)
    assert isinstance(architecture_from_config("--image_size 32")[3], TrainConfig)
    with pytest.raises(FileNotFoundError, match="config not found"):
        architecture_from_config(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("flags", [
    dict(image_size=64),
    dict(image_size=32, num_channels=64, learn_sigma=True, class_cond=True, attention_resolutions="16",
         diffusion_steps=4000, noise_schedule="cosine", timestep_respacing="250"),
    dict(image_size=16, channel_mult="1,2", in_channels=1, num_classes=10, class_cond=True, use_kl=True),
])
def test_the_formats_reading_of_improved_diffusion_flags_matches_the_training_configs(flags):
    """unet.checkpoint reads an original .pt's flags without TrainConfig (it sits below training):
    the model and diffusion it builds are the ones config_from_iddpm_flags describes."""
    from unet.checkpoint.load import iddpm_architecture

    cfg = config_from_iddpm_flags(flags)
    size, model, diffusion = iddpm_architecture(flags)
    theirs = {k: v for k, v in cfg.model_kwargs().items() if k not in ("init", "norm")}
    assert (size, model, diffusion) == (cfg.image_size, theirs, cfg.diffusion_kwargs())

"""A trained model from disk, for sampling, evaluation and export: a checkpoint folder (or a
run's latest), checked against its manifest, or an original improved-diffusion ``.pt`` state
dict with the flags that describe it. Every failure is one line (``CheckpointError``)."""

import os
from dataclasses import dataclass

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file

from unet.core.diffusion import GaussianDiffusion, create_diffusion
from unet.core.model import UNetModel
from unet.utils.yamlfile import strict_load

from .format import (
    CONFIG_FILE,
    MODEL_FILE,
    STATE_FILE,
    CheckpointError,
    ema_filename,
    latest_checkpoint,
    one_line,
    read_config_mapping,
    read_manifest,
    verify_files,
)


@dataclass
class Loaded:
    """A model in eval mode with what is needed to sample from it, rebuild or export it.
    ``config`` is the checkpoint's ``config.yaml`` as a mapping (None for a ``.pt``)."""
    model: UNetModel
    model_kwargs: dict
    diffusion_kwargs: dict
    image_size: int
    config: "dict | None" = None
    null_label: "int | None" = None  # the "no label" class of label dropout, or None

    def diffusion(self, timestep_respacing: "str | None" = None):
        """The model's diffusion process (``timestep_respacing`` overrides the trained one)."""
        return diffusion_from_kwargs(self.diffusion_kwargs, timestep_respacing)


def diffusion_from_kwargs(diffusion_kwargs: dict, timestep_respacing: "str | None" = None) -> GaussianDiffusion:
    """The diffusion process of ``create_diffusion`` arguments (a checkpoint's record of them),
    with ``timestep_respacing`` overriding theirs when not None."""
    kwargs = dict(diffusion_kwargs)
    if timestep_respacing is not None:
        kwargs["timestep_respacing"] = timestep_respacing
    return create_diffusion(**kwargs)


def model_from_record(model_kwargs: dict) -> UNetModel:
    """The UNetModel of a manifest's ``model`` record (JSON lists back to tuples)."""
    kwargs = dict(model_kwargs)
    for key in ("attention_resolutions", "channel_mult"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    return UNetModel(**kwargs)


def ema_from_flags(raw: bool, ema_rate: "float | None") -> "bool | float":
    """``load_checkpoint``'s ``ema`` from the tools' ``--raw`` and ``--ema_rate`` flags."""
    return False if raw else (ema_rate if ema_rate is not None else True)


def weights_filename(ckpt: str, ema_rates: list, ema: "bool | float") -> str:
    """The weights file of checkpoint ``ckpt`` that ``ema`` (True, a rate, False) names."""
    if ema is False:
        return MODEL_FILE
    rate = ema_rates[0] if ema is True else float(ema)
    if rate not in ema_rates:
        raise CheckpointError(f"checkpoint '{ckpt}' has no EMA rate {rate:g} (it has {ema_rates})")
    return ema_filename(rate)


def find_checkpoint(path: str) -> str:
    """``path`` itself when it is a checkpoint folder, else the latest checkpoint of the run
    ``path`` is the output_dir of."""
    ckpt = path if os.path.isfile(os.path.join(path, STATE_FILE)) else latest_checkpoint(path)
    if ckpt is None:
        raise CheckpointError(f"no checkpoint in '{path}' (expected a checkpoint folder or checkpoints/checkpoint_*/)")
    return ckpt


def load_checkpoint(path: str, ema: "bool | float" = True, config: object = None, device: str = "cpu") -> Loaded:
    """
    Load a trained model from either format; every failure is a one-line ``CheckpointError``
    (or ``FileNotFoundError`` for a missing ``config`` file).

    :param path: a checkpoint folder (``.../checkpoint_00001000``), a run's output_dir (its
        latest checkpoint), or an improved-diffusion ``.pt`` state dict.
    :param ema: True for the first EMA rate, a float for that rate, False for the raw
        weights (``.pt`` files hold one set of weights: ignored).
    :param config: for ``.pt`` files, their architecture (see ``architecture_of``).
    """
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if os.path.isfile(path):
        return load_iddpm_checkpoint(path, config, device)
    ckpt = find_checkpoint(path)
    manifest = read_manifest(ckpt)
    arch = manifest["architecture"]
    name = weights_filename(ckpt, arch["ema_rates"], ema)
    verify_files(ckpt, manifest, [CONFIG_FILE, name])  # what this load reads, before it reads it
    cfg = read_config_mapping(ckpt)
    try:
        model = model_from_record(arch["model"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint '{ckpt}': {ckpt}/manifest.json describes no buildable model "
                              f"({one_line(e)})") from None
    file = os.path.join(ckpt, name)
    load_weights(model, file)
    return Loaded(model.to(device).eval(), arch["model"], arch["diffusion"], arch["image_size"], cfg,
                  arch.get("null_class_label"))


def load_weights(model: torch.nn.Module, file: str, device: str = "cpu") -> None:
    """A safetensors file into ``model``, strictly; a mismatch is one line saying how."""
    try:
        state = load_file(file, device=str(device))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"cannot load '{file}': {one_line(e)}") from None
    check_state_dict(model, state, file)
    model.load_state_dict(state)


def check_shapes(expected: dict, state_dict: dict, path: str) -> None:
    """Raise a one-line ``CheckpointError`` summarising how ``state_dict`` misses ``expected``
    ({name: shape}); torch's own message is many lines, and its first ends at a colon."""
    missing, unexpected = sorted(set(expected) - set(state_dict)), sorted(set(state_dict) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state_dict) if tuple(expected[k]) != tuple(state_dict[k].shape))
    if missing or unexpected or wrong:
        parts = [f"{name} {len(keys)} (e.g. {keys[0]})" for name, keys in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise CheckpointError(f"checkpoint {path} does not match the model config: {'; '.join(parts)}")


def check_state_dict(model: torch.nn.Module, state_dict: dict, path: str) -> None:
    """``check_shapes`` against ``model``'s state dict."""
    check_shapes({k: v.shape for k, v in model.state_dict().items()}, state_dict, path)


# --- the original improved-diffusion .pt --------------------------------------------------

# improved-diffusion's ``model_and_diffusion_defaults()``.
IDDPM_DEFAULTS = dict(image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
                      attention_resolutions="16,8", dropout=0.0, learn_sigma=False, sigma_small=False,
                      class_cond=False, diffusion_steps=1000, noise_schedule="linear", timestep_respacing="",
                      use_kl=False, predict_xstart=False, rescale_timesteps=True, rescale_learned_sigmas=True,
                      use_checkpoint=False, use_scale_shift_norm=True)
IDDPM_EXTRAS = {"channel_mult", "num_classes", "in_channels"}  # ours: what the original hard-codes
IDDPM_CHANNEL_MULT = {256: "1,1,2,2,4,4", 64: "1,2,3,4", 32: "1,2,2,2"}


def parse_flag_string(text: str) -> dict:
    """``"--image_size 64 --learn_sigma True"`` -> {"image_size": 64, "learn_sigma": True}."""
    tokens, flags = text.split(), {}
    if len(tokens) % 2:
        raise ValueError(f"flags must come in '--name value' pairs: {text!r}")
    for name, value in zip(tokens[::2], tokens[1::2]):
        if not name.startswith("--"):
            raise ValueError(f"expected a --flag, got {name!r}")
        try:
            flags[name[2:]] = yaml.safe_load(value) if value.lower() not in ("t", "f") else value.lower() == "t"
        except yaml.YAMLError:
            raise ValueError(f"flag --{name[2:]}: {value!r} is not a value") from None
    return flags


def _ints(value: object) -> list:
    """``"16,8"``, ``16`` or ``[16, 8]`` as a list of ints."""
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(v) for v in str(value).replace(" ", ",").split(",") if v]


def iddpm_flags(flags: dict) -> dict:
    """improved-diffusion's flags completed as its ``create_model_and_diffusion`` completes them:
    its defaults, 3 input channels, its channel multipliers by image size (``channel_mult``
    overrides); an unknown flag or a size without multipliers raises ``ValueError`` in one line."""
    unknown = set(flags) - set(IDDPM_DEFAULTS) - IDDPM_EXTRAS
    if unknown:
        raise ValueError(f"unknown improved-diffusion flag(s): {', '.join(sorted(unknown))}")
    f = {**IDDPM_DEFAULTS, "in_channels": 3, **flags}
    size = int(f["image_size"])
    if f.get("channel_mult") is None:
        if size not in IDDPM_CHANNEL_MULT:
            raise ValueError(f"improved-diffusion has no channel_mult for image_size {size}; add channel_mult to "
                             "the config")
        f["channel_mult"] = IDDPM_CHANNEL_MULT[size]
    return f


def iddpm_architecture(flags: dict) -> tuple:
    """
    improved-diffusion's flags -> (image_size, UNetModel kwargs, create_diffusion kwargs) as its
    ``create_model_and_diffusion`` builds them: its defaults, its channel multipliers by image
    size (``channel_mult`` overrides), 3 input channels and 1000 classes unless ``in_channels``
    / ``num_classes`` say otherwise. Raises ``ValueError`` in one line.
    """
    f = iddpm_flags(flags)
    size = int(f["image_size"])
    channels, learn_sigma = int(f["in_channels"]), bool(f["learn_sigma"])
    model = dict(in_channels=channels, model_channels=int(f["num_channels"]),
                 out_channels=channels * (2 if learn_sigma else 1), num_res_blocks=int(f["num_res_blocks"]),
                 attention_resolutions=tuple(size // r for r in _ints(f["attention_resolutions"])),
                 dropout=float(f["dropout"]), channel_mult=tuple(_ints(f["channel_mult"])),
                 num_classes=int(f.get("num_classes") or 1000) if f["class_cond"] else None,
                 use_checkpoint=bool(f["use_checkpoint"]), num_heads=int(f["num_heads"]),
                 num_heads_upsample=int(f["num_heads_upsample"]), use_scale_shift_norm=bool(f["use_scale_shift_norm"]))
    diffusion = dict(steps=int(f["diffusion_steps"]), learn_sigma=learn_sigma, sigma_small=bool(f["sigma_small"]),
                     noise_schedule=f["noise_schedule"], use_kl=bool(f["use_kl"]),
                     predict_xstart=bool(f["predict_xstart"]), rescale_timesteps=bool(f["rescale_timesteps"]),
                     rescale_learned_sigmas=bool(f["rescale_learned_sigmas"]),
                     timestep_respacing=str(f["timestep_respacing"] or ""))
    return size, model, diffusion


def config_mapping(config: object) -> dict:
    """A ``.pt`` file's config as a mapping: given as one, a ``"--flag value"`` string or a
    YAML/JSON file (a repeated key refused); one-line errors."""
    if isinstance(config, str):
        if config.lstrip().startswith("--"):
            config = parse_flag_string(config)
        elif not os.path.isfile(config):
            raise FileNotFoundError(f"config not found: {config}")
        else:
            try:
                with open(config, encoding="utf-8") as fh:
                    config = strict_load(fh)
            except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
                raise ValueError(f"config {config} is not readable YAML ({one_line(e)})") from None
    if not isinstance(config, dict):
        raise ValueError("the config must be a mapping")
    return config


def explicit_architecture(config: dict) -> "tuple | None":
    """(image_size, model kwargs, diffusion kwargs) of a mapping that gives them explicitly
    ({image_size, model, diffusion}), else None."""
    if isinstance(config.get("model"), dict) and "diffusion" in config and "image_size" in config:
        model = dict(config["model"])
        model["attention_resolutions"] = tuple(model.get("attention_resolutions", ()))
        model["channel_mult"] = tuple(model.get("channel_mult", (1, 2, 4, 8)))
        return int(config["image_size"]), model, dict(config["diffusion"])
    return None


def architecture_of(config: object) -> tuple:
    """
    (image_size, UNetModel kwargs, create_diffusion kwargs) of a ``.pt`` file's ``config``:
    improved-diffusion's flags (a dict, a YAML/JSON file of them, or a ``"--flag value"``
    string), a mapping with ``image_size`` and explicit ``model`` and ``diffusion`` kwargs, or
    such a tuple already built (e.g. by ``unet.train.factory.architecture_from_config`` from
    this package's config.yaml).
    """
    if isinstance(config, tuple):
        return config[:3]
    config = config_mapping(config)
    explicit = explicit_architecture(config)
    if explicit:
        return explicit
    if set(config) <= set(IDDPM_DEFAULTS) | IDDPM_EXTRAS:
        return iddpm_architecture(config)
    raise ValueError("a .pt file's config must be improved-diffusion's flags or {image_size, model, diffusion}; "
                     f"unknown keys: {', '.join(sorted(set(config) - set(IDDPM_DEFAULTS) - IDDPM_EXTRAS)[:5])}")


def load_iddpm_checkpoint(path: str, config: object, device: str = "cpu") -> Loaded:
    """An improved-diffusion ``.pt`` state dict (e.g. ``ema_0.9999_500000.pt``), read with
    ``weights_only=True``, into the architecture ``config`` describes."""
    if config is None:
        raise CheckpointError(
            f"{path} is an improved-diffusion state dict: pass --config with its model and diffusion flags"
        )
    try:
        image_size, model_kwargs, diffusion_kwargs = architecture_of(config)
    except ValueError as e:
        raise CheckpointError(f"--config for {path}: {one_line(e)}") from None
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unpickling failure means the file is not a usable checkpoint
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {one_line(e)}") from None
    if not isinstance(state_dict, dict) or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise CheckpointError(f"checkpoint {path} is not a state dict of tensors")
    model = UNetModel(**model_kwargs)
    check_state_dict(model, state_dict, path)
    model.load_state_dict(state_dict, strict=True)
    return Loaded(model.to(device).eval(), model_kwargs, diffusion_kwargs, image_size, None)

"""The training configuration: one typed dataclass, YAML files under ``configs/``,
every key overridable on the command line as ``--key value`` (an argparse parser generated
from the dataclass, the YAML's values as its defaults). YAML values and command-line strings
go through one typed parse (``parse_value``) and one check (``validate``). Nothing here
imports torch, so a bad flag fails in a second.

It also says what a configuration may hold: the allowed values of every key, the checks
between keys, and which keys a resumed run may change; a bad value is one line naming the key
and what it accepts.
"""

import argparse
import dataclasses
import difflib
import math
import os
import re
import sys
import typing
from dataclasses import dataclass, field

import yaml

from unet.core.choices import INIT_SCHEMES, LAYOUTS, NOISE_SCHEDULES, NORMS, SCHEDULE_SAMPLERS
from unet.core.respace import respacing_error
from unet.utils.yamlfile import strict_load

from .aliases import REFUSED

INT_LIMIT = 2 ** 31  # step counts and sizes beyond this overflow int32 indices and int64 positions
SEED_LIMIT = 2 ** 32  # numpy's seed range (accelerate's set_seed seeds numpy too)

# diffusers' get_scheduler names (its SchedulerType, tests/test_schedules.py checks them)
# without piecewise_constant, which needs rules no other key describes; and inverse_sqrt
# (EDM2's decay), which diffusers does not have (unet.train.setup.inverse_sqrt_factor).
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
                "inverse_sqrt")

# unet.sample.sampling.SCHEDULERS, written here so that the config stays torch-free (a test
# checks the two agree), and the feature spaces FID can be measured in.
FID_SCHEDULERS = ("ddpm", "ddim", "dpm-solver++", "dpm-solver++-sde", "unipc", "deis")
FID_FEATURES = ("auto", "judge", "inception")


def key(default, help, *, choices=None, low=None, high=None, open_low=False, allowed=None, resume=False,
        aliases=(), alias_values=None, follows_dataset=False):
    """
    One config key, declared once beside its field: the parser, the checks, the help, the aliases
    and the resume rule are all generated from what is said here.

    :param help: one line for ``--help``.
    :param choices: the values it may take.
    :param low: a number's least value (``open_low``: it must be above it); ``high``: the bound it
        stays below (an int's default: 2^31). ``allowed`` replaces the generated message.
    :param resume: a resumed run may change it (every other key describes what the checkpoint is).
    :param aliases: the names other training scripts give it; ``alias_values`` converts their
        boolean values to this key's words.
    :param follows_dataset: its default is the digits run's, replaced to fit another dataset.
    """
    if low is not None and high is None and isinstance(default, int) and not isinstance(default, bool):
        high = INT_LIMIT
    meta = dict(help=help, choices=choices, low=low, high=high, open_low=open_low, allowed=allowed, resume=resume,
                aliases=tuple(aliases), alias_values=alias_values, follows_dataset=follows_dataset)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Every setting of a training run. The defaults are ``configs/digits.yaml``: a small
    class-conditional U-Net on scikit-learn's bundled handwritten digits, sized for a CPU."""

    # --- run ---
    output_dir: str = key("outputs/digits", "the run folder: checkpoints, config.yaml, samples, logs",
                          resume=True, follows_dataset=True)
    max_steps: int = key(3000, "optimizer steps to train for", low=1, resume=True, aliases=("max_train_steps",))
    max_minutes: float = key(0.0, "stop after the first step ending past this many minutes of training; 0 = off",
                             low=0, resume=True)
    batch_size: int = key(64, "the global batch of one optimizer step, split over processes and grad_accum", low=1)
    grad_accum: int = key(1, "micro-batches per optimizer step (the batch is split, not multiplied)", low=1,
                          resume=True, aliases=("gradient_accumulation_steps",))
    lr: float = key(1e-3, "peak learning rate (AdamW)", low=0, open_low=True, resume=True,
                    aliases=("learning_rate",))
    weight_decay: float = key(0.0, "AdamW's decoupled weight decay", low=0, resume=True,
                              aliases=("adam_weight_decay",))
    warmup_steps: int = key(100, "linear lr warm-up steps", low=0, resume=True, aliases=("lr_warmup_steps",))
    grad_clip: float = key(1.0, "max global grad norm; 0 = no clipping (the norm is logged either way)", low=0,
                           resume=True)
    seed: int = key(0, "model init and dropout", low=0, high=SEED_LIMIT, allowed="an integer in [0, 2^32)")
    data_seed: int = key(-1, "data order, t, noise and flips; -1 = same as seed", low=-1, high=SEED_LIMIT,
                         allowed="-1 (same as seed) or an integer in [0, 2^32)")
    ema_rates: list[float] = key([0.999], "EMA decay rates kept beside the weights (sampling uses the first)",
                                 aliases=("ema_rate",))
    ema_warmup: bool = key(True, "diffusers' (1+t)/(10+t) EMA warm-up; false = improved-diffusion's constant rate")
    mixed_precision: str = key("auto", "auto = accelerate's setting (accelerate launch or accelerate config), "
                               "else no", choices=("auto", "no", "fp16", "bf16"), aliases=("use_fp16",),
                               alias_values={True: "fp16", False: "no"})
    checkpoint_every: int = key(500, "steps between checkpoints; 0 = only at the end (and when stopped)", low=0,
                                resume=True, aliases=("checkpointing_steps", "save_interval"))
    keep_checkpoints: int = key(2, "how many of the latest checkpoints are kept", low=1, resume=True,
                                aliases=("checkpoints_total_limit",))
    resume: str = key("", '"" (fresh), "latest", "auto" (latest if any, else fresh) or a checkpoint/output folder',
                      resume=True, aliases=("resume_from_checkpoint", "resume_checkpoint"))
    overwrite: bool = key(False, "a fresh run may replace the checkpoints already in output_dir", resume=True)
    cpu_threads: int = key(0, "torch threads per process on a CPU; 0 = the cores / processes", low=0, resume=True)
    compile: bool = key(False, "torch.compile the training forward/backward (minutes of compiling first)",
                        resume=True)
    memory_format: str = key("auto", "the layout it trains in; auto = unet.core.model.resolve_layout's rule",
                             choices=LAYOUTS, resume=True)
    max_nan_steps: int = key(10, "stop after this many non-finite losses in a row", low=1, resume=True)
    divergence_factor: float = key(0.0, "stop when loss > factor x the initial loss; 0 = never", low=0,
                                   resume=True)
    divergence_window: int = key(1, "the loss compared is the median of the last N finite losses", low=1,
                                 resume=True)
    # --- logging and samples ---
    report_to: str = key("wandb", "the tracker: wandb (online with credentials, else offline), tensorboard, none",
                         choices=("wandb", "tensorboard", "none"), resume=True, aliases=("logger",))
    project: str = key("unet", "the wandb project", resume=True)
    run_name: str = key("", "the wandb run name; \"\" = wandb's", resume=True)
    group: str = key("", "the wandb group", resume=True)
    tags: list[str] = key([], "wandb tags, comma-separated", resume=True)
    log_every: int = key(10, "steps between log lines", low=1, resume=True, aliases=("log_interval",))
    diagnostics_every: int = key(250, "residual ratios and activation RMS (extra forward passes); 0 = off", low=0,
                                 resume=True)
    eval_every: int = key(500, "loss on a fixed held-out batch with fixed t and noise; 0 = off", low=0,
                          resume=True)
    eval_batch_size: int = key(256, "images in the held-out batch", low=1, resume=True)
    sample_every: int = key(1000, "EMA sample grid every N steps and at the end; 0 = only at the end; -1 = never",
                            low=-1, allowed="-1 (never), 0 (at the end) or a step interval", resume=True)
    num_samples: int = key(100, "images in a sample grid", low=1, resume=True)
    sample_steps: int = key(100, "respaced ancestral steps for the grid", low=2,
                            allowed="an integer >= 2 (respaced sampling steps)", resume=True)
    progress: bool = key(True, "a progress bar", resume=True)
    # --- sample quality during training (FID/judge) ---
    fid_every: int = key(500, "EMA samples measured (FID, KID, precision/recall) every N steps; 0 = off", low=0,
                         allowed="an integer >= 0 (0 = off)", resume=True)
    fid_num_samples: int = key(256, "samples measured, across all processes (>= kid_subset_size)", resume=True)
    fid_ref: str = key("", "statistics file (evaluate.py ref), image folder or arr_0 .npz; \"\" = the held-out "
                       "split", resume=True)
    fid_features: str = key("auto", "judge (digits, MNIST family) | inception (torch-fidelity) | auto: the judge "
                            "if any", choices=FID_FEATURES, resume=True)
    fid_scheduler: str = key("dpm-solver++", "the sampler of the measured samples", choices=FID_SCHEDULERS,
                             resume=True)
    fid_steps: int = key(20, "its steps (at most diffusion_steps are taken)", low=1,
                         allowed="an integer >= 1 (at most diffusion_steps are taken)", resume=True)
    fid_batch_size: int = key(256, "sampling batch per process", low=1, resume=True)
    kid_subset_size: int = key(100, "KID's subset size: at most fid_num_samples and the reference's image count",
                               low=2, resume=True)
    keep_best_fid: bool = key(False, "copy the checkpoint with the lowest FID to output_dir/best", resume=True)
    fid_inception_weights: str = key("", "Inception weights file; \"\" = torch-fidelity's cache path",
                                     resume=True)
    fid_download_inception: bool = key(False, "download Inception's weights into the cache when missing (the "
                                       "network is used only then; offline: one line, training goes on)",
                                       resume=True)
    # --- the hub ---
    push_to_hub: bool = key(False, "export each checkpoint as a diffusers pipeline and upload it to hub_model_id",
                            resume=True)
    hub_model_id: str = key("", "the hub repository pushed to, USER/NAME", resume=True)
    hub_private: bool = key(False, "create the hub repository private", resume=True)
    # --- data ---
    dataset: str = key("digits", "digits | fashion_mnist | idx (data_dir) | imagefolder (data_dir) | webdataset "
                       "| parquet | a hub name", aliases=("dataset_name",))
    data_dir: str = key("", "the folder (or shards) of idx, imagefolder, webdataset and parquet data", resume=True,
                        aliases=("train_data_dir",))
    image_size: int = key(8, "height and width the images are resized or padded to", low=1,
                          aliases=("resolution",), follows_dataset=True)
    channels: int = key(1, "1 (greyscale) or 3 (RGB)")
    random_flip: bool = key(False, "flip training images left-right at random")
    eval_fraction: float = key(0.1, "the held-out share of a dataset without a test split", low=0, high=1)
    num_workers: int = key(0, "data loader processes", low=0, resume=True, aliases=("dataloader_num_workers",))
    # --- model ---
    model_channels: int = key(32, "the first level's channels", low=1, aliases=("num_channels",))
    num_res_blocks: int = key(2, "ResBlocks per level", low=1)
    attention_resolutions: list[int] = key([4], "the resolutions in pixels with self-attention",
                                           follows_dataset=True)
    channel_mult: list[int] = key([1, 2], "each level's channels as multiples of model_channels",
                                  follows_dataset=True)
    dropout: float = key(0.0, "dropout in the ResBlocks", low=0, high=1)
    num_heads: int = key(1, "attention heads", low=1)
    num_heads_upsample: int = key(-1, "attention heads on the way up; -1 = num_heads")
    use_scale_shift_norm: bool = key(True, "the timestep embedding scales and shifts the norm (FiLM)")
    use_checkpoint: bool = key(False, "gradient checkpointing (less memory, more compute)")
    class_cond: bool = key(True, "class-conditional (the data's labels)", follows_dataset=True)
    num_classes: int = key(10, "classes of a class-conditional model")
    class_dropout_prob: float = key(0.0, "classifier-free guidance: labels -> the null label with this probability",
                                    low=0, high=1)
    init: str = key("zero", "the init scheme of the zeroed layers (the ablation's arms)", choices=INIT_SCHEMES)
    norm: str = key("group", "the normalisation layers", choices=NORMS)
    # --- diffusion ---
    diffusion_steps: int = key(1000, "T, the diffusion steps", low=2, aliases=("ddpm_num_steps",))
    noise_schedule: str = key("cosine", "the beta schedule", choices=NOISE_SCHEDULES)
    learn_sigma: bool = key(True, "learn the variance (Eq. 15's interpolation; the hybrid loss)")
    sigma_small: bool = key(False, "fixed variance beta-tilde instead of beta (learn_sigma false)")
    use_kl: bool = key(False, "train on the variational bound alone")
    predict_xstart: bool = key(False, "the model predicts x_0 instead of the noise")
    rescale_timesteps: bool = key(False, "timesteps fed to the model scaled to [0, 1000)")
    rescale_learned_sigmas: bool = key(True, "the hybrid loss's L_vlb weight (lambda = 0.001)")
    timestep_respacing: str = key("", "train on a respaced process, e.g. 250 or ddim50; \"\" = all steps")
    schedule_sampler: str = key("uniform", "how t is drawn (loss-second-moment: importance sampling)",
                                choices=SCHEDULE_SAMPLERS)
    # --- optimizer and schedule ---
    lr_schedule: str = key("constant_with_warmup", "a diffusers get_scheduler name; it decays over max_steps",
                           choices=LR_SCHEDULES, resume=True, aliases=("lr_scheduler",))
    lr_cycles: int = key(1, "cosine_with_restarts: how many hard restarts", low=1, allowed="an integer >= 1",
                         resume=True)
    lr_power: float = key(1.0, "polynomial: the decay's power (1 = linear)", low=0, open_low=True, resume=True)
    adam_beta1: float = key(0.9, "Adam's beta1", low=0, high=1, resume=True)
    adam_beta2: float = key(0.999, "Adam's beta2", low=0, high=1, resume=True)
    adam_eps: float = key(1e-8, "Adam's epsilon", low=0, open_low=True, resume=True, aliases=("adam_epsilon",))
    allow_tf32: bool = key(False, "TF32 matmuls and convolutions on an NVIDIA GPU (Ampere or newer)", resume=True)
    # --- post-hoc EMA ---
    phema_every: int = key(0, "store power-function EMA snapshots every N steps (EDM2); 0 = off", low=0)
    phema_sigma_rels: list[float] = key([0.05, 0.10], "the stored EMA profiles' relative widths")
    # --- data at scale ---
    streaming: bool = key(False, "read the dataset as a stream (hub, imagefolder, parquet, webdataset)")
    shuffle_buffer: int = key(1000, "streaming: examples shuffled in a buffer; 0 = the stream's order", low=0)
    image_column: str = key("", "the image column; \"\" = the first image feature")
    label_column: str = key("", "the label column; \"\" = the first ClassLabel feature")
    dataset_config: str = key("", "a hub dataset's configuration name")
    cache_dir: str = key("", "datasets' cache folder; \"\" = its default", resume=True)
    verify_images: str = key("auto", "parallel | lazy | off | auto (parallel up to 100k images, else lazy)",
                             choices=("auto", "parallel", "lazy", "off"))
    num_proc: int = key(0, "processes for verify_images parallel; 0 = the cores", low=0, resume=True)

    def __post_init__(self):
        validate(self)

    def model_kwargs(self):
        """Keyword arguments for ``unet.core.model.UNetModel``; attention resolutions in pixels
        become the downsample factors the model takes."""
        return dict(
            in_channels=self.channels,
            model_channels=self.model_channels,
            out_channels=self.channels * (2 if self.learn_sigma else 1),
            num_res_blocks=self.num_res_blocks,
            attention_resolutions=tuple(self.image_size // r for r in self.attention_resolutions),
            dropout=self.dropout,
            channel_mult=tuple(self.channel_mult),
            # Label dropout adds one embedding, the "no label" class, at index num_classes.
            num_classes=self.num_classes + int(self.class_dropout_prob > 0) if self.class_cond else None,
            use_checkpoint=self.use_checkpoint,
            num_heads=self.num_heads,
            num_heads_upsample=self.num_heads_upsample,
            use_scale_shift_norm=self.use_scale_shift_norm,
            init=self.init,
            norm=self.norm,
        )

    def diffusion_kwargs(self):
        """Keyword arguments for ``unet.core.diffusion.create_diffusion``."""
        return dict(
            steps=self.diffusion_steps,
            learn_sigma=self.learn_sigma,
            sigma_small=self.sigma_small,
            noise_schedule=self.noise_schedule,
            use_kl=self.use_kl,
            predict_xstart=self.predict_xstart,
            rescale_timesteps=self.rescale_timesteps,
            rescale_learned_sigmas=self.rescale_learned_sigmas,
            timestep_respacing=self.timestep_respacing,
        )

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        """Build a config from a flat mapping, parsing strings and checking every key."""
        return cls(**parse_mapping(d))

    def replace(self, **overrides):
        """A copy with some keys changed (checked like the command line)."""
        return TrainConfig.from_dict({**self.to_dict(), **overrides})

    def save(self, path):
        with open(path, "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)

    @classmethod
    def load(cls, path):
        return cls.from_dict(read_yaml(path))


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
TYPES = typing.get_type_hints(TrainConfig)
# What the declarations say, by key: every table below is generated from them.
META = {name: f.metadata for name, f in FIELDS.items()}
CHOICES = {name: m["choices"] for name, m in META.items() if m["choices"]}
# Keys a resumed run may change: where and how long to train, the optimizer's step size and decay
# (applied to the restored optimizer), safety rules, logging, cadence and sample quality. Every
# other key (architecture, diffusion, data, batch, seeds, EMA, precision) describes what the
# checkpoint is, and a different value is refused.
RESUME_CHANGEABLE = frozenset(name for name, m in META.items() if m["resume"])
FOLLOW_DATASET = tuple(name for name, m in META.items() if m["follows_dataset"])
ALIASES = {alias: name for name, m in META.items() for alias in m["aliases"]}
VALUE_MAPS = {alias: m["alias_values"] for name, m in META.items() for alias in m["aliases"] if m["alias_values"]}


def parse_bool(key, v):
    """A YAML or command-line boolean (true/false, yes/no, on/off, 1/0) for ``key``."""
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"config key '{key}': expected true or false, got {v!r}")


def parse_scalar(key, typ, v):
    """``v`` (a string, or a value YAML already typed) as ``typ`` (bool, str, int or float);
    an int may be written 1e3, not 1.5."""
    if typ is bool:
        return parse_bool(key, v)
    if typ is str:
        if isinstance(v, (dict, list)):
            raise ConfigError(f"config key '{key}': expected a string, got {v!r}")
        return "" if v is None else str(v)
    try:
        if typ is int:
            if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
                raise ValueError
            return int(float(v)) if isinstance(v, str) and "e" in v.lower() else int(v)
        if typ is float:
            if isinstance(v, bool):
                raise ValueError
            return float(v)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int written 1e400
        raise ConfigError(f"config key '{key}': expected {typ.__name__}, got {v!r}") from None
    raise AssertionError(typ)


def parse_value(key, v):
    """``v`` as ``key``'s type; a list key takes a list or a comma-separated string."""
    typ = TYPES[key]
    if typing.get_origin(typ) in (list, list):
        (inner,) = typing.get_args(typ)
        if isinstance(v, str):
            # "1,2", "1, 2" and "1 2" are two numbers (never "12"); strings split on commas only
            pieces = v.split(",") if inner is str else re.split(r"[\s,]+", v)
            v = [p.strip() for p in pieces if p.strip()]
        elif not isinstance(v, (list, tuple)):
            v = [v]
        return [parse_scalar(key, inner, x) for x in v]
    return parse_scalar(key, typ, v)


def alias_of(key):
    """(this config's key, its ``VALUE_MAPS`` table or None) for another script's name of it;
    raises ValueError with the conversion for a name whose meaning differs (``aliases.REFUSED``);
    None for a name that is not an alias."""
    if key in REFUSED:
        raise ValueError(REFUSED[key])
    return (ALIASES[key], VALUE_MAPS.get(key)) if key in ALIASES else None


def unknown_key(key):
    """The one-line error for a key TrainConfig does not have, with the (at most three) closest."""
    key = str(key)  # a YAML key may be a number or a boolean
    close = difflib.get_close_matches(key, [*FIELDS, *ALIASES], n=3, cutoff=0.6)
    also = f" Also close: {', '.join(close[1:])}" if close[1:] else ""
    hint = f" (did you mean '{close[0]}'?{also})" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}; `train.py --help` lists every key")


def _note(message):
    print(message, file=sys.stderr)


def canonical(key, log=_note):
    """(key, None) for a config key; for another script's name of it (``aliases``), the key it names
    and its value converter, said in one line; a name whose meaning differs is a ConfigError."""
    if key in FIELDS:
        return key, None
    try:
        found = alias_of(key)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if found is None:
        raise unknown_key(key)
    name, table = found
    log(f"'{key}' is read as '{name}'" + (" (its value converted)" if table else "") +
        " (the name another training script uses)")
    # a boolean there, a word here: read as a boolean (a bad value is the usual one-line error)
    return name, (lambda v: table[parse_bool(key, v)]) if table else None


def dealias_mapping(d, log=_note):
    """A mapping with other scripts' names replaced by this config's keys (``canonical``)."""
    out, source = {}, {}
    for k, v in d.items():
        key, convert = canonical(str(k), log)
        if key in out:
            other = k if k != key else source[key]
            raise ConfigError(f"both '{key}' and '{other}' are set: '{other}' is another name for '{key}'; keep one")
        out[key], source[key] = (convert(v) if convert else v), str(k)
    return out


def parse_mapping(d):
    """A mapping of config keys (a YAML file's) parsed by ``parse_value``; other scripts' names are
    read as the keys they name, unknown keys fail."""
    return {k: parse_value(k, v) for k, v in dealias_mapping(d).items()}


def dealias_argv(argv, log=_note):
    """``--name value`` of another script's name (``aliases``) as ``--key value``, said in one line."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg[2:].partition("=")
        if arg.startswith("--") and len(arg) > 2 and name not in FIELDS and name != "config":
            key, convert = canonical(name, log)
            if convert:
                if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                    value, i = argv[i + 1], i + 1
                arg = f"--{key}={convert(value if eq or value else 'true')}"
            else:
                arg = f"--{key}{eq}{value}"
        out.append(arg)
        i += 1
    return out


def read_yaml(path):
    """A YAML file's mapping; one-line errors for a missing file, bad YAML or a non-mapping."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            d = strict_load(f) or {}  # a repeated key is an error; only true/false are booleans
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file '{path}' is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"config file '{path}' cannot be read: {e.strerror}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"config file '{path}' must be a mapping of key: value")
    return d


# --- the command line: generated from the dataclass --------------------------------------

class ConfigArgumentParser(argparse.ArgumentParser):
    """argparse that raises the one-line ConfigError instead of printing usage and exiting
    (train.py's and the ablation's command lines)."""

    def error(self, message):
        raise ConfigError(message)


def _typed(key):
    """argparse ``type=`` for ``key``: the same typed parse as a YAML value, same message."""
    def parse(text):
        try:
            return parse_value(key, text)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def _metavar(key):
    """What ``--help`` shows a key takes: its choices, or its type (a list: comma-separated)."""
    if key in CHOICES:
        return "|".join(CHOICES[key])
    typ = TYPES[key]
    if typing.get_origin(typ) in (list, list):
        return typing.get_args(typ)[0].__name__.upper() + ",..."
    return "true|false" if typ is bool else typ.__name__.upper()


def key_help(name, default):
    """One key's ``--help`` line: its declared help, default, the other names it is read under."""
    m = META[name]
    aliases = ", ".join(f"--{a}" for a in m["aliases"])
    return (f"{m['help']}; default {default!r}" + (" (follows --dataset when unset)" if m["follows_dataset"] else "")
            + (f"; also read as {aliases}" if aliases else ""))


def build_parser(defaults=None):
    """
    ``train.py``'s command line, one ``--key value`` option per ``TrainConfig`` field (as
    improved-diffusion's ``add_dict_to_argparser``); ``--key=value`` works too, and a bare
    ``--flag`` sets a boolean key.

    :param defaults: parsed values that replace the dataclass defaults (the ``--config`` file's).
    """
    defaults = {**TrainConfig().to_dict(), **(defaults or {})}
    parser = ConfigArgumentParser(prog="accelerate launch train.py", usage="accelerate launch train.py [--config FILE] "
                     "[--key value ...]", allow_abbrev=False, exit_on_error=False, add_help=False,
                     formatter_class=lambda prog: argparse.HelpFormatter(prog, max_help_position=44, width=100))
    parser.add_argument("--config", metavar="FILE", help="YAML file of keys (default: none, i.e. the values below)")
    group = parser.add_argument_group("keys")
    for name in FIELDS:
        flag = TYPES[name] is bool
        group.add_argument(f"--{name}", type=_typed(name), default=defaults[name], metavar=_metavar(name),
                           nargs="?" if flag else None, const=True if flag else None,
                           help=key_help(name, defaults[name]).replace("%", "%%"))
    return parser


def _parse(parser, argv):
    """argparse's known options and the rest, its errors as one-line ConfigErrors."""
    try:
        return parser.parse_known_args(argv)
    except argparse.ArgumentError as e:
        key = (e.argument_name or "").split("/")[0].lstrip("-")
        if "expected one argument" in e.message:
            raise ConfigError(f"config key '{key}' needs a value: --{key} VALUE "
                              f"(one that starts with '-' as --{key}=VALUE)") from None
        raise ConfigError(e.message) from None


def _underscored(arg):
    """``--max-steps`` is read as ``--max_steps`` (keys are spelled with underscores)."""
    key, eq, value = arg[2:].partition("=")
    return f"--{key.replace('-', '_')}{eq}{value}" if arg.startswith("--") and len(arg) > 2 else arg


def file_defaults(argv):
    """The ``--config`` file's keys in ``argv``, parsed and checked ({} without one)."""
    pre = ConfigArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    pre.add_argument("--config")
    config_file = _parse(pre, argv)[0].config
    base = read_yaml(config_file) if config_file else {}
    try:
        return parse_mapping(base)
    except ConfigError as e:
        raise ConfigError(f"in '{config_file}': {e}") from None


def load_config(argv: "list[str]") -> TrainConfig:
    """The run's config from ``--config FILE`` (default: the dataclass defaults, i.e. digits)
    and ``--key value`` overrides; the keys in ``FOLLOW_DATASET`` that neither sets follow the
    dataset. Raises ConfigError with a one-line message."""
    argv = dealias_argv([_underscored(a) for a in argv])
    base = file_defaults(argv)
    args, rest = _parse(build_parser(base), argv)
    if rest:
        if rest[0].startswith("--") and len(rest[0]) > 2:
            raise unknown_key(rest[0][2:].partition("=")[0])
        raise ConfigError(f"unexpected argument {rest[0]!r}; use --key value (see --help)")
    values = {k: v for k, v in vars(args).items() if k != "config"}
    given = set(base) | {a[2:].partition("=")[0] for a in argv if a.startswith("--")}
    return TrainConfig(**{**values, **follow_dataset(values, given)})


# The keys declared ``follows_dataset``: a run on other data that sets none of them gets values
# that fit its data instead, so that ``train.py --dataset imagefolder --data_dir D --image_size 32
# --channels 3`` is a valid run.


def follow_dataset(values, given):
    """
    The ``FOLLOW_DATASET`` keys not in ``given`` set to fit ``values["dataset"]``: the output
    folder named after it, the MNIST family's 28x28 images in three levels (28 -> 14 -> 7; two
    from 14), class labels only for the data sets
    known to have 10 classes, attention at the lowest resolution (for every dataset: the
    digits' [4] is exactly that).

    :param given: keys the config file or the command line set.
    """
    name = values["dataset"]
    out = {}
    if name != "digits":
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(name.rstrip("/")) or "data")
        out["output_dir"] = f"outputs/{slug}"
        out["class_cond"] = name == "fashion_mnist"
        if name in ("fashion_mnist", "idx"):
            size = values["image_size"] if "image_size" in given else 28
            out.update(image_size=28, channel_mult=[1, 2, 2] if size % 4 == 0 else [1, 2])  # 28, 32 / 14
    out = {k: v for k, v in out.items() if k not in given}
    shape = {**values, **out}
    if "attention_resolutions" not in given and shape["image_size"] % 2 ** (len(shape["channel_mult"]) - 1) == 0:
        out["attention_resolutions"] = [shape["image_size"] // 2 ** (len(shape["channel_mult"]) - 1)]
    return out


def help_text(argv=()):
    """``train.py --help``: every key with its default (the ``--config`` file's, if given)."""
    argv = [_underscored(a) for a in argv]
    return build_parser(file_defaults(argv)).format_help()


class ConfigError(ValueError):
    """A bad key or value; its message is the one line the user sees."""


def require(cond, key, allowed, value):
    """Raise the one-line ``ConfigError`` for ``key`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"config key '{key}': got {value!r}, allowed: {allowed}")


def check_batch_split(batch_size, grad_accum, processes=1):
    """The global batch is split into ``grad_accum`` micro-batches, each over ``processes``:
    it must divide evenly (the one check config, training and data share)."""
    if batch_size % (grad_accum * processes):
        parts = f"grad_accum={grad_accum}" if processes == 1 else \
            f"grad_accum x processes = {grad_accum} x {processes}"
        raise ConfigError(f"config key 'batch_size': got {batch_size}, allowed: a multiple of {parts}")


def check_heads(cfg):
    """Every attention block splits its channels evenly into heads (the middle block's at
    the lowest resolution always, and each level's listed in ``attention_resolutions``)."""
    require(cfg.num_heads_upsample == -1 or cfg.num_heads_upsample >= 1, "num_heads_upsample",
            "-1 (same as num_heads) or an integer >= 1", cfg.num_heads_upsample)
    up = cfg.num_heads if cfg.num_heads_upsample == -1 else cfg.num_heads_upsample
    levels = [(cfg.image_size // 2 ** i, cfg.model_channels * m) for i, m in enumerate(cfg.channel_mult)]
    width = [ch for res, ch in levels if res in cfg.attention_resolutions] + [levels[-1][1]]
    for key, heads, chans in (("num_heads", cfg.num_heads, width), ("num_heads_upsample", up, width[:-1])):
        bad = [ch for ch in chans if ch % heads]
        require(not bad, key, f"a divisor of every attention block's channels {sorted(set(chans))}", heads)


def range_text(key):
    """What a numeric key's declaration allows, in words (its ``allowed``, else from its bounds)."""
    m = META[key]
    if m["allowed"]:
        return m["allowed"]
    low, high = m["low"], m["high"]
    if TYPES[key] is int:
        return f"an integer >= {low} and < 2^31" if high == INT_LIMIT else f"an integer in [{low}, {high})"
    if high is None:
        return f"a finite number {'>' if m['open_low'] else '>='} {low:g}"
    return f"a number in {'(' if m['open_low'] else '['}{low:g}, {high:g})"


def in_range(key, v):
    """``v`` within ``key``'s declared bounds (a float also finite)."""
    m = META[key]
    return (math.isfinite(v) and (v > m["low"] if m["open_low"] else v >= m["low"])
            and (m["high"] is None or v < m["high"]))


def check_numbers(cfg):
    """Every numeric key within its declared range, then the lists: EMA rates in (0, 1)."""
    for key, m in META.items():
        if m["low"] is not None:
            require(in_range(key, getattr(cfg, key)), key, range_text(key), getattr(cfg, key))
    require(len(cfg.ema_rates) >= 1 and all(0 < r < 1 for r in cfg.ema_rates), "ema_rates",
            "one or more rates in (0, 1), e.g. 0.9999,0.999", cfg.ema_rates)
    check_optimizer(cfg)


def check_optimizer(cfg):
    """Post-hoc EMA profiles that have an exponent (``unet.train.phema``: sigma_rel < 12^-1/2);
    Adam's own ranges are declared with its keys."""
    sig = cfg.phema_sigma_rels
    require(len(sig) >= 1 and len(set(sig)) == len(sig) and all(0 < s < 12 ** -0.5 for s in sig),
            "phema_sigma_rels", "one or more distinct numbers in (0, 0.2887), e.g. 0.05,0.10", sig)


def check_diffusion(cfg):
    """Enough steps for the linear schedule, and a respacing of them that exists."""
    # improved-diffusion's linear betas end at 0.02 * 1000 / T: 1 or more (every loss NaN) for T <= 20.
    require(cfg.noise_schedule != "linear" or cfg.diffusion_steps > 20, "diffusion_steps",
            "an integer > 20 with the linear noise_schedule (its last beta, 20 / diffusion_steps, must be < 1)",
            cfg.diffusion_steps)
    why = respacing_error(cfg.timestep_respacing, cfg.diffusion_steps)
    require(why is None, "timestep_respacing", why, cfg.timestep_respacing)


def check_model(cfg):
    """The U-Net's shape: levels that halve the image evenly, attention where it exists,
    GroupNorm's 32 groups, heads that divide the channels, image channels PIL gives."""
    require(cfg.channels in (1, 3), "channels", "1 (greyscale) or 3 (RGB)", cfg.channels)
    require(len(cfg.channel_mult) >= 1 and all(1 <= m < INT_LIMIT for m in cfg.channel_mult), "channel_mult",
            "a list of integers >= 1, e.g. 1,2,2", cfg.channel_mult)
    # The output conv takes model_channels channels, as improved-diffusion's does: the first
    # level must keep that width (2,2 used to fail at the first forward).
    require(cfg.channel_mult[0] == 1, "channel_mult", "a list starting with 1, e.g. 1,2,2", cfg.channel_mult)
    levels = 2 ** (len(cfg.channel_mult) - 1)
    require(cfg.image_size % levels == 0, "image_size", f"a multiple of {levels} (2^(len(channel_mult)-1))",
            cfg.image_size)
    sizes = [cfg.image_size // 2 ** i for i in range(len(cfg.channel_mult))]
    require(all(r in sizes for r in cfg.attention_resolutions), "attention_resolutions",
            f"resolutions in pixels the U-Net has: a subset of {sizes}", cfg.attention_resolutions)
    if cfg.norm == "group":
        # GroupNorm32 uses 32 groups, as the original does.
        require(cfg.model_channels % 32 == 0, "model_channels", "a multiple of 32 with norm=group",
                cfg.model_channels)
    check_heads(cfg)
    if cfg.class_cond:
        require(cfg.num_classes >= 1, "num_classes", "an integer >= 1 when class_cond is true", cfg.num_classes)
    require(cfg.class_cond or cfg.class_dropout_prob == 0, "class_dropout_prob",
            "0 for an unconditional model (class_cond false)", cfg.class_dropout_prob)


def check_fid(cfg):
    """Sample-quality keys: enough samples for KID's subsets, the judge
    only for 1-channel images. (The reference itself is read, and
    checked against the image shape, when the run starts: ``unet.train.quality``.)"""
    require(cfg.kid_subset_size <= cfg.fid_num_samples < INT_LIMIT, "fid_num_samples",
            f"an integer >= 2 and >= kid_subset_size ({cfg.kid_subset_size})", cfg.fid_num_samples)
    require(cfg.fid_features != "judge" or cfg.channels == 1, "fid_features",
            "auto or inception for RGB images (the digit judge reads 1-channel digits)", cfg.fid_features)


def validate(cfg):
    """Check every value and the ones that depend on each other; raise ConfigError."""
    for key, allowed in CHOICES.items():
        require(getattr(cfg, key) in allowed, key, "|".join(allowed), getattr(cfg, key))
    require(bool(cfg.output_dir.strip()), "output_dir", "a folder path (not empty)", cfg.output_dir)
    require(bool(cfg.dataset.strip()), "dataset", '"digits", "fashion_mnist", "idx", "imagefolder" or a hub name',
            cfg.dataset)
    check_numbers(cfg)
    check_batch_split(cfg.batch_size, cfg.grad_accum)
    check_diffusion(cfg)
    check_model(cfg)
    check_fid(cfg)
    if cfg.dataset == "imagefolder":
        require(bool(cfg.data_dir), "data_dir", "a folder of images when dataset=imagefolder", cfg.data_dir)
    if cfg.dataset == "webdataset":
        require(bool(cfg.data_dir), "data_dir", "tar shards when dataset=webdataset: a folder or a pattern "
                "like shards/train-*.tar", cfg.data_dir)
    require(not (cfg.streaming and cfg.dataset in IN_MEMORY), "streaming", f"false with dataset={cfg.dataset} "
            "(read into memory)", cfg.streaming)
    check_mnist_family(cfg)
    check_hub(cfg)


def check_hub(cfg):
    """``push_to_hub`` needs a repository USER/NAME; the hub keys need ``push_to_hub``."""
    require(not cfg.push_to_hub or re.fullmatch(r"[\w.-]+/[\w.-]+", cfg.hub_model_id), "hub_model_id",
            "a hub repository USER/NAME with push_to_hub", cfg.hub_model_id)
    require(cfg.push_to_hub or not (cfg.hub_model_id or cfg.hub_private), "push_to_hub",
            "true when hub_model_id or hub_private is set", cfg.push_to_hub)


IN_MEMORY = ("digits", "fashion_mnist", "idx")


def check_mnist_family(cfg):
    """Fashion-MNIST and IDX folders: grey images; Fashion-MNIST's 28 pixels as is, padded to 32
    or pooled to 14 (an IDX folder's size is checked when it is read)."""
    if cfg.dataset not in ("fashion_mnist", "idx"):
        return
    require(cfg.channels == 1, "channels", f"1 with dataset={cfg.dataset} (grey images)", cfg.channels)
    if cfg.dataset == "fashion_mnist":
        require(cfg.image_size in (28, 32, 14), "image_size", "28 (as is), 32 (zero-padded) or 14 (2x2 "
                "average-pooled) with dataset=fashion_mnist", cfg.image_size)
    require(cfg.dataset != "idx" or bool(cfg.data_dir), "data_dir", "a folder of MNIST-layout IDX files when "
            "dataset=idx", cfg.data_dir)


def resume_changes(saved, cfg, where):
    """
    The keys ``cfg`` changes with respect to the checkpoint's ``saved`` config, as
    {key: (saved value, new value)}; a change of a key outside ``RESUME_CHANGEABLE`` is a
    one-line ``ConfigError`` naming the key and both values.

    :param where: the checkpoint folder, for the message.
    """
    changed = {k: (v, getattr(cfg, k)) for k, v in saved.to_dict().items() if getattr(cfg, k) != v}
    for key, (old, new) in changed.items():
        if key not in RESUME_CHANGEABLE:
            raise ConfigError(f"config key '{key}': the checkpoint {where} was trained with {old!r}, this run "
                              f"asks for {new!r}; a resumed run cannot change it (start a new output_dir instead)")
    return changed

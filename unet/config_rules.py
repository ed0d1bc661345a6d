"""What a training configuration may hold: the allowed values of every key, the checks
between keys, and which keys a resumed run may change. Pure Python (no torch): a bad value
is reported in a second, before any data or model work, as one line naming the key and
what it accepts."""

import math

INIT_SCHEMES = ("zero", "standard", "kaiming", "fixup", "all-zero")  # mirrors unet.init.INIT_SCHEMES
NORMS = ("group", "none")  # mirrors unet.model.NORMS
CHOICES = {
    "init": INIT_SCHEMES,
    "norm": NORMS,
    "mixed_precision": ("no", "fp16", "bf16"),
    "memory_format": ("auto", "channels_last", "contiguous"),  # mirrors unet.speed.LAYOUTS
    "report_to": ("wandb", "tensorboard", "none"),
    "noise_schedule": ("linear", "cosine"),
    "schedule_sampler": ("uniform", "loss-second-moment"),
}
POSITIVE_INTS = ("max_steps", "batch_size", "grad_accum", "keep_checkpoints", "log_every", "num_samples",
                 "image_size", "model_channels", "num_res_blocks", "max_nan_steps", "num_heads",
                 "eval_batch_size", "divergence_window")
NON_NEGATIVE_INTS = ("warmup_steps", "num_workers", "diagnostics_every", "eval_every", "cpu_threads",
                     "checkpoint_every")
NON_NEGATIVE_FLOATS = ("weight_decay", "grad_clip", "dropout", "divergence_factor", "max_minutes")
INT_LIMIT = 2 ** 31  # step counts and sizes beyond this overflow int32 indices and int64 positions
SEED_LIMIT = 2 ** 32  # numpy's seed range (accelerate's set_seed seeds numpy too)

# Keys a resumed run may change: where and how long to train, the optimizer's step size
# and decay (applied to the restored optimizer), safety rules, logging and cadence. Every
# other key (architecture, diffusion, data, batch, seeds, EMA, precision) describes what
# the checkpoint is, and a different value is refused.
RESUME_CHANGEABLE = frozenset((
    "output_dir", "max_steps", "max_minutes", "lr", "weight_decay", "warmup_steps", "grad_clip", "grad_accum",
    "checkpoint_every", "keep_checkpoints", "resume", "overwrite", "cpu_threads", "compile", "memory_format", "max_nan_steps",
    "divergence_factor", "divergence_window", "report_to", "project", "run_name", "group", "tags", "log_every",
    "diagnostics_every", "eval_every", "eval_batch_size", "sample_every", "num_samples", "sample_steps",
    "progress", "data_dir", "num_workers"))


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


def respacing_error(respacing, steps):
    """Why ``timestep_respacing`` cannot respace a ``steps``-step process (None if it can):
    the rules of ``unet.diffusion.space_timesteps``, without building anything."""
    if not respacing:
        return None
    if respacing.startswith("ddim"):
        n = respacing[4:]
        if not n.isdigit() or not any(len(range(0, steps, s)) == int(n) for s in range(1, steps)):
            return f"ddimN with N a count an integer stride gives from {steps} steps"
        return None
    parts = respacing.split(",")
    if not all(p.strip().isdigit() and int(p) >= 1 for p in parts):
        return '"", "N", "a,b,c" (steps per section, each >= 1) or "ddimN"'
    size, extra = divmod(steps, len(parts))
    if any(int(p) > size + (i < extra) for i, p in enumerate(parts)):
        return f"at most as many steps per section as the section has ({steps} steps in {len(parts)} sections)"
    return None


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


def check_numbers(cfg):
    """Ranges of the numeric keys: finite floats, bounded ints, seeds numpy accepts."""
    for key in POSITIVE_INTS:
        require(1 <= getattr(cfg, key) < INT_LIMIT, key, "an integer >= 1 and < 2^31", getattr(cfg, key))
    for key in NON_NEGATIVE_INTS:
        require(0 <= getattr(cfg, key) < INT_LIMIT, key, "an integer >= 0 and < 2^31", getattr(cfg, key))
    require(-1 <= cfg.sample_every < INT_LIMIT, "sample_every", "-1 (never), 0 (at the end) or a step interval",
            cfg.sample_every)
    require(0 <= cfg.seed < SEED_LIMIT, "seed", "an integer in [0, 2^32)", cfg.seed)
    require(-1 <= cfg.data_seed < SEED_LIMIT, "data_seed", "-1 (same as seed) or an integer in [0, 2^32)",
            cfg.data_seed)
    require(math.isfinite(cfg.lr) and cfg.lr > 0, "lr", "a finite number > 0", cfg.lr)
    for key in NON_NEGATIVE_FLOATS:
        v = getattr(cfg, key)
        require(math.isfinite(v) and v >= 0, key, "a finite number >= 0", v)
    require(cfg.dropout < 1, "dropout", "a number in [0, 1)", cfg.dropout)
    require(0 <= cfg.eval_fraction < 1, "eval_fraction", "a number in [0, 1)", cfg.eval_fraction)
    require(len(cfg.ema_rates) >= 1 and all(0 < r < 1 for r in cfg.ema_rates), "ema_rates",
            "one or more rates in (0, 1), e.g. 0.9999,0.999", cfg.ema_rates)
    require(0 <= cfg.class_dropout_prob < 1, "class_dropout_prob", "a number in [0, 1)", cfg.class_dropout_prob)


def check_diffusion(cfg):
    """Enough steps to diffuse and to sample, and a respacing of them that exists."""
    require(2 <= cfg.diffusion_steps < INT_LIMIT, "diffusion_steps", "an integer >= 2", cfg.diffusion_steps)
    why = respacing_error(cfg.timestep_respacing, cfg.diffusion_steps)
    require(why is None, "timestep_respacing", why, cfg.timestep_respacing)
    require(2 <= cfg.sample_steps < INT_LIMIT, "sample_steps", "an integer >= 2 (respaced sampling steps)",
            cfg.sample_steps)


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


def validate(cfg):
    """Check every value and the ones that depend on each other; raise ConfigError."""
    for key, allowed in CHOICES.items():
        require(getattr(cfg, key) in allowed, key, "|".join(allowed), getattr(cfg, key))
    require(bool(cfg.output_dir.strip()), "output_dir", "a folder path (not empty)", cfg.output_dir)
    require(bool(cfg.dataset.strip()), "dataset", '"digits", "imagefolder" or a Hugging Face hub name',
            cfg.dataset)
    check_numbers(cfg)
    check_batch_split(cfg.batch_size, cfg.grad_accum)
    check_diffusion(cfg)
    check_model(cfg)
    if cfg.dataset == "imagefolder":
        require(bool(cfg.data_dir), "data_dir", "a folder of images when dataset=imagefolder", cfg.data_dir)


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

"""The names of the paper's options that a config may choose, torch-free so that the config
checks read them without loading torch; the modules that implement them import them from here."""

INIT_SCHEMES = ("zero", "standard", "zero-branches", "zero-output", "near-zero", "kaiming", "fixup", "all-zero")  # init
NORMS = ("group", "none")  # unet.core.nn.normalization
LAYOUTS = ("auto", "channels_last", "contiguous")  # unet.core.model.resolve_layout
SCHEDULE_SAMPLERS = ("uniform", "loss-second-moment")  # unet.core.resample
NOISE_SCHEDULES = ("linear", "cosine")  # unet.core.diffusion.get_named_beta_schedule

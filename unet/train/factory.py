"""
One place that turns a description of a model into objects: a ``TrainConfig`` into a
``UNetModel`` and a diffusion, and improved-diffusion's command-line flags (its
``MODEL_FLAGS``/``DIFFUSION_FLAGS``, with its defaults) into a ``TrainConfig``. Training,
checkpoint loading, sampling and the benchmark all build through here.
"""



from unet.checkpoint.load import (  # noqa: F401 (improved-diffusion's flags: the format's; re-exported)
    IDDPM_CHANNEL_MULT,
    IDDPM_DEFAULTS,
    IDDPM_EXTRAS,
    config_mapping,
    diffusion_from_kwargs,
    explicit_architecture,
    iddpm_flags,
    parse_flag_string,
)
from unet.config import TrainConfig
from unet.core.diffusion import GaussianDiffusion
from unet.core.model import UNetModel


def create_model(cfg: TrainConfig) -> UNetModel:
    """The ``UNetModel`` a ``TrainConfig`` describes (initialised by ``cfg.init``)."""
    return UNetModel(**cfg.model_kwargs())


def create_diffusion_from_config(cfg: TrainConfig, timestep_respacing: "str | None" = None) -> GaussianDiffusion:
    """
    The diffusion process a ``TrainConfig`` describes.

    :param timestep_respacing: overrides ``cfg.timestep_respacing`` when not None (``""``
        gives the full T-step process, e.g. for bits/dim).
    """
    return diffusion_from_kwargs(cfg.diffusion_kwargs(), timestep_respacing)


# --- improved-diffusion's flags --------------------------------------------------------

# improved-diffusion flag -> TrainConfig key, where the names differ
IDDPM_RENAMED = dict(num_channels="model_channels", in_channels="channels")


def config_from_iddpm_flags(flags):
    """
    improved-diffusion's flags (a dict, as ``parse_flag_string`` returns) -> the ``TrainConfig``
    of the same model and diffusion, with the original's defaults, its channel multipliers by
    image size (``channel_mult`` overrides), 3 input channels and 1000 classes unless
    ``in_channels`` / ``num_classes`` say otherwise. Raises ``ValueError`` in one line.
    """
    f = iddpm_flags(flags)
    f["num_classes"] = f.get("num_classes") or 1000
    return TrainConfig.from_dict({IDDPM_RENAMED.get(k, k): v for k, v in f.items()})


def architecture_from_config(config):
    """
    What a checkpoint without its own config needs: (image_size, UNetModel kwargs,
    create_diffusion kwargs, TrainConfig or None).

    :param config: improved-diffusion's flags (a dict, a YAML/JSON file of them, or a
        ``"--flag value"`` string); this package's ``config.yaml`` (a dict or file); or a
        mapping with ``image_size`` and explicit ``model`` and ``diffusion`` kwargs (for
        models no config describes; the TrainConfig is then None).
    """
    config = config_mapping(config)
    explicit = explicit_architecture(config)
    if explicit:
        return (*explicit, None)
    if set(config) <= set(IDDPM_DEFAULTS) | IDDPM_EXTRAS:
        cfg = config_from_iddpm_flags(config)
    else:
        cfg = TrainConfig.from_dict(config)
    return cfg.image_size, cfg.model_kwargs(), cfg.diffusion_kwargs(), cfg

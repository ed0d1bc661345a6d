"""unet: the improved-DDPM U-Net and Gaussian diffusion, with the init ablation.

The public API (docs/api.md)::

    from unet import TrainConfig, run_training, load_checkpoint, generate, export_pipeline

    summary = run_training(TrainConfig(max_steps=200, report_to="none", output_dir="outputs/mine"))
    loaded = load_checkpoint("outputs/mine")
    images, labels = generate(loaded, 16, class_labels=[3])
    export_pipeline(loaded, "exported/mine")

``run_training`` is ``unet.train.loop.train`` (the name ``unet.train`` is the training subpackage).
The names are imported on first use, so that ``import unet`` and a bad command-line flag stay
fast and torch-free.
"""

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.3.0"

# public name -> (module, attribute)
_API = {
    "TrainConfig": ("unet.config", "TrainConfig"),
    "ConfigError": ("unet.config", "ConfigError"),
    "load_config": ("unet.config", "load_config"),
    "run_training": ("unet.train.loop", "train"),
    "TrainSummary": ("unet.train.loop", "TrainSummary"),
    "TrainingError": ("unet.train.loop", "TrainingError"),
    "load_checkpoint": ("unet.checkpoint.load", "load_checkpoint"),
    "Loaded": ("unet.checkpoint.load", "Loaded"),
    "CheckpointError": ("unet.checkpoint.format", "CheckpointError"),
    "generate": ("unet.sample.sampling", "generate_from"),
    "export_pipeline": ("unet.sample.export", "export_pipeline"),
    "UNetModel": ("unet.core.model", "UNetModel"),
    "create_diffusion": ("unet.core.diffusion", "create_diffusion"),
}

__all__ = ["CheckpointError", "ConfigError", "Loaded", "TrainConfig", "TrainSummary", "TrainingError", "UNetModel",
           "__version__", "create_diffusion", "export_pipeline", "generate", "load_checkpoint", "load_config",
           "run_training"]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'unet' has no attribute {name!r}")
    module, attr = _API[name]
    value = getattr(import_module(module), attr)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # what type checkers and editors see
    from unet.checkpoint.format import CheckpointError
    from unet.checkpoint.load import Loaded, load_checkpoint
    from unet.config import ConfigError, TrainConfig, load_config
    from unet.core.diffusion import create_diffusion
    from unet.core.model import UNetModel
    from unet.sample.export import export_pipeline
    from unet.sample.sampling import generate_from as generate
    from unet.train.loop import TrainingError, TrainSummary
    from unet.train.loop import train as run_training

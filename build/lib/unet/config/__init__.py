"""The training configuration (``train_config``): ``TrainConfig``, every key typed, read from YAML
and overridden as ``--key value``, the checks of every value, and which keys a resume may change.
Torch-free, below data, training and the command lines, which all read it."""

from .train_config import (
    CHOICES,
    FID_SCHEDULERS,
    FIELDS,
    LR_SCHEDULES,
    TYPES,
    ConfigArgumentParser,
    ConfigError,
    TrainConfig,
    check_batch_split,
    help_text,
    load_config,
    parse_bool,
    parse_mapping,
    read_yaml,
    resume_changes,
    unknown_key,
)

__all__ = ["CHOICES", "FID_SCHEDULERS", "FIELDS", "LR_SCHEDULES", "TYPES", "ConfigArgumentParser", "ConfigError",
           "TrainConfig", "check_batch_split", "help_text", "load_config", "parse_bool", "parse_mapping", "read_yaml",
           "resume_changes", "unknown_key"]

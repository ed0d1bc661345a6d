"""The training configuration (``train_config``): ``TrainConfig``, every key declared once beside its
field (type, range, help, aliases, whether a resume may change it), read from YAML and overridden as
``--key value``; the parser, the checks and the help are generated from the declarations.
Torch-free, below data, training and the command lines, which all read it."""

from .train_config import (
    ALIASES,
    CHOICES,
    FID_SCHEDULERS,
    FIELDS,
    LR_SCHEDULES,
    META,
    RESUME_CHANGEABLE,
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

__all__ = ["ALIASES", "CHOICES", "FID_SCHEDULERS", "FIELDS", "LR_SCHEDULES", "META", "RESUME_CHANGEABLE", "TYPES",
           "ConfigArgumentParser", "ConfigError", "TrainConfig", "check_batch_split", "help_text", "load_config",
           "parse_bool", "parse_mapping", "read_yaml", "resume_changes", "unknown_key"]

"""The run configuration: what a job does, read once and frozen.

Owns the schema (`schema.py`: frozen dataclasses, the allowed choices and ranges), reading
(`loader.py`: strict YAML, dotted `--section.key=value` overrides, type and range checks)
and `--print-config` (`describe.py`). A bad config raises `ConfigError` naming the key,
the file and the fix, before anything heavy starts.

May import: fedmpi.errors only.
"""

from fedmpi.config.loader import dump_config, from_dict, get, load_config, parse_overrides
from fedmpi.config.schema import (
    CHOICES,
    RANGES,
    CheckpointCfg,
    Config,
    DataCfg,
    DiffusionCfg,
    EvalCfg,
    FedCfg,
    ModelCfg,
    PrivacyCfg,
    RunCfg,
    SplitCfg,
    TrainCfg,
)
from fedmpi.errors import ConfigError

__all__ = [
    "CHOICES",
    "RANGES",
    "CheckpointCfg",
    "Config",
    "ConfigError",
    "DataCfg",
    "DiffusionCfg",
    "EvalCfg",
    "FedCfg",
    "ModelCfg",
    "PrivacyCfg",
    "RunCfg",
    "SplitCfg",
    "TrainCfg",
    "dump_config",
    "from_dict",
    "get",
    "load_config",
    "parse_overrides",
]

"""Typed config tree: ``load_config("configs/x.yaml", ["algorithm.objective=drpo"])``."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Union

from .loader import ConfigError, apply_overrides, dump_yaml, from_dict, load_yaml_tree, validate_tree
from .schema import (
    AlpConfig,
    BusConfig,
    CheckpointConfig,
    Config,
    LoggingConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    PrecisionConfig,
    RunConfig,
)

__all__ = [
    "AlpConfig", "BusConfig", "CheckpointConfig", "Config", "ConfigError", "LoggingConfig", "ModelConfig",
    "OptimizerConfig", "ParallelConfig", "PrecisionConfig", "RunConfig", "load_config", "config_from_dict",
    "dump_yaml",
]


def config_from_dict(data: dict, overrides: Iterable[str] = ()) -> Config:
    """Build and validate a :class:`Config` from a mapping plus dotted overrides."""
    cfg = from_dict(Config, apply_overrides(data, overrides))
    validate_tree(cfg)
    return cfg


def load_config(path: Optional[Union[str, Path]] = None, overrides: Iterable[str] = ()) -> Config:
    """Load a YAML config (with its includes), apply ``section.key=value`` overrides, validate."""
    data = load_yaml_tree(path) if path is not None else {}
    return config_from_dict(data, overrides)

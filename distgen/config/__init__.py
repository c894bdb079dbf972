"""Typed, validated run configuration (see :mod:`distgen.config.core`)."""

from __future__ import annotations

from pathlib import Path

from distgen.config.core import ConfigError, apply_overrides, build_dataclass, check, load_yaml, to_dict, to_yaml
from distgen.config.schema import Config, DataConfig, EvalConfig, RunConfig, TrainConfig


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load ``path`` (YAML) with ``key=value`` overrides into a validated :class:`Config`."""
    data = load_yaml(path) if path is not None else {}
    data = apply_overrides(data, list(overrides))
    try:
        return build_dataclass(Config, data)
    except ConfigError as e:
        if path is not None:
            raise ConfigError(f"{e} (in {path})") from None
        raise


__all__ = [
    "Config", "ConfigError", "DataConfig", "EvalConfig", "RunConfig", "TrainConfig",
    "apply_overrides", "build_dataclass", "check", "load_config", "to_dict", "to_yaml",
]

"""Typed, validated run configuration (see :mod:`distgen.config.core`).

Nothing here imports torch or a model family: the families' config dataclasses are in
:mod:`distgen.config.models`, and which of them a ``model`` section is comes from the lookup a caller
passes (:data:`~distgen.config.models.MODEL_CONFIGS` by default).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

from distgen.config.core import ConfigError, apply_overrides, build_dataclass, check, load_yaml, to_dict, to_yaml
from distgen.config.models import MODEL_CONFIGS
from distgen.config.schema import Config, DataConfig, EvalConfig, ModelConfig, RunConfig, TrainConfig


def model_chooser(models: Mapping[str, type]):
    """A ``choose`` for :func:`build_dataclass`: the ``model`` section becomes ``models[model.family]``."""

    def choose(cls: type, data: dict, path: str) -> type:
        if cls is not ModelConfig:
            return cls
        family = str(data.get("family", "diffusion"))
        if family not in models:
            raise ConfigError(f"{path}.family: unknown family {family!r}; known: {', '.join(sorted(models))}")
        return models[family]

    return choose


# The data's geometry shapes the networks as much as the model section does.
_DATA_SHAPE_FIELDS = ("resolution", "channels")


def model_changes(stored: dict, cfg: Config) -> list[str]:
    """``field: old -> new`` for each model field (and data geometry) that differs between a checkpoint's
    stored config and ``cfg``. Sampling-only fields (a family config's ``sampling_fields``) may change
    freely, and a field the stored config lacks (added by a later distgen) keeps its default."""
    now = to_dict(cfg)
    old_model, new_model = stored.get("model", {}), now["model"]
    free = set(getattr(type(cfg.model), "sampling_fields", ()))
    out = [f"model.{k}: {old_model[k]!r} -> {new_model[k]!r}" for k in new_model
           if k in old_model and k not in free and old_model[k] != new_model[k]]
    old_data = stored.get("data", {})
    out += [f"data.{k}: {old_data[k]!r} -> {now['data'][k]!r}" for k in _DATA_SHAPE_FIELDS
            if k in old_data and old_data[k] != now["data"][k]]
    return out


def build_config(data: dict, models: Optional[Mapping[str, type]] = None) -> Config:
    """A validated :class:`Config` from a plain mapping (a YAML file's, or a checkpoint's stored one)."""
    return build_dataclass(Config, data, choose=model_chooser(MODEL_CONFIGS if models is None else models))


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (),
                models: Optional[Mapping[str, type]] = None) -> Config:
    """Load ``path`` (YAML) with ``key=value`` overrides into a validated :class:`Config`."""
    data = load_yaml(path) if path is not None else {}
    data = apply_overrides(data, list(overrides))
    try:
        return build_config(data, models)
    except ConfigError as e:
        if path is not None:
            raise ConfigError(f"{e} (in {path})") from None
        raise


__all__ = [
    "Config", "ConfigError", "DataConfig", "EvalConfig", "MODEL_CONFIGS", "ModelConfig", "RunConfig", "TrainConfig",
    "apply_overrides", "build_config", "build_dataclass", "check", "load_config", "model_changes", "model_chooser",
    "to_dict",
    "to_yaml",
]

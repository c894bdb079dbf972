"""The contract between the trainer and a model family.

The training loop knows only this. A family owns its networks, says which
are trained in which *phase* (diffusion: one phase; a GAN: a discriminator
phase every step and a generator phase, each with its own optimizer; lazy
regularisers are phases that run every k steps), returns per-sample losses,
and samples. Adding a family is a new module registered in
:mod:`distgen.families`, never a change to the loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
from torch import nn


@dataclass(frozen=True)
class DataInfo:
    """What a family needs to know about the data (from the config and the manifest)."""

    resolution: int
    channels: int
    num_classes: int = 0


@dataclass(frozen=True)
class Phase:
    """One optimisation phase: ``network`` is trained on ``loss(phase.name, ...)`` every ``every`` steps."""

    name: str
    network: str
    every: int = 1
    lr_scale: float = 1.0  # relative to train.lr (e.g. a GAN's discriminator)


class Family:
    """Base class of a model family. Subclasses set ``name`` and ``config_cls``."""

    name: ClassVar[str]
    config_cls: ClassVar[type]
    # "exact" or "bound" when log_likelihood is implemented (bits/dim evaluation), else None
    likelihood: ClassVar[Optional[str]] = None

    def __init__(self, cfg: Any, data: DataInfo):
        self.cfg, self.data = cfg, data

    # -- networks and phases
    def build_networks(self) -> dict[str, nn.Module]:
        """Fresh networks by name (all trained by some phase)."""
        raise NotImplementedError

    def phases(self) -> list[Phase]:
        raise NotImplementedError

    def ema_networks(self) -> list[str]:
        """Networks that get EMA copies (used for sampling, evaluation and export)."""
        return [p.network for p in self.phases()]

    # -- training
    def loss(self, phase: str, nets: dict[str, nn.Module], batch: dict, generator: torch.Generator
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """Per-sample loss of ``phase`` (shape [B]) and extra scalars to log. The loop reduces it."""
        raise NotImplementedError

    # -- sampling and export
    def sample(self, nets: dict[str, nn.Module], generators: list[torch.Generator], *,
               labels: Optional[torch.Tensor] = None, steps: Optional[int] = None,
               sampler: Optional[str] = None, guidance: Optional[float] = None) -> torch.Tensor:
        """One image per generator, float NCHW in [-1, 1]."""
        raise NotImplementedError

    def log_likelihood(self, nets: dict[str, nn.Module], images: torch.Tensor, labels: Optional[torch.Tensor],
                       generators: list[torch.Generator]) -> torch.Tensor:
        """log p(x) in nats per image (or a lower bound) of uint8 NCHW ``images``, discrete pixel values.

        One generator per image for anything stochastic (dequantisation noise, posterior samples).
        """
        raise NotImplementedError(f"the {self.name} family has no log-likelihood")

    def export(self, nets: dict[str, nn.Module], out_dir: Path) -> None:
        """Write ``nets`` (EMA weights) in the family's standard format."""
        raise NotImplementedError

    def load_export(self, out_dir: Path) -> dict[str, nn.Module]:
        """Networks back from :meth:`export`, loaded without running pickled code."""
        raise NotImplementedError

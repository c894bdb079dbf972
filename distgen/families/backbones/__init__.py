"""Denoising backbones for the diffusion family: one call convention, several networks.

Every backbone is an ``nn.Module`` built as ``cls(channels, resolution, num_classes, **preset)`` and called as
``net(x, noise_cond, class_labels=None)`` (see :mod:`distgen.families.backbones.common` for the convention),
with a ``PRESETS`` dict of named keyword sets and a JSON-able ``config`` (its constructor arguments) that
:func:`save_backbone` writes beside its safetensors weights.

- ``unet``: diffusers' UNet2DModel (the diffusion family's network today; its presets are the family's)
- ``dit``: DiT (Peebles & Xie 2023) on diffusers' DiTTransformer2DModel
- ``edm2``: EDM2's magnitude-preserving U-Net (Karras et al. 2024), distgen's own
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

from torch import nn

from distgen.families.backbones.dit import DiT
from distgen.families.backbones.edm2 import EDM2UNet
from distgen.families.backbones.unet import UNet
from distgen.families.base import load_module, save_module

BACKBONES: dict[str, type[nn.Module]] = {"unet": UNet, "dit": DiT, "edm2": EDM2UNet}


def build_backbone(name: str, channels: int, resolution: int, num_classes: int,
                   preset: Union[str, dict]) -> nn.Module:
    """Backbone ``name`` for ``channels`` x ``resolution`` x ``resolution`` inputs and ``num_classes`` classes
    (0: unconditional); ``preset`` names one of its ``PRESETS`` or gives the keyword arguments themselves."""
    if name not in BACKBONES:
        raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}, got {name!r}")
    cls = BACKBONES[name]
    if isinstance(preset, str):
        if preset not in cls.PRESETS:
            raise ValueError(f"the {name} backbone has no preset {preset!r}"
                             + (f" (it has {', '.join(cls.PRESETS)})" if cls.PRESETS else
                                " (it takes the preset's keyword arguments)"))
        preset = cls.PRESETS[preset]
    return cls(channels, resolution, num_classes, **preset)


def save_backbone(out_dir: Union[str, Path], stem: str, net: nn.Module) -> None:
    """``<stem>.safetensors`` and ``<stem>_config.json`` (the backbone's name and constructor arguments)."""
    save_module(out_dir, stem, net, {"backbone": net.name, "kwargs": net.config})


def _from_spec(spec: dict) -> nn.Module:
    name, kwargs = spec.get("backbone"), dict(spec["kwargs"])
    if not isinstance(name, str):
        raise ValueError(f"backbone must be a name, got {type(name).__name__}")
    base = [kwargs.pop(k) for k in ("channels", "resolution", "num_classes")]
    return build_backbone(name, *base, kwargs)


def load_backbone(out_dir: Union[str, Path], stem: str) -> nn.Module:
    """The backbone :func:`save_backbone` wrote, loaded without running pickled code (the config is checked
    against the weights on the meta device first, see :func:`distgen.families.base.load_module`)."""
    return load_module(out_dir, stem, _from_spec)

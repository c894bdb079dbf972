"""Model families, by name. Each is one module behind :class:`distgen.families.base.Family`."""

from __future__ import annotations

from distgen.families.base import DataInfo, Family, Phase
from distgen.families.diffusion import Diffusion

# An explicit registry (no string reflection): config ``model.family`` -> class.
FAMILIES: dict[str, type[Family]] = {
    Diffusion.name: Diffusion,
}


def build_family(cfg, data: DataInfo) -> Family:
    return FAMILIES[cfg.family](cfg, data)


__all__ = ["FAMILIES", "DataInfo", "Family", "Phase", "build_family"]

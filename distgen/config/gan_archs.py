"""Each GAN architecture's part of the flat ``model`` section of the GAN family, without torch.

``model.arch`` picks one of :data:`GAN_ARCHS`. The section stays flat (``model.pl_weight``, ``model.stable_kimg``,
... as users' configs write them), but what each arch owns is declared here, once, by the arch: the fields that
switch on something only it has (refused, naming the field, when set for another arch), its own checks, its loss
default and its kind of truncation trick. :class:`distgen.config.models.GANConfig` runs these declarations;
the GAN family's arch objects (:mod:`distgen.families.gan.archs`) point at them, so that checking a config
(``distgen train --dry-run``, a login node) imports neither torch nor the networks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from distgen.config.core import check


@dataclass(frozen=True)
class GANArchConfig:
    """What one arch of the GAN family makes of the ``model`` section."""

    name: str
    label: str  # how messages name it: "ProGAN (model.arch progan)"
    # Fields that switch on something of this arch alone (they are off at their default), each with what it
    # is. Set for another arch they are refused, naming the field. An arch that shares one (spectral_norm: mlp
    # and dcgan) declares it too.
    switches: dict[str, str] = field(default_factory=dict)
    # The truncation trick at sampling (model.truncation, --truncation): "psi" lerps w towards its average
    # (StyleGAN), "resample" redraws |z| beyond a threshold (BigGAN's truncated normal), None: there is none
    truncation: Optional[str] = "resample"
    default_loss: str = "nonsaturating"  # model.loss when null
    wgan_gp_drift: float = 0.0  # model.drift when null and the loss is wgan-gp
    # Convolutional networks need a power-of-two resolution >= 8 (the MLP takes any)
    power_of_two: bool = True

    def validate(self, cfg: Any, path: str) -> None:
        """Checks of ``cfg`` (a GANConfig whose arch is this one) beyond the shared ones."""
        problem = self.truncation_problem(cfg.truncation)
        check(problem is None, f"{path}.truncation", f"{problem}; leave it null" if self.truncation is None
              else str(problem))

    def truncation_problem(self, t: Optional[float]) -> Optional[str]:
        """Why this arch cannot sample with truncation ``t`` (None: unset or fine), for the config and for
        ``--truncation`` alike."""
        if t is None or self.truncation == "psi":
            return None
        if self.truncation is None:
            return f"{self.label} has no truncation trick"
        return None if t > 0 else f"the z threshold must be > 0, got {t}"


@dataclass(frozen=True)
class StyleGAN2ArchConfig(GANArchConfig):
    """StyleGAN2's path-length regulariser (pl_weight, pl_every, pl_decay) and style mixing."""

    def validate(self, cfg: Any, path: str) -> None:
        super().validate(cfg, path)
        check(cfg.pl_every >= 1, f"{path}.pl_every", f"must be >= 1, got {cfg.pl_every}")
        check(0 < cfg.pl_decay <= 1, f"{path}.pl_decay", "must be in (0, 1]")
        check(0 <= cfg.style_mixing <= 1, f"{path}.style_mixing", "must be in [0, 1]")


@dataclass(frozen=True)
class ProGANArchConfig(GANArchConfig):
    """ProGAN's growth (stable_kimg, fade_kimg) and per-resolution batch sizes (batch_sizes)."""

    def validate(self, cfg: Any, path: str) -> None:
        super().validate(cfg, path)
        for name in ("stable_kimg", "fade_kimg"):
            check(getattr(cfg, name) >= 0, f"{path}.{name}", f"must be >= 0, got {getattr(cfg, name)}")
        check(all(b >= 1 for b in cfg.batch_sizes), f"{path}.batch_sizes", f"must be >= 1, got {cfg.batch_sizes}")


_SPECTRAL = "spectral norm in D (biggan always has it; stylegan2 does not use it)"

GAN_ARCHS: dict[str, GANArchConfig] = {a.name: a for a in (
    GANArchConfig("mlp", "the MLP GAN (model.arch mlp)", {"spectral_norm": _SPECTRAL}, power_of_two=False),
    GANArchConfig("dcgan", "DCGAN (model.arch dcgan)", {"spectral_norm": _SPECTRAL}),
    GANArchConfig("biggan", "BigGAN (model.arch biggan)",
                  {"ortho_weight": "orthogonal regularisation", "attn_res": "the self-attention's resolution"}),
    StyleGAN2ArchConfig("stylegan2", "StyleGAN2 (model.arch stylegan2)", {"pl_weight": "path-length regularisation"},
                        truncation="psi"),
    # The paper's loss, and its drift term eps x D(x_real)^2 (wgan_epsilon 0.001) that goes with it
    ProGANArchConfig("progan", "ProGAN (model.arch progan)", {"batch_sizes": "per-resolution batch sizes"},
                     truncation=None, default_loss="wgan-gp", wgan_gp_drift=0.001),
)}


def check_arch_fields(cfg: Any, path: str) -> None:
    """``cfg``'s arch's own checks, and no field that switches on another arch's feature set (each named with
    the arch(s) it belongs to)."""
    mine = GAN_ARCHS[cfg.arch]
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    owners: dict[str, list[GANArchConfig]] = {}
    for arch in GAN_ARCHS.values():
        for name in arch.switches:
            owners.setdefault(name, []).append(arch)
    for name, archs in owners.items():
        if mine in archs or getattr(cfg, name) == defaults[name]:
            continue
        whose = " / ".join(a.name for a in archs)
        check(False, f"{path}.{name}", f"{archs[0].switches[name]} is for arch {whose} only, not {cfg.arch}")
    mine.validate(cfg, path)

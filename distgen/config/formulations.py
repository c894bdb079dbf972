"""Each diffusion formulation's part of the flat ``model`` section of the diffusion families, without torch.

``model.formulation`` picks one of :data:`FORMULATIONS`: ``ddpm`` (Ho et al. 2020, discrete timesteps of a
DDPMScheduler), ``edm`` (Karras et al. 2022, sigma-preconditioning) or ``flow`` (rectified flow / flow matching,
Lipman et al. 2023, Liu et al. 2023, as SD3 trains it). The section stays flat (``model.sigma_data``,
``model.flow_shift``); what each formulation owns is declared here, once: its fields (refused, naming the field,
when set away from their default for another formulation), its checks, its samplers and its default sampler.
:class:`distgen.config.models.DiffusionConfig` runs these declarations; :mod:`distgen.families.formulations`
implements them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from distgen.config.core import check


@dataclass(frozen=True)
class FormulationConfig:
    name: str
    samplers: tuple[str, ...]  # --sampler values it takes, the first its default
    fields: dict[str, str] = field(default_factory=dict)  # its own fields, each with what it is

    @property
    def default_sampler(self) -> str:
        return self.samplers[0]

    def validate(self, cfg: Any, path: str) -> None:
        if cfg.sampler is not None:
            check(cfg.sampler in self.samplers, f"{path}.sampler",
                  f"formulation {self.name} samples with {', '.join(self.samplers)}, not {cfg.sampler}")


@dataclass(frozen=True)
class DDPMFormulationConfig(FormulationConfig):
    def validate(self, cfg: Any, path: str) -> None:
        super().validate(cfg, path)
        for name, default in (("ode_tol", 1e-5), ("probes", 1)):  # edm and flow's, both
            check(getattr(cfg, name) == default, f"{path}.{name}",
                  "the probability-flow ODE's bits/dim is for formulation edm and flow; ddpm has a variational bound")
        check(cfg.num_train_timesteps >= 2, f"{path}.num_train_timesteps", "must be >= 2")
        check(1 <= cfg.sample_steps <= cfg.num_train_timesteps, f"{path}.sample_steps",
              f"must be in [1, num_train_timesteps], got {cfg.sample_steps}")


@dataclass(frozen=True)
class ODEFormulationConfig(FormulationConfig):
    """A formulation with a probability-flow ODE: bits/dim through it (ode_tol, probes)."""

    def validate(self, cfg: Any, path: str) -> None:
        super().validate(cfg, path)
        check(0 < cfg.ode_tol < 1, f"{path}.ode_tol", f"must be in (0, 1), got {cfg.ode_tol}")
        check(cfg.probes >= 1, f"{path}.probes", f"must be >= 1, got {cfg.probes}")


@dataclass(frozen=True)
class EDMFormulationConfig(ODEFormulationConfig):
    def validate(self, cfg: Any, path: str) -> None:
        super().validate(cfg, path)
        for name in ("sigma_data", "p_std", "sigma_min", "rho", "s_noise"):
            check(getattr(cfg, name) > 0, f"{path}.{name}", f"must be > 0, got {getattr(cfg, name)}")
        check(cfg.sigma_max > cfg.sigma_min, f"{path}.sigma_max",
              f"must be > sigma_min ({cfg.sigma_min}), got {cfg.sigma_max}")
        check(math.isfinite(cfg.p_mean), f"{path}.p_mean", f"must be finite, got {cfg.p_mean}")
        check(cfg.s_churn >= 0, f"{path}.s_churn", f"must be >= 0, got {cfg.s_churn}")
        check(cfg.s_min >= 0, f"{path}.s_min", f"must be >= 0, got {cfg.s_min}")
        check(cfg.s_max is None or cfg.s_max >= cfg.s_min, f"{path}.s_max",
              f"must be >= s_min ({cfg.s_min}) or null, got {cfg.s_max}")
        check(cfg.sample_steps >= 1, f"{path}.sample_steps", f"must be >= 1, got {cfg.sample_steps}")


@dataclass(frozen=True)
class FlowFormulationConfig(ODEFormulationConfig):
    def validate(self, cfg: Any, path: str) -> None:
        super().validate(cfg, path)
        check(cfg.flow_std > 0, f"{path}.flow_std", f"must be > 0, got {cfg.flow_std}")
        check(math.isfinite(cfg.flow_mean), f"{path}.flow_mean", f"must be finite, got {cfg.flow_mean}")
        check(cfg.flow_shift > 0, f"{path}.flow_shift", f"must be > 0, got {cfg.flow_shift}")
        check(cfg.sample_steps >= 1, f"{path}.sample_steps", f"must be >= 1, got {cfg.sample_steps}")


_DDPM_FIELDS = {"prediction": "the network's target (epsilon / v) of DDPM's discrete schedule",
                "beta_schedule": "DDPM's noise schedule", "num_train_timesteps": "DDPM's discrete timesteps"}
_EDM_FIELDS = {name: "EDM's " + what for name, what in (
    ("sigma_data", "data standard deviation"), ("p_mean", "training log-sigma mean"),
    ("p_std", "training log-sigma std"), ("sigma_min", "smallest sampling sigma"),
    ("sigma_max", "largest sampling sigma"), ("rho", "sampling schedule exponent"),
    ("edm_uncertainty", "learned loss weighting (EDM2)"), ("s_churn", "stochastic sampler churn"),
    ("s_min", "churn range"), ("s_max", "churn range"), ("s_noise", "churn noise scale"))}
_FLOW_FIELDS = {"flow_t": "flow matching's time distribution", "flow_mean": "the logit-normal time's mean",
                "flow_std": "the logit-normal time's std", "flow_shift": "flow matching's timestep shift"}

FORMULATIONS: dict[str, FormulationConfig] = {f.name: f for f in (
    DDPMFormulationConfig("ddpm", ("ddim", "ddpm", "dpmsolver"), _DDPM_FIELDS),
    EDMFormulationConfig("edm", ("heun", "euler", "dpmpp_2m"), _EDM_FIELDS),
    FlowFormulationConfig("flow", ("euler", "heun"), _FLOW_FIELDS),
)}
# Every sampler of some formulation (``distgen sample --sampler`` choices)


def check_formulation_fields(cfg: Any, path: str) -> None:
    """``cfg``'s formulation's own checks, and no field of another formulation set away from its default."""
    mine = FORMULATIONS[cfg.formulation]
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    for other in FORMULATIONS.values():
        if other is mine:
            continue
        for name, what in other.fields.items():
            check(getattr(cfg, name) == defaults[name], f"{path}.{name}",
                  f"{what} is for formulation {other.name} only, not {cfg.formulation}")
    mine.validate(cfg, path)

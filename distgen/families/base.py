"""The contract between the trainer and a model family.

The training loop knows only this. A family owns its networks, says which
are trained in which *phase* (diffusion: one phase; a GAN: a discriminator
phase every step and a generator phase, each with its own optimizer; lazy
regularisers are phases that run every k steps), returns per-sample losses,
and samples. Adding a family is a new module registered in
:mod:`distgen.families`, never a change to the loop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

import torch
from torch import nn

from distgen import readback as rb
from distgen.families import checkpointing
from distgen.families.capabilities import checked_options


@dataclass(frozen=True)
class DataInfo:
    """What a family needs to know about the data (from the config and the manifest)."""

    resolution: int
    channels: int
    num_classes: int = 0


@dataclass(frozen=True)
class Phase:
    """One optimisation phase: ``network`` is trained on ``loss(phase.name, ...)`` every ``every`` steps.

    Phases of one network share its optimizer (StyleGAN2's lazy regularisation
    steps the main optimizer with the regulariser's loss), as DeepSpeed's one
    engine per network requires.
    """

    name: str
    network: str
    every: int = 1
    # The loss backpropagates through a gradient of the network (R1, a gradient penalty, path length, sliced score
    # matching): a sharding engine (FSDP2) holds the network's weights gathered from its forward to the end of the
    # phase's backward, not freed after the first backward as the second still needs them
    twice: bool = False


@dataclass(frozen=True)
class OptimSettings:
    """A network's optimizer relative to the ``train`` section: lr x ``lr_scale``, betas ** ``beta_power``
    (StyleGAN2's correction for lazy regularisation raises both to interval / (interval + 1))."""

    lr_scale: float = 1.0
    beta_power: float = 1.0


@dataclass(frozen=True)
class StepContext:
    """Where training stands when a phase's loss is taken: ``phase``, the step (``step`` steps done before it),
    the samples drawn before it over all ranks (``nimg``, the run's count, which a checkpoint records once) and
    the micro-step of gradient accumulation."""

    phase: str
    step: int = 0
    nimg: int = 0
    micro: int = 0


class PhaseNets(dict):
    """Networks by name as one phase sees them.

    Calling ``nets[name](...)`` runs the network: the one this phase trains
    goes through its engine (DDP / DeepSpeed, so gradients are synchronised),
    the others are the plain modules with gradients off (a GAN's generator
    step runs a frozen discriminator). ``nets.raw[name]`` is the plain module
    of any network, for what is not a forward pass (a weight penalty, buffers).
    """

    def __init__(self, called: dict[str, nn.Module], raw: dict[str, nn.Module]):
        super().__init__(called)
        self.raw = raw


class Family:
    """Base class of a model family. Subclasses set ``name`` and ``config_cls``.

    Every family implements the core: ``build_networks``, ``phases``, ``loss``, ``sample``, ``export`` and
    ``load_export`` (and ``state_dict`` / ``load_state_dict`` when it keeps state that is not weights). The
    other methods here are hooks with defaults that a family overrides where it needs to. What a family may
    offer beyond the core (bits/dim, reconstruction, translation, ONNX...) it declares by inheriting a class of
    :mod:`distgen.families.capabilities`.
    """

    name: ClassVar[str]
    config_cls: ClassVar[type]
    # The data a batch carries: "images" (``image``), "paired" (``a`` and ``b`` from paired shards) or
    # "unpaired" (``a`` from data.train, ``b`` from data.train_b, drawn independently)
    data_layout: ClassVar[str] = "images"
    # Logged scalars (``<phase>/<name>``) that progress lines show beside the loss (FFJORD's function evaluations)
    progress_scalars: ClassVar[tuple[str, ...]] = ()
    # Network evaluations per image of the last sample() call, where a family counts them (diffusion; figures
    # report it, ``distgen sample`` prints it as ``NFE n``); None: not counted
    last_nfe: Optional[int] = None

    def __init__(self, cfg: Any, data: DataInfo):
        self.cfg, self.data = cfg, data
        # Classes sample() takes labels of (0: unconditional); a conditional family sets it from data.num_classes
        self.num_classes = 0

    # -- networks and phases
    def build_networks(self) -> dict[str, nn.Module]:
        """Fresh networks by name (all trained by some phase)."""
        raise NotImplementedError

    def phases(self) -> list[Phase]:
        raise NotImplementedError

    def ema_networks(self) -> list[str]:
        """Networks that get EMA copies (used for sampling, evaluation and export)."""
        return list(dict.fromkeys(p.network for p in self.phases()))

    def optim_settings(self, network: str) -> OptimSettings:
        """Learning-rate scale and betas of ``network``'s optimizer (a GAN's two time-scale rule)."""
        return OptimSettings()

    def engine_problem(self, zero_stage: Optional[int]) -> Optional[str]:
        """Why this family's configuration cannot run under DeepSpeed ZeRO ``zero_stage`` (None: it can)."""
        return None

    def fsdp_problem(self) -> Optional[str]:
        """Why this family's configuration cannot train under FSDP2 (distgen.engines_fsdp), or None: what was
        measured to fail with sharded (DTensor) parameters, refused at start by name."""
        return None

    def shard_blocks(self, network: str, module: nn.Module) -> list[nn.Module]:
        """FSDP2's wrap policy for ``network``: the sub-modules sharded (gathered for their forward, freed after)
        each on their own, before the network itself takes the rest. Default: the network's direct children that
        hold parameters, the items of a container (ModuleList, ModuleDict) taken one by one. A block must not share
        a parameter with another block."""
        blocks, todo = [], list(module.children())
        while todo:
            m = todo.pop(0)
            if isinstance(m, (nn.ModuleList, nn.ModuleDict)):  # no forward of their own: FSDP2 cannot take them
                todo[:0] = list(m.children())
            elif any(True for _ in m.parameters()):
                blocks.append(m)
        return blocks

    def compile_problem(self, network: str) -> Optional[str]:
        """Why ``network``'s forward cannot be compiled (``train.compile``) in this configuration, or None.
        torch.compile has no double backward: a penalty on a gradient through the network (R1, a
        gradient penalty, path length) needs the network run eagerly."""
        return None

    def flops_problem(self) -> Optional[str]:
        """Why one step's FLOPs, counted once at the start for the records' MFU (distgen.telemetry), would not stand
        for this configuration's later steps (networks that grow, an adaptive solver), or None."""
        return None

    def checkpoint_activations(self, network: str, module: nn.Module) -> Optional[str]:
        """Switch activation checkpointing (``train.activation_checkpointing``) on in ``module``, the trained
        network ``network``, in place and keeping its state dict; None once on, or why it cannot (the start-up
        line says it; a run that names the network, or whose family can checkpoint none, is refused with it).
        The default takes the diffusers models that have it built in and distgen's networks that list their
        blocks (:class:`~distgen.families.checkpointing.Checkpointable`), wherever they sit in ``module``. A
        family overrides it where recomputing a block would not give its forward again."""
        return checkpointing.enable(module)

    def data_init(self, nets: dict[str, nn.Module], batch: dict) -> None:
        """Data-dependent initialisation (Glow's actnorm), on a fresh run only, before engines and EMAs
        exist. Every rank calls it with its own batch; the family makes the result the same on all."""

    def health(self, record: dict) -> Optional[str]:
        """Why training should stop, judged from a log record (``<phase>/<name>`` interval means over all
        ranks, the same on every rank), or None. For divergence that stays finite (an EBM's energies running
        away): the run stops as after ``train.max_nonfinite`` non-finite steps, naming the last good checkpoint."""
        return None

    def capabilities_off(self) -> dict[type, str]:
        """Capabilities (:mod:`distgen.families.capabilities`) this family declares that its configuration
        switches off, each with why, e.g. ``{Likelihood: "as an NCSN (sde ve or vp has one)"}``."""
        return {}

    def after_step(self, phase: str, raw: dict[str, nn.Module]) -> None:
        """Called after ``phase``'s optimizer step with the plain modules (e.g. WGAN's weight clipping)."""

    # -- state that is not weights (e.g. ADA's augmentation probability): plain numbers, stored in checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"the {self.name} family keeps no state, the checkpoint holds {sorted(state)}")

    # -- per-rank state that is not weights (CycleGAN's histories of generated images): tensors, stored in
    # every checkpoint once per rank
    def rank_state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_rank_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"the {self.name} family keeps no per-rank state, the checkpoint holds {sorted(state)}")

    # -- training
    def loss(self, ctx: "StepContext", nets: PhaseNets, batch: dict, generator: torch.Generator
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """Per-sample loss of phase ``ctx.phase`` (shape [B]) and extra scalars to log (averaged over the
        logging interval and the ranks, written as ``<phase>/<name>``). The loop reduces the loss. A schedule
        (a KL warm-up, ProGAN's growth) is a function of ``ctx``: no family counts steps or images itself."""
        raise NotImplementedError

    # -- sampling and export
    # Keyword options of sample() this family takes (``distgen sample/eval`` flags); others are refused.
    sample_options: ClassVar[tuple[str, ...]] = ()

    def sample(self, nets: dict[str, nn.Module], generators: list[torch.Generator], *,
               labels: Optional[torch.Tensor] = None, **options) -> torch.Tensor:
        """One image per generator, float NCHW in [-1, 1]."""
        raise NotImplementedError

    def check_sample_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """The options that are set, or a ValueError naming any this family does not take or whose value
        it cannot sample with (checked before any image is drawn)."""
        given = checked_options(options, self.sample_options, f"the {self.name} family takes no sampling option")
        self.validate_sample_options(given)
        return given

    def validate_sample_options(self, options: dict[str, Any]) -> None:
        """Raise a ValueError starting with the flag (``--steps: ...``) for a value this model cannot use."""
        t = options.get("temperature")
        if t is not None and t < 0:
            raise ValueError(f"--temperature: must be >= 0, got {t}")

    def export(self, nets: dict[str, nn.Module], out_dir: Path) -> None:
        """Write ``nets`` (EMA weights) in the family's standard format."""
        raise NotImplementedError

    def load_export(self, out_dir: Path) -> dict[str, nn.Module]:
        """Networks back from :meth:`export`, loaded without running pickled code."""
        raise NotImplementedError


def save_module(out_dir: str | Path, stem: str, module: nn.Module, spec: dict) -> None:
    """``<stem>.safetensors`` (the state dict, buffers included) and ``<stem>_config.json`` (``spec``:
    what rebuilds the module, e.g. its class and constructor arguments)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, str(out / f"{stem}.safetensors"))
    (out / f"{stem}_config.json").write_text(json.dumps(spec, indent=2) + "\n")


_MODULE_SPEC = rb.Obj({"kwargs": rb.Map(rb.Data(), max_len=200)}, extra=True)


def load_module(out_dir: str | Path, stem: str, build: Callable[[dict], nn.Module]) -> nn.Module:
    """The module of :func:`save_module`: ``build(spec)``, then its weights, loaded without running pickled code.

    The spec is untrusted: the module is first built on the meta device (no memory), and its parameter shapes
    must be those the weight file holds before it is built for real, so a crafted config cannot make distgen
    allocate a network the export's weights do not describe."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from distgen.errors import SampleError

    out = Path(out_dir)
    where, weights = out / f"{stem}_config.json", out / f"{stem}.safetensors"
    spec = rb.read_json(where, _MODULE_SPEC, error=SampleError, max_bytes=rb.MiB, what="network config")
    try:
        with safe_open(str(weights), "pt") as f:
            stored = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # missing, truncated, not safetensors
        raise SampleError(f"{weights}: not a readable safetensors file ({str(e).splitlines()[0][:200]})") from None
    try:
        with torch.device("meta"):
            want = {k: list(v.shape) for k, v in build(spec).state_dict().items()}
    except Exception as e:  # noqa: BLE001 - whatever the stored arguments break
        raise SampleError(f"{where}: does not describe a network ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if want != stored:
        diff = sorted(k for k in set(want) | set(stored) if want.get(k) != stored.get(k))
        raise SampleError(f"{weights}: its tensors do not fit the network {where.name} describes ({len(diff)} differ, "
                          f"e.g. {diff[0]}: {stored.get(diff[0])} stored, {want.get(diff[0])} described)")
    module = build(spec)
    module.load_state_dict(load_file(str(weights)))
    return module


def learned_scalar(value: float = 0.0) -> nn.Parameter:
    """A learned scalar stored with shape [1], not []: DeepSpeed's engine broadcasts every parameter
    through a uint8 view, which a 0-dim tensor cannot take ("self.dim() cannot be 0 to view ... as
    Byte"; DeepSpeed issues 7650, 8279). Broadcasting keeps the maths of a 0-dim scalar. Modules holding
    one load older 0-dim checkpoints through :func:`accept_0dim`."""
    return nn.Parameter(torch.full([1], float(value)))


def accept_0dim(state_dict: dict, key: str) -> None:
    """In a ``_load_from_state_dict`` hook: a 0-dim tensor stored for ``key`` (written before
    :func:`learned_scalar`) becomes the [1] the module holds."""
    if key in state_dict and state_dict[key].dim() == 0:
        state_dict[key] = state_dict[key].reshape(1)

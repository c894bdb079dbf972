"""EMA of network weights: diffusers' EMAModel update with EDM's half-life schedule, or EDM2's power function.

EDM (Karras et al. 2022) sets the EMA by a half-life in training samples,
``beta = 0.5 ** (batch / halflife_nimg)``, with a ramp-up that keeps the
half-life at most ``rampup x samples seen`` early in training. A fixed
per-step decay is available too. Several half-lives can run at once.

EDM2 (Karras et al. 2024) averages with a profile proportional to t^gamma over the samples seen so far,
``beta = (1 - batch / t) ** (gamma + 1)`` at t samples; its width relative to t (``sigma_rel``) fixes gamma.
Snapshots of such EMAs let :mod:`distgen.phema` reconstruct any other width after training.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Iterable, Iterator, Optional

import numpy as np
import torch
from torch import nn

from distgen import dist
from distgen.engines_deepspeed import gathered


class HalfLifeEMA:
    """An EMA of a parameter list whose decay follows EDM's half-life (and ramp-up) in samples, or a fixed value.

    The update is diffusers' EMAModel's (``s -= (1 - decay) * (s - p)``, frozen parameters copied), written out
    here because importing ``diffusers.training_utils`` pulls in diffusers' U-Nets, pipelines and transformers:
    about 5 s at the start of every training process, for twenty lines.
    """

    def __init__(self, parameters: Iterable[nn.Parameter], halflife_nimg: float, rampup: Optional[float],
                 fixed_decay: Optional[float] = None):
        self.shadow_params = [p.detach().clone() for p in parameters]
        self.optimization_step = 0
        self.halflife_nimg, self.rampup, self.fixed_decay = halflife_nimg, rampup, fixed_decay
        self.cur_nimg = 0  # samples seen after this step; set by the trainer
        self.batch = 1  # global batch of this step; set by the trainer

    def get_decay(self, optimization_step: int) -> float:
        if self.fixed_decay is not None:
            return self.fixed_decay
        h = self.halflife_nimg
        if self.rampup is not None:
            h = min(h, self.cur_nimg * self.rampup)
        return 0.5 ** (self.batch / max(h, 1e-8))

    @torch.no_grad()
    def step(self, parameters: Iterable[nn.Parameter], keep: Optional[torch.Tensor] = None,
             trainable: Optional[list[bool]] = None) -> None:
        """One update; ``keep`` (a device bool) False makes it none, decided on the device. ``trainable``: which
        parameters train (default: their ``requires_grad``; the frozen ones are copied)."""
        params = list(parameters)
        trainable = [p.requires_grad for p in params] if trainable is None else trainable
        # updates applied (a skipped step's not): counted on the device when ``keep`` decides there
        self.optimization_step = self.optimization_step + (keep.long() if keep is not None else 1)
        one_minus_decay = 1 - self.get_decay(self.optimization_step)
        with gathered(params):
            live = [(s, p) for s, p, t in zip(self.shadow_params, params, trainable) if t]
            frozen = [(s, p) for s, p, t in zip(self.shadow_params, params, trainable) if not t]
            if frozen:
                torch._foreach_copy_([s for s, _ in frozen], [p for _, p in frozen])
            if live:
                s_live = [s for s, _ in live]
                diffs = torch._foreach_sub(s_live, [p for _, p in live])
                if keep is None:
                    torch._foreach_sub_(s_live, diffs, alpha=one_minus_decay)
                else:
                    torch._foreach_mul_(diffs, keep.to(s_live[0].dtype) * one_minus_decay)
                    torch._foreach_sub_(s_live, diffs)

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[nn.Parameter]) -> None:
        for s, p in zip(self.shadow_params, parameters):
            p.copy_(s.to(p.device, p.dtype))


def exp_to_std(gamma: float) -> float:
    """sigma_rel of the power profile t^gamma (EDM2, eq. 123)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def std_to_exp(sigma_rel: float) -> float:
    """gamma of the power profile of relative width ``sigma_rel``: the largest real root of
    gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2) (EDM2, eq. 126, algorithm 2)."""
    t = sigma_rel ** -2
    return float(np.roots([1, 7, 16 - t, 12 - t]).real.max())


class PowerEMA(HalfLifeEMA):
    """EDM2's power-function EMA of relative width ``sigma_rel``: after t samples it averages the weights
    seen so far with density proportional to t'^gamma, by ``beta = (1 - batch / t) ** (gamma + 1)``
    (EDM2, eq. 127); the first update (t = batch) copies the weights."""

    def __init__(self, parameters: Iterable[nn.Parameter], sigma_rel: float):
        super().__init__(parameters, halflife_nimg=1.0, rampup=None)
        self.sigma_rel, self.gamma = sigma_rel, std_to_exp(sigma_rel)

    def get_decay(self, optimization_step: int) -> float:
        return max(1 - self.batch / max(self.cur_nimg, self.batch), 0.0) ** (self.gamma + 1)


class EMASet:
    """One or more EMAs of one network, with a module copy to sample from."""

    def __init__(self, network: nn.Module, halflives_kimg: Iterable[float] = (), rampup: Optional[float] = None,
                 fixed_decay: Optional[float] = None, power_stds: Iterable[float] = ()):
        # A full copy made before any sharding, to sample from: every rank holds it whole
        self.module = copy.deepcopy(network).eval().requires_grad_(False)
        self.emas = [HalfLifeEMA(network.parameters(), h * 1000, rampup, fixed_decay) for h in halflives_kimg]
        self.emas += [PowerEMA(network.parameters(), s) for s in power_stds]
        # Under FSDP2 (distgen.engines_fsdp.ShardLayout) or ZeRO-3 (distgen.engines_deepspeed.ZeroLayout): each
        # rank keeps its shard of every EMA, gathered whole only inside gathered_emas(); None: whole EMAs everywhere
        self.layout, self.layout_gathered = None, False
        self.shapes = [p.shape for p in self.module.parameters()]

    def shard(self, layout) -> None:
        """Keep only this rank's shard of every EMA from now on (the network was sharded by ``layout``), and
        the module to sample from without its parameters' storage: it is given whole tensors only while the
        EMAs are gathered (:func:`gathered_emas`), so at rest a rank holds 1/world of the EMAs and no copy."""
        self.layout = layout
        for e in self.emas:
            e.shadow_params = [layout.local(i, s) for i, s in enumerate(e.shadow_params)]
        self._storage(whole=False)

    def _storage(self, whole: bool) -> None:
        """The module's parameters given whole (uninitialised: :meth:`materialize` fills them) or no storage."""
        for p, shape in zip(self.module.parameters(), self.shapes):
            p.data = torch.empty(shape if whole else (0,), dtype=p.dtype, device=p.device)

    def held(self) -> tuple[int, int]:
        """How many EMA values this rank holds, and how many the whole EMAs have (equal unless sharded)."""
        whole = sum(math.prod(shape) for shape in self.shapes) * len(self.emas)
        return sum(s.numel() for e in self.emas for s in e.shadow_params), whole

    @classmethod
    def from_config(cls, network: nn.Module, ec) -> "EMASet":
        """The EMAs the ``ema`` config section asks for: half-life ones, or power-function ones (ema.kind)."""
        if ec.kind == "power":
            return cls(network, power_stds=ec.power_stds)
        return cls(network, ec.halflife_kimg, ec.rampup, ec.decay)

    @torch.no_grad()
    def update(self, params: list[nn.Parameter], cur_nimg: int, batch: int, network: Optional[nn.Module] = None,
               keep: Optional[torch.Tensor] = None) -> None:
        """Move every EMA towards ``params`` (sharded ones: each rank its shards, from its shards of ``params``; whole
        EMAs of ZeRO-3-partitioned parameters gather them), unless ``keep`` (a device bool: the step went through)
        is False.

        Buffers (batch-norm statistics, spectral-norm vectors, StyleGAN's average w)
        are not averaged: they are copied from ``network``, as StyleGAN2-ADA does.
        """
        trainable = [p.requires_grad for p in params]
        if self.layout is not None:  # the sharded network's parameters: this rank's shards
            params = self.layout.live(params)
        for e in self.emas:
            e.cur_nimg, e.batch = cur_nimg, batch
            e.step(params, keep, trainable)
        if network is not None:
            live = dict(network.named_buffers())
            for name, b in self.module.named_buffers():
                b.copy_(live[name])

    def materialize(self, index: int = 0) -> nn.Module:
        """The module holding EMA number ``index`` (0: the primary one)."""
        self.emas[index].copy_to(self.module.parameters())
        return self.module

    def _buffers(self) -> dict[str, torch.Tensor]:
        """The module's persistent buffers, by state-dict name."""
        params = {n for n, _ in self.module.named_parameters()}
        return {n: t for n, t in self.module.state_dict().items() if n not in params}

    def state(self) -> tuple[list[dict[str, torch.Tensor]], list[int]]:
        """Each EMA as a full state dict (EMA parameters plus the buffers) and its step counter, for checkpoints;
        ``module.load_state_dict`` takes each dict as it is."""
        names = [n for n, _ in self.module.named_parameters()]
        buffers = {n: t.detach().clone().contiguous() for n, t in self._buffers().items()}
        tensors = [{**{n: t.detach().contiguous() for n, t in zip(names, e.shadow_params)}, **buffers}
                   for e in self.emas]
        return tensors, [int(e.optimization_step) for e in self.emas]

    def load(self, tensors: list[dict[str, torch.Tensor]], steps: list[int]) -> None:
        names = [n for n, _ in self.module.named_parameters()]
        if len(tensors) != len(self.emas):
            raise ValueError(f"checkpoint holds {len(tensors)} EMA(s), config asks for {len(self.emas)}")
        buffers = self._buffers()
        for e, t, s in zip(self.emas, tensors, steps):
            missing = (set(names) | set(buffers)) - set(t)
            if missing:
                raise ValueError(f"EMA tensors lack {sorted(missing)[:3]}")
            for i, (sp, n) in enumerate(zip(e.shadow_params, names)):
                sp.copy_(t[n] if self.layout is None or self.layout_gathered else self.layout.local(i, t[n]))
            e.optimization_step = s
        with torch.no_grad():
            for n, b in buffers.items():
                b.copy_(tensors[0][n])


@contextlib.contextmanager
def gathered_emas(sets: dict[str, EMASet]) -> Iterator[None]:
    """Every rank alike (a collective under FSDP2 and ZeRO-3): inside, every EMA holds whole tensors (to sample,
    evaluate, snapshot or save them); after, each rank's shard again, as it was. Nothing to do for whole EMAs."""
    sharded = [s for s in sets.values() if s.layout is not None]
    kept = [[e.shadow_params for e in s.emas] for s in sharded]
    try:
        for s in sharded:
            for e in s.emas:
                e.shadow_params = s.layout.full(e.shadow_params)
            s.layout_gathered = True
            s._storage(whole=True)
        yield
    finally:
        for s, shards in zip(sharded, kept):
            for e, sh in zip(s.emas, shards):
                e.shadow_params = sh
            s.layout_gathered = False
            s._storage(whole=False)


def shards_held(sets: dict[str, EMASet]) -> Optional[str]:
    """What this rank holds of sharded EMAs, for the start-up line (None: every EMA whole)."""
    held = {n: s.held() for n, s in sets.items() if s.layout is not None}
    if not held:
        return None
    return "EMAs kept as shards, gathered only to sample, evaluate and save: " + ", ".join(
        f"{n} {h} of {w} values on rank {dist.rank()}" for n, (h, w) in held.items())

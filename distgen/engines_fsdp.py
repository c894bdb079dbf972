"""FSDP2 (PyTorch's ``fully_shard``: every parameter a DTensor sharded on dim 0 across the processes), the third
engine beside DDP and DeepSpeed, in one place: what the launcher asked for, what cannot run, sharding a network
block by block, the optimizer step on sharded gradients, the EMAs' shards and the full state dicts a checkpoint
holds.

``accelerate launch --config_file configs/accelerate/fsdp2.yaml`` sets ``ACCELERATE_USE_FSDP=true`` and
``FSDP_VERSION=2``. distgen builds its Accelerator without that request (Accelerate would wrap the networks itself)
and shards each trained network here: the blocks the family names (:meth:`Family.shard_blocks`), then the
network, each with ``reshard_after_forward=True`` (the root too: a GAN calls each network in the other's phase,
where its parameters must be sharded again afterwards, not held whole until a backward that never comes). A phase
that backpropagates through a gradient of its network (``Phase.twice``) holds it gathered to the end of its
backward instead (:meth:`FSDP2.gathered`).

Precision: ``train.mixed_precision=bf16`` (or ``fp16``) gives ``MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=fp32)`` (the shards, the optimizer and the EMAs stay float32; the gathered weights a forward uses are
16-bit; gradients are reduced in float32), and one ``torch.autocast`` around a phase's loss, as under DeepSpeed, so
the networks a phase calls that no engine shards (a frozen autoencoder) run in the same precision. fp16 adds
``ShardedGradScaler``: the loss scaled before backward, the gradient shards unscaled before the global-norm clip,
its inf check all-reduced (every rank skips the same updates), its state in the checkpoint's scaler file.

Checkpoints are distgen's ordinary ones: full state dicts gathered on save (rank 0 writes them) and scattered
again on resume, so an FSDP2 checkpoint samples, exports and resumes like a DDP one (at any process count,
under DDP too), and the other way round. The optimizer's file has DDP's layout (states by parameter index).
With ``train.checkpoint_format: sharded`` every rank writes its own shards instead (distgen.checkpoint_dcp).
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from distgen import dist

FSDP_ENV, VERSION_ENV = "ACCELERATE_USE_FSDP", "FSDP_VERSION"


def fsdp_request() -> Optional[str]:
    """The FSDP version the launcher asked for ("2"; "1" is refused later), or None."""
    if os.environ.get(FSDP_ENV, "").lower() != "true":
        return None
    return os.environ.get(VERSION_ENV, "1").strip()


@contextlib.contextmanager
def without_accelerate_fsdp() -> Iterator[None]:
    """The launcher's FSDP request hidden while the Accelerator is built (distgen shards, not Accelerate); put
    back after, for the next run in this process (a sweep, a test matrix)."""
    saved = os.environ.pop(FSDP_ENV, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[FSDP_ENV] = saved


def config_problem(version: str, tc, device: torch.device) -> Optional[str]:
    """Why ``train``'s settings cannot run under the launcher's FSDP request (None: they can)."""
    if version != "2":
        return (f"the launcher asked for FSDP version {version} (fsdp_version in the accelerate config); distgen "
                f"shards with FSDP2 only: set fsdp_version: 2 (configs/accelerate/fsdp2.yaml)")
    if tc.channels_last is True:  # tests/scripts/fsdp_shards.py checks that fully_shard still refuses them
        return ("train.channels_last: FSDP2's fully_shard takes only contiguous parameters (torch 2.14, on a "
                "channels_last conv weight: \"FSDP does not support non-contiguous parameters yet\") and gathers "
                "each one contiguous; use channels_last false (auto leaves it off)")
    return None


# Methods that networks are called through instead of forward (diffusers' autoencoders: encode, decode), which
# FSDP2's gather-and-free hooks must wrap as they wrap forward
FORWARD_METHODS = ("encode", "decode")


def half_weights_problem(net: nn.Module) -> Optional[str]:
    """Why ``net``'s weights are gathered in float32 under bf16 or fp16 (None: in 16 bits). MixedPrecisionPolicy casts
    the parameters, not the buffers, and a forward that combines float32 buffers with the weights outside autocast's
    casts fails in bf16 (measured on CPU, torch 2.14: batch norm's running statistics in DCGAN, "expected scalar
    type BFloat16 but found Float"; spectral norm's power iteration in JEM, "addmv input tensors must have the same
    dtype"). A network that turns autocast off to run in float32 says why in ``float32_forward`` (FFJORD: the policy
    would otherwise cast its ODE states to bf16 at each block's forward, and odeint_adjoint's backward solve meets
    bf16 weights with float32 states)."""
    if getattr(net, "float32_forward", None):  # a network that runs in float32 whatever the run's precision
        return net.float32_forward
    found = sorted({n.rsplit(".", 1)[-1] for n, b in net.named_buffers() if b.is_floating_point()})
    return f"float32 buffers ({', '.join(found[:3])})" if found else None


HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


class FSDP2:
    """The sharding of one run: its device mesh (every process, one dimension), mixed precision and, under fp16,
    the loss scaler (``ShardedGradScaler``: its inf check is all-reduced, so every rank skips alike)."""

    def __init__(self, device: torch.device, mixed_precision: str):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        self.mesh = init_device_mesh(device.type, (dist.world_size(),))
        self.dtype = HALF.get(mixed_precision)
        self.mp = (MixedPrecisionPolicy(param_dtype=self.dtype, reduce_dtype=torch.float32) if self.dtype
                   else MixedPrecisionPolicy())
        self.scaler = ShardedGradScaler(device.type) if mixed_precision == "fp16" else None
        self.device = device

    def shard(self, net: nn.Module, blocks: list[nn.Module]) -> None:
        """``fully_shard`` each block, then the network (its remaining parameters), in place. A network holding
        floating-point buffers gathers float32 weights (see :func:`half_weights_problem`); autocast still applies."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        mp = self.mp if half_weights_problem(net) is None else MixedPrecisionPolicy()
        for m in [*blocks, net]:
            fully_shard(m, mesh=self.mesh, mp_policy=mp, reshard_after_forward=True)
            # called instead of forward, or beside it (the module's forward_methods): gather (and free) around them
            for method in (*FORWARD_METHODS, *getattr(m, "forward_methods", ())):
                if callable(getattr(m, method, None)):
                    register_fsdp_forward_method(m, method)

    @staticmethod
    @contextlib.contextmanager
    def gathered(net: nn.Module) -> Iterator[None]:
        """``net``'s weights held gathered from its forward to the end of its backward (a phase that differentiates
        through it twice: Phase.twice), then freed. With the weights freed after the forward or after the first
        backward (FSDP2's default), the second backward failed ("The tensor has a non-zero number of elements, but
        its data is not allocated yet"; torch 2.14, gloo). The cost: the whole network's weights in memory during
        that phase's forward and backward. Freed again before the optimizer step, which clips the sharded
        gradients that ``net.parameters()`` only return once it is sharded again."""
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in net.modules() if isinstance(m, FSDPModule)]
        for m in units:
            m.set_reshard_after_forward(False, recurse=False)
            m.set_reshard_after_backward(False, recurse=False)
        try:
            yield
        finally:
            for m in units:
                m.reshard()
                m.set_reshard_after_forward(True, recurse=False)
                m.set_reshard_after_backward(True, recurse=False)

    def autocast(self):
        """One autocast region around a phase's loss (bf16 or fp16), as under DeepSpeed, without autocast's cache
        of weight casts. A network gathered in float32 (:func:`half_weights_problem`) and called twice in a phase
        reused the first call's cast of each gathered parameter, whose gradient node, older than the second
        forward's, ran after FSDP2's post-backward had reduced that unit's gradients: the gradient came one step
        late (none at a process's first step). Measured on JEM's spectral-normalised energy network (SGLD's calls,
        then the loss's; torch 2.14, gloo): 9 of its 20 parameters (the biases outside the stem) without
        gradient at first, and no exact resume."""
        if self.dtype is not None:
            return torch.autocast(self.device.type, dtype=self.dtype, cache_enabled=False)
        return contextlib.nullcontext()

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to backpropagate: scaled under fp16."""
        return self.scaler.scale(loss) if self.scaler is not None else loss

    # ---- the optimizer step
    def step(self, t, bad: torch.Tensor, tc, tally) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Clip the sharded gradients by their global norm, skip a non-finite (or, with train.skip_grad_norm,
        extreme) update, step, project (EDM2) and zero the gradients: :meth:`distgen.engines.Engine.step`'s
        semantics. The skip reads the flag on the host once per step (no fused kernel's found_inf here).

        Under fp16 the gradients are unscaled first (the clip and the skip see their true norm), and a non-finite
        norm is the scaler's overflow, as under DDP's GradScaler: counted in ``overflow_total`` (not ``bad``), the
        update skipped by the scaler, whose scale backs off (``update`` runs every step, stepped or not)."""
        if self.scaler is not None:
            self.scaler.unscale_(t.opt)  # found_inf all-reduced over the ranks
        norm = torch.nn.utils.clip_grad_norm_([p for p in t.raw.parameters() if p.grad is not None],
                                              tc.grad_clip if tc.grad_clip > 0 else float("inf"))
        norm = full(norm)
        overflow = ~torch.isfinite(norm)
        if self.scaler is None:
            bad = bad | overflow
        held = None
        if tc.skip_grad_norm:
            held = (norm > tc.skip_grad_norm) & ~bad & ~overflow
            tally.count("skipped_updates_total", held)
        skip = bad if held is None else bad | held
        if not bool(skip):
            if self.scaler is not None:
                tally.count("overflow_total", overflow)
                self.scaler.step(t.opt)  # no update where the gradients overflowed
            else:
                t.opt.step()
        if self.scaler is not None:
            self.scaler.update()
        project_local(t.projections)
        t.opt.zero_grad(set_to_none=True)
        return bad, held

    # ---- checkpoints: full state dicts
    @staticmethod
    def model_state(net: nn.Module) -> dict:
        """Every rank (a collective): the network's full state dict, on rank 0 (in CPU memory; {} elsewhere)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    @staticmethod
    def optimizer_state(net: nn.Module, opt: torch.optim.Optimizer) -> dict:
        """Every rank (a collective): the optimizer's full state in DDP's layout (states by parameter index, in
        the order the optimizer holds its parameters), on rank 0 ({} elsewhere)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        by_name = get_optimizer_state_dict(net, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not by_name:
            return {}
        names = _param_names(net, opt)
        index = {n: i for i, n in enumerate(names)}
        state = {index[n]: s for n, s in by_name["state"].items()}
        groups = [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]]
        return {"state": dict(sorted(state.items())), "param_groups": groups}

    @staticmethod
    def load(net: nn.Module, opt: torch.optim.Optimizer, weights: dict, optimizer: dict) -> None:
        """Every rank: full state dicts (as :meth:`model_state` and :meth:`optimizer_state` give them, or as a DDP
        run wrote them) into the sharded network and its optimizer, each rank keeping its shards."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(net, weights, options=options)
        names = _param_names(net, opt)
        by_name = {"state": {names[int(i)]: s for i, s in optimizer["state"].items()},
                   "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]}
                                    for g in optimizer["param_groups"]]}
        set_optimizer_state_dict(net, opt, by_name, options=options)


def _param_names(net: nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """The name of each parameter the optimizer holds, in its order (DDP's state-dict indices)."""
    name_of = {id(p): n for n, p in net.named_parameters()}
    return [name_of[id(p)] for g in opt.param_groups for p in g["params"]]


def full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole (a collective), or ``t`` itself."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: writes reach the parameter), or ``t`` itself."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def project_local(pairs: list[tuple[nn.Parameter, Callable]]) -> None:
    """EDM2's projection on each rank's shard: it normalises every output row (dim 0), and FSDP2 shards dim 0, so
    each rank holds whole rows and the projection of the shard is the shard of the projection."""
    for p, fn in pairs:
        shard = local(p)
        if shard.numel():
            shard.copy_(fn(shard))


class ShardLayout:
    """How a network's parameters are sharded, for its EMAs (:class:`distgen.ema.EMASet`): each rank keeps and
    updates only its shard of every EMA, gathered whole when sampling, evaluating or saving."""

    def __init__(self, params: list[torch.Tensor]):
        from torch.distributed.tensor import DTensor

        self.specs = [(p.device_mesh, p.placements, p.shape, p.stride()) if isinstance(p, DTensor) else None
                      for p in params]

    def local(self, i: int, whole: torch.Tensor) -> torch.Tensor:
        """Parameter ``i``'s shard of the whole tensor ``whole`` (which every rank holds alike: no collective)."""
        spec = self.specs[i]
        if spec is None:
            return whole
        from torch.distributed.tensor import distribute_tensor

        mesh, placements, _, _ = spec
        return distribute_tensor(whole.detach().to(mesh.device_type), mesh, placements,
                                 src_data_rank=None).to_local().clone()

    def live(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """This rank's shards of the parameters themselves, to update the EMAs' shards from (no collective)."""
        return [local(p) for p in params]

    def full(self, shards: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every parameter whole from this rank's shards (a collective: every rank calls it alike)."""
        from torch.distributed.tensor import DTensor

        out = []
        for spec, s in zip(self.specs, shards):
            if spec is None:
                out.append(s)
                continue
            mesh, placements, shape, stride = spec
            out.append(DTensor.from_local(s, mesh, placements, run_check=False, shape=shape,
                                          stride=stride).full_tensor())
        return out

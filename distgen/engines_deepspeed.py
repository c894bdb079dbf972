"""Every use distgen makes of DeepSpeed's internals, in one place, for the DeepSpeed release it was written and
tested against (:data:`TESTED_VERSION`, the one requirements.lock pins).

The rest of distgen uses DeepSpeed through Accelerate and the engine's public methods only; what it needs beyond
them (the fp16 loss scale, a checkpoint reader that refuses pickled code, releasing ZeRO-3's gathered parameters,
ZeRO-3's partition layout for the EMAs' shards) reads or replaces attributes that DeepSpeed may rename or drop in
any release.
A DeepSpeed engine is therefore built only under the tested release (:func:`check_version`): another one fails by
name at start, not with an AttributeError mid-run or, worse, a silently inexact resume.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Optional

import torch

from distgen import checkpoint as ckpt
from distgen.errors import CheckpointError, TrainingError

TESTED_VERSION = "0.19.8"  # requirements.lock's deepspeed (tests/test_units.py checks they agree)
ALLOW_ENV = "DISTGEN_ALLOW_UNTESTED_DEEPSPEED"  # =1: build the engine under another release anyway


def installed_version() -> str:
    """The installed DeepSpeed's version, from its package metadata (no import of DeepSpeed)."""
    from importlib.metadata import version

    return version("deepspeed")


def _release(v: str) -> tuple[int, ...]:
    """``0.19.8`` of ``0.19.8``, ``0.19.8+cu124`` or ``0.19.8.post1``: the numbered release, builds aside."""
    m = re.match(r"\d+(\.\d+)*", v.strip())
    return tuple(int(x) for x in m.group(0).split(".")) if m else ()


def version_problem(installed: Optional[str] = None) -> Optional[str]:
    """Why a DeepSpeed engine is not built under the installed DeepSpeed (None under the tested release, or
    when :data:`ALLOW_ENV` is set)."""
    installed = installed_version() if installed is None else installed
    if _release(installed) == _release(TESTED_VERSION) or os.environ.get(ALLOW_ENV, "") == "1":
        return None
    return (f"DeepSpeed {installed} is installed, but distgen reads DeepSpeed internals (loss scale, checkpoint "
            f"reader, ZeRO-3 parameter release) as of DeepSpeed {TESTED_VERSION} only: install "
            f"deepspeed=={TESTED_VERSION} (requirements.lock), or set {ALLOW_ENV}=1 to train with {installed} "
            f"untested (exact resume unchecked)")


def check_version() -> None:
    """A TrainingError naming the installed and the tested release, where they differ (see :func:`version_problem`)."""
    problem = version_problem()
    if problem:
        raise TrainingError(problem)


class DeepSpeedInternals:
    """What distgen does with a DeepSpeed engine beyond its public API, for one run's ZeRO stage."""

    def __init__(self, zero_stage: Optional[int]):
        self.zero_stage = zero_stage

    def adopt(self, engine) -> None:
        """A freshly prepared engine: read its checkpoints with torch.load(weights_only=True) (no pickled code)."""
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        if type(engine.checkpoint_engine) is TorchCheckpointEngine:
            engine.checkpoint_engine = safe_checkpoint_engine(engine.checkpoint_engine)

    @staticmethod
    def loss_scale(engine) -> Optional[float]:
        """The dynamic loss scale of a DeepSpeed engine under fp16 (None without one). A step whose scale
        comes out lower than it went in was skipped for an overflow: that is the scaler's only reason to back off."""
        opt = getattr(engine, "optimizer", None)
        for scaler in (getattr(opt, "torch_autocast_gradscaler", None),
                       getattr(engine, "torch_autocast_z0_gradscaler", None)):
            if scaler is not None and scaler.is_enabled():
                return float(scaler.get_scale())
        ls = getattr(opt, "loss_scaler", None)  # DeepSpeed's own fp16 mode
        if ls is not None and getattr(ls, "dynamic", False):
            return float(ls.cur_scale)
        return None

    @staticmethod
    def project(pairs: list) -> None:
        """After DeepSpeed's optimizer step: each parameter replaced by its projection (``(parameter, fn)`` pairs of
        :func:`distgen.engines.projections`), in the module's weights *and* in the optimizer's fp32 master copy,
        which the next step starts from (a write into the module's weights alone is undone by it).

        distgen runs DeepSpeed with torch_autocast, so the module's weights are float32, as the master is: copying
        one into the other is exact. ZeRO-1/2: every rank holds the full weight and computes the same projection
        (as every DDP replica does); ``safe_set_full_fp32_param`` writes the rank's own fragment of the master.
        ZeRO-3: the weight is gathered, projected on rank 0, broadcast and partitioned back into every rank's shard
        (``GatheredParameters(modifier_rank=0)``), and that shard is copied into the master's
        (``safe_set_local_fp32_param``: the full-value setter cuts the last rank's padded shard out of the
        unpadded value, out of range where the size is not a multiple of the world size). Under torch_autocast
        without offload DeepSpeed makes the two shards one tensor, and the copy changes nothing. One parameter at
        a time: ZeRO-3 holds one gathered weight at most.
        """
        if not pairs:
            return
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param

        for p, fn in pairs:
            with torch.no_grad(), gathered([p], modifier_rank=0):
                value = fn(p.data)
                p.data.copy_(value)
            if hasattr(p, "ds_id"):
                safe_set_local_fp32_param(p, p.ds_tensor.data)
            else:
                safe_set_full_fp32_param(p, value)

    def save(self, engine, folder: Path) -> None:
        """Every rank: the engine's partitioned model and optimizer states into ``folder``."""
        engine.save_checkpoint(str(folder), tag="state")
        self._release_gathered(engine)

    def load(self, engine, folder: Path, checkpoint: Path) -> None:
        """Every rank: the states :meth:`save` wrote into ``folder`` (of the checkpoint folder ``checkpoint``) back
        into the engine, or a CheckpointError naming the folder."""
        try:
            engine.load_checkpoint(str(folder), tag="state", load_lr_scheduler_states=False)
        except Exception as e:  # a truncated or tampered DeepSpeed file (pickled code is refused)
            raise CheckpointError(f"{folder}: {ckpt.describe_failure(checkpoint, e)}") from None
        self._release_gathered(engine)

    def _release_gathered(self, engine) -> None:
        """ZeRO-3: partition the network's parameters again after DeepSpeed saved or loaded its checkpoint.

        DeepSpeed ends both by all-gathering its "persistent" parameters (stage3_param_persistence_threshold:
        those of at most 1e5 elements by default, all of a small network's) in float32, and leaves them gathered.
        A training step leaves them partitioned instead (the EMA update, which every network ZeRO-3 trains has,
        releases all it gathered), so the next forward fetches them through ZeRO-3's forward hooks, which gather
        Linear/Conv weights in the torch_autocast dtype: bfloat16-valued copies. Autocast rounds float32 weights
        to the same values, but ZeRO-3's memory-efficient linear (DeepSpeed's replacement of F.linear) adds the
        bias uncast to inputs of more than 2 dims (a U-Net's attention projections): with the exact float32
        biases a checkpoint left gathered, the step after a resume (or after any save) computed another loss than
        the straight run's (by up to 2e-2), and training went on from there. Released here, the step after a
        checkpoint runs as every other step does.
        """
        if self.zero_stage == 3:
            engine.empty_partition_cache()  # releases every parameter, the persistent ones included


class ZeroLayout:
    """How ZeRO-3 partitions a network's parameters, for its EMAs (:class:`distgen.ema.EMASet`), as
    :class:`distgen.engines_fsdp.ShardLayout` is FSDP2's: each rank keeps and updates only its partition of every
    EMA (1/world of it), gathered whole when sampling, evaluating, snapshotting or saving.

    DeepSpeed's layout (``partition_parameters._partition_param``): a parameter of ``ds_numel`` elements, flattened
    and padded to a multiple of the partition group's size, is cut into equal parts of ``ds_tensor.ds_numel``
    elements; rank r's ``ds_tensor`` holds part r. The EMA's shard is that part without the padding (the last
    rank's may be shorter, or empty).
    """

    def __init__(self, params: list[torch.nn.Parameter]):
        import torch.distributed as td

        self.specs = []  # per parameter: (group, world, part, start, count, shape, numel), or None (not partitioned)
        for p in params:
            if not hasattr(p, "ds_id"):
                self.specs.append(None)
                continue
            group, part = p.ds_process_group, p.ds_tensor.ds_numel
            start = min(td.get_rank(group) * part, p.ds_numel)
            self.specs.append((group, td.get_world_size(group), part, start, min(part, p.ds_numel - start),
                               p.ds_shape, p.ds_numel))

    def local(self, i: int, whole: torch.Tensor) -> torch.Tensor:
        """Parameter ``i``'s shard of the whole tensor ``whole`` (which every rank holds alike: no collective)."""
        spec = self.specs[i]
        if spec is None:
            return whole
        _, _, _, start, count, _, _ = spec
        return whole.detach().reshape(-1)[start:start + count].clone()

    def live(self, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
        """This rank's shards of the parameters themselves (views of their partitions, the float32 master under
        distgen's torch_autocast), to update the EMAs' shards from: no collective.

        First the parameters ZeRO-3 holds gathered (its persistent ones, all-gathered after every step) are
        partitioned again, as the exit of the gather the whole EMAs' update ran did: the next forward fetches
        them through the hooks, as every step's does (see :meth:`DeepSpeedInternals._release_gathered` for what
        exact float32 copies left gathered do to the next step's loss)."""
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        held = [p for p, spec in zip(params, self.specs)
                if spec is not None and p.ds_status == ZeroParamStatus.AVAILABLE]
        if held:
            held[0].partition(param_list=held, has_been_updated=False)
        return [p if spec is None else p.ds_tensor.narrow(0, 0, spec[4]).to(p.device)
                for p, spec in zip(params, self.specs)]

    def full(self, shards: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every parameter whole from this rank's shards (a collective: every rank calls it alike); one parameter
        gathered at a time, so that no more than one more whole parameter is held meanwhile."""
        import torch.distributed as td

        out = []
        for spec, s in zip(self.specs, shards):
            if spec is None:
                out.append(s)
                continue
            group, world, part, _, count, shape, numel = spec
            padded = torch.cat([s.reshape(-1), s.new_zeros(part - count)])
            parts = [torch.empty_like(padded) for _ in range(world)]
            td.all_gather(parts, padded, group=group)
            out.append(torch.cat(parts)[:numel].view(shape))
        return out


def held(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` this rank holds: a ZeRO-3 parameter's partition (its own storage is emptied), else ``t``."""
    return getattr(t, "ds_tensor", t)


def gathered(params: list[torch.nn.Parameter], modifier_rank: Optional[int] = None):
    """Under DeepSpeed ZeRO-3 each rank holds a shard of every parameter: gather the full tensors (for the EMA's
    update: read-only, ``modifier_rank=None`` writes nothing back; with a rank, that rank's edits are broadcast and
    partitioned back into every rank's shard on exit)."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)
    return contextlib.nullcontext()


def safe_globals() -> list:
    """The non-tensor types DeepSpeed puts in its checkpoint files (checked by the ZeRO tests)."""
    out = []
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

        out += [LossScaler, DynamicLossScaler]
    except ImportError:
        pass
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum

        out.append(ZeroStageEnum)
    except ImportError:
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address

        out.append(fragment_address)
    except ImportError:
        pass
    return out


def safe_checkpoint_engine(base):
    """DeepSpeed's torch checkpoint engine ``base``, reading with ``weights_only=True``.

    DeepSpeed reads its own files with ``weights_only=False``, which would run any pickled code a
    tampered checkpoint holds. This engine allows tensors, plain data and the few DeepSpeed value types
    above, nothing else.
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def __init__(self, base: TorchCheckpointEngine):  # noqa: D107 - adopts the configured engine's settings
            self.__dict__.update(base.__dict__)

        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    return SafeTorchCheckpointEngine(base)

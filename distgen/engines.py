"""The engines that train networks, behind one small interface: DDP through one Accelerator, DeepSpeed ZeRO with
one Accelerator (hence one engine) per trained network, or FSDP2 (``fully_shard``, distgen.engines_fsdp).
Everything that differs between them lives here (:class:`Engine`): making the Accelerators, checking before any
compute what an engine cannot do, preparing networks and optimizers, the precision context, backward and the
optimizer step, and what a checkpoint holds of the engine's state. The training loop has no engine branch.

Precision under DeepSpeed: distgen's ``train.mixed_precision`` decides, and DeepSpeed runs it as
``torch_autocast`` (DeepSpeed >= 0.16), not as its ``bf16``/``fp16`` modes. Those modes cast the
module's weights to 16 bits and leave its inputs as they are (DeepSpeed issue 4772: "Input type
(float) and bias type (BFloat16)"), break on 0-dim parameters, and would hand the EMA, samples and
exports 16-bit weights. With ``torch_autocast`` the weights stay float32 as under DDP's autocast,
each op runs in the precision autocast gives it, and the same autocast region (one place, around a
phase's loss) covers the networks a phase calls outside their engine (a GAN's frozen discriminator).
Under fp16 DeepSpeed's ZeRO optimizers scale the loss with torch's GradScaler.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Callable, Optional

import torch

from distgen import checkpoint as ckpt
from distgen import dist
from distgen.durable import sync_tree
from distgen.engines_deepspeed import DeepSpeedInternals, ZeroLayout, check_version
from distgen.engines_fsdp import FSDP2, ShardLayout, config_problem, fsdp_request, without_accelerate_fsdp
from distgen.errors import TrainingError

AUTOCAST_DTYPE = {"bf16": "bfloat16", "fp16": "float16"}
_PRECISION_KEYS = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16"}


def _enabled(section) -> Optional[bool]:
    """A DeepSpeed config section's ``enabled`` as set in a file: True / False, or None for "auto" or unset."""
    if not isinstance(section, dict) or "enabled" not in section:
        return None
    v = str(section["enabled"]).lower()
    return None if v == "auto" else v == "true"


def deepspeed_file_precision_problem(mixed_precision: str, path: Optional[str] = None) -> Optional[str]:
    """Why the launcher's DeepSpeed config file (``$ACCELERATE_DEEPSPEED_CONFIG_FILE``) contradicts
    ``train.mixed_precision`` (None when it does not, or sets precision to "auto" or not at all).

    Checked before the Accelerator exists: Accelerate would otherwise fail with a bare ValueError on some
    conflicts and silently train in the file's precision on others.
    """
    path = path or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not path or not Path(path).is_file():
        return None
    try:
        ds = json.loads(Path(path).read_text())
    except ValueError:
        return None  # not JSON: DeepSpeed's own reader reports it
    if not isinstance(ds, dict):
        return None
    for key, kind in _PRECISION_KEYS.items():
        on = _enabled(ds.get(key))
        if on and mixed_precision != kind:
            return (f"train.mixed_precision={mixed_precision} conflicts with {key}.enabled=true in the DeepSpeed "
                    f"config {path}; distgen's config decides the precision: set {key}.enabled to \"auto\" in the "
                    f"file (or remove it), or train with train.mixed_precision={kind}")
    ta = ds.get("torch_autocast")
    if _enabled(ta):
        dtype = str(ta.get("dtype", "bfloat16")).replace("torch.", "")
        want = AUTOCAST_DTYPE.get(mixed_precision)
        if dtype != want:
            return (f"train.mixed_precision={mixed_precision} conflicts with torch_autocast (dtype {dtype}) in the "
                    f"DeepSpeed config {path}; remove the torch_autocast section (distgen sets it from "
                    f"train.mixed_precision)")
    return None


def set_deepspeed_precision(ds_cfg: dict, mixed_precision: str) -> None:
    """Write ``train.mixed_precision`` into a DeepSpeed config as torch_autocast (see the module's docstring)."""
    for key in _PRECISION_KEYS:
        ds_cfg.pop(key, None)
    ds_cfg["bf16"] = {"enabled": False}
    ds_cfg["fp16"] = {"enabled": False}
    if mixed_precision in AUTOCAST_DTYPE:
        ds_cfg["torch_autocast"] = {"enabled": True, "dtype": AUTOCAST_DTYPE[mixed_precision]}
    else:
        ds_cfg.pop("torch_autocast", None)


def projections(net: torch.nn.Module) -> list[tuple[torch.nn.Parameter, Callable]]:
    """The trainable parameters of ``net`` that its modules constrain after every optimizer step, each with its
    projection: a module's ``parameter_projections()`` returns {parameter name: function of the parameter's value
    to its new value} (EDM2's forced weight normalisation). The engine applies them (:meth:`Engine.step`), not the
    module's forward: under DeepSpeed the optimizer keeps its own fp32 copy of the weights, and a write into the
    module's weight alone would be undone by its next step."""
    out, seen = [], set()
    for m in net.modules():
        for name, fn in (m.parameter_projections() if hasattr(m, "parameter_projections") else {}).items():
            p = getattr(m, name)
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append((p, fn))
    return out


@torch.no_grad()
def project_(pairs: list[tuple[torch.nn.Parameter, Callable]]) -> None:
    """Each parameter replaced in place by its projection (DDP: the module's weights are the optimizer's)."""
    for p, fn in pairs:
        p.copy_(fn(p))


class Trained:
    """One trained network: its Accelerator (one per network under DeepSpeed), engine-wrapped model,
    plain module and optimizer, which of its parameters are meant to train, and the projections that follow
    its optimizer steps (:func:`projections`)."""

    def __init__(self, name: str, acc, model, opt, lr_scale: float, raw: torch.nn.Module):
        self.name, self.acc, self.model, self.opt, self.lr_scale, self.raw = name, acc, model, opt, lr_scale, raw
        self.trainable = [p.requires_grad for p in raw.parameters()]
        self.projections = projections(raw)

    def train_only_this(self, all_trained: list["Trained"]) -> None:
        """Gradients on for this network, off for the others: a GAN's generator step runs a frozen
        discriminator, its discriminator step a generator whose fakes then need no graph."""
        for t in all_trained:
            for p, keep in zip(t.raw.parameters(), t.trainable):
                p.requires_grad_(keep if t is self else False)

    def restore(self) -> None:
        """Gradients back on where they were meant to be (the EMA updates only those parameters)."""
        for p, keep in zip(self.raw.parameters(), self.trainable):
            p.requires_grad_(keep)


def _dcp():
    """distgen.checkpoint_dcp, imported only where a sharded checkpoint is written or read: importing
    torch.distributed.checkpoint adds 0.9 s to every command's start-up."""
    from distgen import checkpoint_dcp

    return checkpoint_dcp


def deepspeed_requested() -> bool:
    """Did the launcher (accelerate launch with a DeepSpeed config) ask for DeepSpeed?"""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


class EngineCheckpoints:
    """What a checkpoint holds of an engine's state, and where (a part of :class:`Engine`): distgen's own files
    (every network's weights and optimizer under DDP and FSDP2, gathered whole; with train.checkpoint_format
    sharded the trained networks' as every rank's shards, distgen.checkpoint_dcp), DeepSpeed's partitioned ones."""

    deepspeed: bool
    fsdp: Optional[FSDP2]

    def _in_distgen_files(self, trained: dict[str, Trained], nets: dict,
                          sharded: bool) -> tuple[list[str], list[str]]:
        """(networks whose weights, networks whose optimizer states) distgen's own whole files hold: all under DDP
        and FSDP2; under DeepSpeed, or in a sharded checkpoint, only the frozen networks' weights (the trained
        ones being in DeepSpeed's files, or DCP's)."""
        if self.deepspeed or sharded:
            return [n for n in nets if n not in trained], []
        return list(nets), list(trained)

    def state_for_checkpoint(self, trained: dict[str, Trained], nets: dict[str, torch.nn.Module]) -> dict:
        """Every rank alike (under FSDP2 a collective that gathers full state dicts; rank 0 writes them): what
        distgen's own files hold (:meth:`_in_distgen_files`), and the loss scaler."""
        weights, optimizers = self._in_distgen_files(trained, nets, self.tc.checkpoint_format == "sharded")
        if self.fsdp is not None:
            return {"weights": {n: self.fsdp.model_state(nets[n]) if n in trained else nets[n].state_dict()
                                for n in weights},
                    "optimizers": {n: self.fsdp.optimizer_state(nets[n], trained[n].opt) for n in optimizers},
                    "scaler": self.scaler.state_dict() if self.scaler is not None else None}
        weights = {n: nets[n].state_dict() for n in weights}
        optimizers = {n: trained[n].opt.state_dict() for n in optimizers}
        scaler = self.scaler.state_dict() if self.scaler is not None else None
        return {"weights": weights, "optimizers": optimizers, "scaler": scaler}

    @property
    def scaler(self):
        """The loss scaler (fp16): Accelerate's GradScaler (DDP), FSDP2's ShardedGradScaler, or None."""
        return self.fsdp.scaler if self.fsdp is not None else self.acc.scaler

    def save(self, trained: dict[str, Trained], tmp: Path, stage: bool = False) -> Optional[Callable[[], None]]:
        """Every rank: DeepSpeed's own partitioned states, or with train.checkpoint_format sharded each trained
        network's shards (DCP, a collective). With ``stage`` (a save in the background) the shards are copied
        and their write returned, for every rank's writer thread (checkpoint_dcp.stage); else None."""
        if self.deepspeed:
            for n, t in trained.items():
                self._ds.save(t.model, ckpt.deepspeed_dir(tmp, n))
        elif self.tc.checkpoint_format == "sharded":
            if stage:
                return _dcp().stage({n: (t.raw, t.opt) for n, t in trained.items()}, tmp)
            for n, t in trained.items():
                _dcp().save(t.raw, t.opt, tmp, n)
        return None

    def flush(self, tmp: Path) -> None:
        """Every rank, once all have written: DeepSpeed's files to disk (distgen's own and DCP's are flushed as
        written)."""
        if self.deepspeed:
            sync_tree(tmp / "deepspeed")
            self.barrier()

    def files_to_read(self, trained: dict[str, Trained], nets: dict[str, torch.nn.Module], meta: dict) -> dict:
        """The distgen files a resume reads under this engine from a checkpoint of either format (its meta.json
        says which; see :func:`distgen.checkpoint.read`)."""
        weights, optimizers = self._in_distgen_files(trained, nets, ckpt.is_sharded(meta))
        return {"weights": weights, "optimizers": optimizers, "deepspeed": list(trained) if self.deepspeed else [],
                "scaler": self.scaler is not None}

    def load(self, trained: dict[str, Trained], folder: Path, data: "ckpt.CheckpointData") -> None:
        """Put a checkpoint's engine state back: DeepSpeed's own files, or the optimizers and the scaler. Under
        FSDP2 the sharded networks' weights too, taken out of ``data.weights`` (the loop loads the rest); from a
        sharded checkpoint the trained networks' weights and optimizers (:meth:`_load_sharded`)."""
        sharded = not self.deepspeed and ckpt.is_sharded(data.meta)
        if sharded:
            self._load_sharded(trained, folder)
        for n, t in trained.items():
            if self.deepspeed:
                self._ds.load(t.model, ckpt.deepspeed_dir(folder, n), folder)
            elif sharded:
                continue  # read above
            elif self.fsdp is not None:
                try:
                    self.fsdp.load(t.raw, t.opt, data.weights.pop(n), data.optimizers[n])
                except (RuntimeError, KeyError, ValueError) as e:
                    raise ckpt.misfit(ckpt.weights_file(folder, n), e) from None
            else:
                t.opt.load_state_dict(data.optimizers[n])
        if data.scaler is not None:
            self.scaler.load_state_dict(data.scaler)

    @staticmethod
    def _load_sharded(trained: dict[str, Trained], folder: Path) -> None:
        """Every rank: each trained network's weights and optimizer state from a sharded checkpoint, all read
        (DCP resharding them to this run's process count and layout) before any is applied."""
        dcp_ckpt = _dcp()
        states = {n: dcp_ckpt.read(t.raw, t.opt, folder, n) for n, t in trained.items()}
        for n, t in trained.items():
            try:
                dcp_ckpt.apply(t.raw, t.opt, *states[n])
            except (RuntimeError, KeyError, ValueError) as e:
                raise ckpt.misfit(ckpt.sharded_weights_dir(folder, n), e) from None

    def engine_of(self, folder: Path) -> Optional[str]:
        """Why ``folder`` cannot be resumed by this engine, or None. DeepSpeed's checkpoints hold its own
        partitioned files and resume under DeepSpeed only; DDP's and FSDP2's are the same full state dicts and
        resume under either (at any process count)."""
        if (folder / "deepspeed").is_dir() != self.deepspeed:
            how = "under DeepSpeed" if not self.deepspeed else "without DeepSpeed"
            return f"{folder}: written {how}; resume it with the engine it was written with"
        return None


class Engine(EngineCheckpoints):
    """The Accelerator(s) that train a family's networks under ``cfg.train``: DDP, DeepSpeed or FSDP2.

    Made before any network exists: what the engine cannot run (fp16 without a GPU outside FSDP2, a DeepSpeed file
    whose precision contradicts distgen's, a family's ZeRO limits) fails here, before any compute.
    """

    def __init__(self, tc, family, trained_names: list[str], log_with: Optional[list] = None):
        """``log_with``: Accelerate tracker objects for the first Accelerator (distgen.trackers starts them)."""
        from accelerate import Accelerator

        self.tc, self.names = tc, trained_names
        # distgen's config is the source of truth: Accelerate would let the launcher's environment (from an
        # accelerate config file) override these arguments.
        os.environ["ACCELERATE_MIXED_PRECISION"] = tc.mixed_precision
        os.environ["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] = str(tc.grad_accum)
        os.environ["ACCELERATE_GRADIENT_CLIPPING"] = str(tc.grad_clip)
        self._acc_kw = dict(mixed_precision=tc.mixed_precision, gradient_accumulation_steps=tc.grad_accum,
                            cpu=dist.cpu_only(), kwargs_handlers=dist.accelerate_handlers())
        plugins = None
        if deepspeed_requested():
            problem = deepspeed_file_precision_problem(tc.mixed_precision)
            if problem:
                raise TrainingError(problem)
            if tc.checkpoint_format == "sharded":
                raise TrainingError("train.checkpoint_format=sharded: DeepSpeed writes its own partitioned states "
                                    "(deepspeed/<net>/ in the checkpoint, one file per rank already); set it to full "
                                    "(the default) under DeepSpeed")
            if tc.async_checkpoint:
                raise TrainingError("train.async_checkpoint: DeepSpeed writes its partitioned states itself, on every "
                                    "rank, from its live engine, so they cannot be copied off and written in the "
                                    "background; set it false (checkpoints are then written synchronously) or train "
                                    "with DDP")
            if len(trained_names) > 1:
                # Accelerate's route for several trained models under DeepSpeed: one named plugin (all from the
                # launcher's DeepSpeed config) and one Accelerator, hence one engine, per network.
                from accelerate.utils import DeepSpeedPlugin

                plugins = {n: DeepSpeedPlugin() for n in trained_names}
        self._plugins = plugins
        # Accelerate keeps one state per process; each run builds it afresh from the environment it finds (a
        # DeepSpeed stage, a precision), keeping the process group (no public API does this).
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
        fsdp = fsdp_request()
        sharding = fsdp is not None and dist.world_size() > 1  # one process has nothing to shard (describe())
        acc_kw = self._acc_kw
        if sharding:  # FSDP2's precision is distgen's own (its policy, autocast and scaler), not Accelerate's
            os.environ["ACCELERATE_MIXED_PRECISION"] = "no"
            acc_kw = {**acc_kw, "mixed_precision": "no"}
        with without_accelerate_fsdp():  # distgen shards under FSDP2 itself (distgen.engines_fsdp)
            self.acc = Accelerator(**acc_kw, deepspeed_plugins=plugins, log_with=log_with or None)
        self.deepspeed = self.acc.distributed_type.value == "DEEPSPEED"
        self.zero_stage: Optional[int] = None
        self._ds: Optional[DeepSpeedInternals] = None  # DeepSpeed's internals, under DeepSpeed
        if tc.mixed_precision == "fp16" and self.acc.device.type == "cpu" and not sharding:
            # Accelerate gives no GradScaler on CPU (FSDP2 brings its own: ShardedGradScaler runs on gloo)
            raise TrainingError("train.mixed_precision=fp16 needs a GPU; on CPU use bf16 or no")
        if self.deepspeed:
            self._configure_deepspeed(family)
        self.fsdp: Optional[FSDP2] = None
        if fsdp is not None:
            problem = config_problem(fsdp, tc, self.acc.device) or family.fsdp_problem()
            if problem:
                raise TrainingError(f"FSDP2: {problem}")
            if sharding:
                self.fsdp = FSDP2(self.acc.device, tc.mixed_precision)

    def _configure_deepspeed(self, family) -> None:
        check_version()  # the DeepSpeed release distgen's use of its internals was written for, or a named error
        tc = self.tc
        for plugin in (self._plugins or {self.names[0]: self.acc.state.deepspeed_plugin}).values():
            ds_cfg = plugin.deepspeed_config
            # DeepSpeed clips inside its step and needs the per-device batch (no DataLoader is prepared).
            ds_cfg["gradient_clipping"] = tc.grad_clip
            ds_cfg["train_micro_batch_size_per_gpu"] = tc.batch_size
            set_deepspeed_precision(ds_cfg, tc.mixed_precision)
            self.zero_stage = int(ds_cfg.get("zero_optimization", {}).get("stage", 0))
        if tc.skip_grad_norm:
            raise TrainingError("train.skip_grad_norm: DeepSpeed steps inside its own backward, so an update "
                                "cannot be skipped by its gradient norm; unset it or train with DDP")
        problem = family.engine_problem(self.zero_stage)
        if problem:
            raise TrainingError(f"DeepSpeed ZeRO-{self.zero_stage}: {problem}")
        self._ds = DeepSpeedInternals(self.zero_stage)

    # ---- where this process stands
    @property
    def device(self) -> torch.device:
        return self.acc.device

    @property
    def rank(self) -> int:
        return self.acc.process_index

    @property
    def world(self) -> int:
        return self.acc.num_processes

    @property
    def main(self) -> bool:
        return self.acc.is_main_process

    def describe(self) -> str:
        """``DEEPSPEED, ZeRO-2, one engine per network (D, G)`` or ``MULTI_CPU``, for the start-up line."""
        out = self.acc.distributed_type.value
        if self.deepspeed:
            out += f", ZeRO-{self.zero_stage}"
            if len(self.names) > 1:
                out += f", one engine per network ({', '.join(self.names)})"
        elif self.fsdp is not None:
            out += ", FSDP2 (each trained network sharded block by block)"
        elif fsdp_request() is not None:
            out += ", FSDP2 asked for with one process: nothing to shard, trained as without it"
        return out

    def barrier(self) -> None:
        self.acc.wait_for_everyone()

    def end(self) -> None:
        """The run is over. The process group stays: the command leaves it as it ends (distgen.cli), and another
        train() in this process (a sweep, a test matrix) trains in it."""
        self.acc.wait_for_everyone()

    # ---- networks
    def prepare(self, nets: dict[str, torch.nn.Module], family, speed, emas: dict) -> dict[str, Trained]:
        """AdamW for each trained network (the family's lr scale and betas power; ``speed``'s kernels),
        wrapped by its engine. Under FSDP2 each network is sharded first, and so are its EMAs (``emas``); under
        ZeRO-3 its EMAs are partitioned as the engine partitioned it."""
        from accelerate import Accelerator

        tc, trained = self.tc, {}
        self.skips_on_device = speed.skips_on_device and not self.deepspeed and self.fsdp is None
        for i, name in enumerate(self.names):
            o = family.optim_settings(name)
            if self.fsdp is not None:
                self.fsdp.shard(nets[name], family.shard_blocks(name, nets[name]))
                if name in emas:
                    emas[name].shard(ShardLayout(list(nets[name].parameters())))
            opt = torch.optim.AdamW(nets[name].parameters(), lr=tc.lr * o.lr_scale,
                                    betas=tuple(b ** o.beta_power for b in tc.betas), weight_decay=tc.weight_decay,
                                    **speed.optimizer_kwargs())
            acc = self.acc
            if self._plugins is not None:
                self.acc.state.select_deepspeed_plugin(name)
                acc = self.acc if i == 0 else Accelerator(**self._acc_kw)
            # FSDP2: the sharded module and a plain AdamW over its DTensors (Accelerate would wrap it in DDP)
            model, opt = (nets[name], opt) if self.fsdp is not None else acc.prepare(nets[name], opt)
            if self.deepspeed:
                self._ds.adopt(model)
                if self.zero_stage == 3 and self.world > 1 and name in emas:  # partitioned now: so are its EMAs
                    emas[name].shard(ZeroLayout(list(nets[name].parameters())))
            # The engine trains the module it was given in place (DDP's and DeepSpeed's .module are nets[name]):
            # that module is the plain one the loop, the EMAs and the checkpoints use.
            trained[name] = Trained(name, acc, model, opt, o.lr_scale, nets[name])
        return trained

    # ---- a micro-step
    def autocast(self, t: Trained):
        """The precision context of a phase's loss: Accelerate's autocast (DDP), or under DeepSpeed, whose
        engine autocasts only its own forward, one torch.autocast around the whole phase, so that the
        networks a phase calls outside their engine see the same precision."""
        if self.deepspeed and self.tc.mixed_precision != "no":
            dtype = torch.bfloat16 if self.tc.mixed_precision == "bf16" else torch.float16
            return torch.autocast(self.device.type, dtype=dtype)
        if self.fsdp is not None:
            return self.fsdp.autocast()
        return t.acc.autocast()

    def gathered(self, t: Trained, twice: bool):
        """The context of a micro-step's loss and backward: under FSDP2 a phase that differentiates through its
        network twice (``Phase.twice``) holds its weights gathered (:meth:`FSDP2.gathered`); elsewhere nothing."""
        return self.fsdp.gathered(t.raw) if self.fsdp is not None and twice else contextlib.nullcontext()

    def backward(self, t: Trained, loss: torch.Tensor, bad: torch.Tensor, tally) -> torch.Tensor:
        """One micro-step's backward; returns ``bad`` (a device bool: this step's loss or gradients were not
        finite somewhere), which the caller has set from this loss already.

        DDP always runs it: a non-finite loss gives non-finite gradients (on every rank, after the
        all-reduce), whose update :meth:`step` then skips. DeepSpeed steps inside backward, so a non-finite
        loss on any rank must skip the backward on all: the one place that reads the flag on the host.
        """
        if not self.deepspeed:
            t.acc.backward(self.fsdp.scale(loss) if self.fsdp is not None else loss)
            return bad
        if dist.all_reduce_sum(int(bool(bad))) > 0:
            return torch.ones_like(bad)
        scale = self._ds.loss_scale(t.model) if self.tc.mixed_precision == "fp16" else None
        t.acc.backward(loss)
        if scale is not None and self._ds.loss_scale(t.model) < scale:
            tally.count("overflow_total", 1)  # the scaler found inf/nan and skipped the step
        return bad

    def step(self, t: Trained, bad: torch.Tensor, tally) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """At a gradient-accumulation boundary (DDP): clip, skip a non-finite or extreme update, step.

        Returns ``bad`` (now also set by a non-finite gradient) and whether ``train.skip_grad_norm`` held the
        update (a device bool; None without it). With fused AdamW the skip happens on the device (the
        kernel's ``found_inf``); other kernels need one host read of the flag per step. DeepSpeed stepped
        in :meth:`backward` already. Then the network's projections (:func:`projections`), stepped or not.
        """
        if not t.acc.sync_gradients:
            return bad, None
        if self.deepspeed:
            self._ds.project(t.projections)
            return bad, None
        if self.fsdp is not None:
            return self.fsdp.step(t, bad, self.tc, tally)
        tc, held = self.tc, None
        norm = t.acc.clip_grad_norm_(t.model.parameters(), tc.grad_clip if tc.grad_clip > 0 else float("inf"))
        if norm is not None and self.acc.scaler is None:  # under fp16 the scaler's own check skips (an overflow)
            bad = bad | ~torch.isfinite(norm)
        if tc.skip_grad_norm and norm is not None:
            # VDVAE's stabiliser: an extreme gradient (the same on every rank after DDP's all-reduce) holds
            # this update; the step still counts.
            held = (norm > tc.skip_grad_norm) & ~bad
            tally.count("skipped_updates_total", held)
        skip = bad if held is None else bad | held
        if self.acc.scaler is not None:  # fp16 (GPU only): GradScaler decides on its own found_inf
            if not bool(skip):
                t.opt.step()
                # an overflow: the unscaled gradients' norm is not finite (Accelerate's own flag misses the
                # skips of fused optimizers, which GradScaler lets step with found_inf)
                overflow = ~torch.isfinite(norm) if norm is not None else t.acc.optimizer_step_was_skipped
                tally.count("overflow_total", overflow)
        elif self.skips_on_device:
            t.opt.optimizer.found_inf = skip.float()  # read by the fused kernel: no update where set
            t.opt.step()
            t.opt.optimizer.found_inf = None
        elif not bool(skip):
            t.opt.step()
        project_(t.projections)
        t.opt.zero_grad(set_to_none=True)
        return bad, held

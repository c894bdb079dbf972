"""The speed switches of ``train``: torch.compile, channels_last, AdamW's kernels, TF32 and cuDNN's
autotuner; and activation checkpointing, which spends compute to save memory. :func:`resolve` turns the
config's values ("auto" included) into what this run uses, with the reason for every switch that cannot apply,
so that the start-up line says exactly what runs.

"auto" is on with CUDA and off on CPU: these are GPU tools (the measurements behind them, DDPM's CIFAR-10
U-Net on one H100 in bf16, are in docs/training.md#speed); on CPU, compiling costs more start-up than it
saves over a short run and channels_last convolutions are slower.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import torch

from distgen.errors import TrainingError

# The optimizer implementations that can skip an update on the device (``found_inf``), without the host
# reading back whether the step was finite: only PyTorch's fused kernels take that argument.
DEVICE_SKIP = ("fused",)


@dataclass
class Speed:
    compiled: list[str] = field(default_factory=list)  # networks whose forward is compiled
    not_compiled: dict[str, str] = field(default_factory=dict)  # network -> why not (compile asked for)
    compile_mode: str = "default"
    channels_last: bool = False
    optimizer_impl: str = "foreach"
    tf32: bool = False
    cudnn_benchmark: bool = False
    # train.activation_checkpointing: the networks asked for, whether by name (then each must take it), and
    # after checkpoint_activations() those that do and why the others do not
    checkpoint_asked: list[str] = field(default_factory=list)
    checkpoint_named: bool = False
    checkpointed: list[str] = field(default_factory=list)
    not_checkpointed: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        if self.compiled:
            comp = f"compile {', '.join(self.compiled)} (mode {self.compile_mode})"
        else:
            comp = "compile off"
        if self.not_compiled:
            comp += "; not compiled: " + "; ".join(f"{n} ({why})" for n, why in self.not_compiled.items())
        parts = [comp, f"channels_last {'on' if self.channels_last else 'off'}", f"AdamW {self.optimizer_impl}"]
        if self.checkpoint_asked:
            ac = f"activation checkpointing {', '.join(self.checkpointed)}"
            if self.not_checkpointed:
                ac += "; not checkpointed: " + "; ".join(f"{n} ({why})" for n, why in self.not_checkpointed.items())
            parts.append(ac)
        if self.tf32 or self.cudnn_benchmark:
            parts += [f"TF32 {'on' if self.tf32 else 'off'}", f"cuDNN benchmark {'on' if self.cudnn_benchmark else 'off'}"]
        return ", ".join(parts)

    @property
    def skips_on_device(self) -> bool:
        """Can a non-finite step be skipped without a host read (see :data:`DEVICE_SKIP`)?"""
        return self.optimizer_impl in DEVICE_SKIP

    def optimizer_kwargs(self) -> dict:
        """AdamW's keyword arguments for :attr:`optimizer_impl`."""
        return {"fused": {"fused": True}, "foreach": {"foreach": True},
                "for-loop": {"foreach": False, "fused": False}}[self.optimizer_impl]

    def apply_backends(self, device: torch.device) -> None:
        """TF32 and cuDNN's autotuner, process-wide (CUDA only; nothing to set on CPU)."""
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = self.tf32
            torch.backends.cudnn.allow_tf32 = self.tf32
            torch.backends.cudnn.benchmark = self.cudnn_benchmark

    def compile_network(self, module: torch.nn.Module) -> None:
        """torch.compile of the module's forward, in place: ``nn.Module.compile`` keeps the parameter names,
        so checkpoints, EMAs and exports see the same state dict as without it."""
        module.compile(mode=None if self.compile_mode == "default" else self.compile_mode)

    def checkpoint_activations(self, family, nets: dict[str, torch.nn.Module]) -> None:
        """Switch activation checkpointing on in the networks asked for (in place, through the family's
        :meth:`~distgen.families.base.Family.checkpoint_activations`), or refuse: a network named in the config
        that cannot, or ``true`` for a family none of whose trained networks can."""
        for n in self.checkpoint_asked:
            why = family.checkpoint_activations(n, nets[n])
            if why is None:
                self.checkpointed.append(n)
            else:
                self.not_checkpointed[n] = why
        if self.not_checkpointed and (self.checkpoint_named or not self.checkpointed):
            why = "; ".join(f"{n}: {w}" for n, w in self.not_checkpointed.items())
            raise TrainingError(f"train.activation_checkpointing: the {family.name} family cannot checkpoint the "
                                f"activations of {why}; set it false" + ("" if not self.checkpointed else
                                                                         f" or name only {', '.join(self.checkpointed)}"))

    def batch_layout(self, batch: dict) -> dict:
        """Images (4-D tensors) in channels_last when the networks are."""
        if not self.channels_last:
            return batch
        return {k: (v.contiguous(memory_format=torch.channels_last) if torch.is_tensor(v) and v.dim() == 4 else v)
                for k, v in batch.items()}


def _auto(value, cuda: bool) -> bool:
    return cuda if value == "auto" else bool(value)


def resolve(tc, device: torch.device, family, trained: list[str], deepspeed: bool, fsdp: bool = False) -> Speed:
    """What of ``tc``'s speed switches this run uses on ``device`` (under DeepSpeed, or FSDP2 with ``fsdp``)."""
    cuda = device.type == "cuda"
    channels_last = _auto(tc.channels_last, cuda) and not fsdp  # FSDP2 refuses an explicit true (engines_fsdp)
    if deepspeed and channels_last:
        # DeepSpeed broadcasts every parameter through a uint8 view, which a channels_last conv weight cannot
        # take ("self.stride(-1) must be 1 to view Float as Byte"; seen on an H100 and on CPU)
        if tc.channels_last is True:
            raise TrainingError("train.channels_last: DeepSpeed broadcasts parameters through a byte view that "
                                "channels_last weights cannot take; use channels_last false (auto leaves it off)")
        channels_last = False
    s = Speed(compile_mode=tc.compile_mode, channels_last=channels_last, tf32=cuda and tc.tf32,
              cudnn_benchmark=cuda and tc.cudnn_benchmark)
    if _auto(tc.compile, cuda):
        for n in trained:
            why = family.compile_problem(n)
            if why:
                s.not_compiled[n] = why
            else:
                s.compiled.append(n)
    ac = tc.activation_checkpointing
    if ac is True:
        s.checkpoint_asked = list(trained)
    elif ac:  # network names: each one trained by some phase
        unknown = [n for n in ac if n not in trained]
        if unknown:
            raise TrainingError(f"train.activation_checkpointing: {', '.join(unknown)} "
                                f"{'is not a network' if len(unknown) == 1 else 'are not networks'} this "
                                f"{family.name} model trains; it trains {', '.join(trained)}")
        s.checkpoint_asked, s.checkpoint_named = list(ac), True
    impl = tc.optimizer_impl
    if impl == "auto":
        # Fused AdamW under DDP on CUDA (one kernel for all parameters; skips a non-finite step on the
        # device). DeepSpeed's ZeRO optimizers step flat partitions of their own: the plain foreach kernels.
        # FSDP2: the foreach kernels over the DTensor shards (fused AdamW on DTensors is not measured here).
        impl = "fused" if cuda and not deepspeed and not fsdp else "foreach"
    elif impl == "fused" and device.type not in ("cuda", "cpu"):
        raise TrainingError(f"train.optimizer_impl=fused: PyTorch has no fused AdamW for {device.type}; use foreach")
    s.optimizer_impl = impl
    return s


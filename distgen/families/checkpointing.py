"""Activation checkpointing (``train.activation_checkpointing``): a block's activations are dropped after its
forward and recomputed in the backward, trading about one more forward of compute for the activation memory.

A network offers it in one of two ways, found by :func:`enable` anywhere in the module tree (so that wrappers,
a formulation's preconditioning or an autoencoder's loss module, need nothing):

- a diffusers model that supports it (UNet2DModel, DiTTransformer2DModel, AutoencoderKL): its built-in
  ``enable_gradient_checkpointing()`` (``torch.utils.checkpoint``, non-reentrant, through each block's call);
- one of distgen's own networks that inherits :class:`Checkpointable` and lists its blocks.

Each of distgen's blocks is switched in place to a subclass of its own class whose ``__call__`` runs the
original call (forward hooks included: DeepSpeed ZeRO-3 gathers a module's parameters in them, so they must
run again in the recomputation) under ``torch.utils.checkpoint`` with ``use_reentrant=False``. Parameter
names, the state dict and ``isinstance`` stay as they were, so checkpoints, EMAs and exports do not see the
switch, and a run may resume with it switched (it changes memory, not the maths).

The recomputation must be the forward again, bit for bit:

- the global RNGs (dropout) are restored by ``torch.utils.checkpoint`` itself (``preserve_rng_state``, kept on);
- explicit ``torch.Generator`` arguments (StyleGAN2's per-layer noise, a hierarchical VAE's latents) are not:
  here the recomputation starts them from the states the forward found, and leaves them where the forward did;
- buffers that a training-mode forward updates would be updated twice, and spectral normalisation's power
  iteration would compute another weight from its updated vectors: the recomputation starts them as the
  forward found them and leaves them as the forward left them (BatchNorm's running statistics, ``_SpectralNorm``).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch
from torch import nn
from torch.nn.utils.parametrizations import _SpectralNorm
from torch.utils.checkpoint import checkpoint


class Checkpointable:
    """A network of distgen's own whose ``checkpoint_blocks()`` lists the blocks to checkpoint (a mixin of an
    ``nn.Module``). A block is called with tensors and plain values (a ``torch.Generator`` too) and returns
    tensors; the network's glue between blocks (embeddings, skips, the head) is not checkpointed."""

    def checkpoint_blocks(self) -> list[nn.Module]:
        raise NotImplementedError


def _diffusers_model(module: nn.Module) -> bool:
    try:
        from diffusers import ModelMixin
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return False
    return isinstance(module, ModelMixin) and bool(type(module)._supports_gradient_checkpointing)


def enable(module: nn.Module) -> Optional[str]:
    """Switch activation checkpointing on in ``module`` in place: None, or why there is nothing to checkpoint."""
    found = 0
    for m in _roots(module):
        if isinstance(m, Checkpointable):
            blocks = m.checkpoint_blocks()
            for b in blocks:
                checkpoint_block(b)
            found += len(blocks)
        else:
            m.enable_gradient_checkpointing()  # diffusers' own (non-reentrant torch.utils.checkpoint)
            found += 1
    return None if found else f"{type(module).__name__} has no blocks to checkpoint"


def _roots(module: nn.Module) -> list[nn.Module]:
    """The outermost diffusers models and Checkpointable networks in ``module``'s tree."""
    if isinstance(module, Checkpointable) or _diffusers_model(module):
        return [module]
    return [r for child in module.children() for r in _roots(child)]


def checkpoint_block(block: nn.Module) -> None:
    """Run ``block``'s calls under ``torch.utils.checkpoint`` while gradients are on (in place; idempotent)."""
    cls = type(block)
    if cls.__dict__.get("_checkpointed_from") is None:
        block.__class__ = _checkpointed_class(cls)


def is_checkpointed(block: nn.Module) -> bool:
    return type(block).__dict__.get("_checkpointed_from") is not None


_CLASSES: dict[type, type] = {}


def _checkpointed_class(cls: type) -> type:
    if cls not in _CLASSES:
        # The same name and module as the original (printed networks and error messages read the same)
        _CLASSES[cls] = type(cls.__name__, (cls,), {"__call__": _checkpointed_call, "_checkpointed_from": cls,
                                                    "__module__": cls.__module__, "__qualname__": cls.__qualname__})
    return _CLASSES[cls]


def _mutates_in_forward(m: nn.Module) -> bool:
    """Does ``m``'s training-mode forward write its own buffers? BatchNorm's running statistics, and spectral
    normalisation's power iteration (whose vectors then give the weight: a recomputation from the updated ones
    would use another weight)."""
    if not m.training:
        return False
    if isinstance(m, nn.modules.batchnorm._NormBase):
        return m.track_running_stats
    return isinstance(m, _SpectralNorm)


def _checkpointed_call(self, *args, **kwargs):
    call = type(self)._checkpointed_from.__call__
    if not torch.is_grad_enabled():  # sampling, evaluation, a frozen network under no_grad: nothing to save
        return call(self, *args, **kwargs)
    gens = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Generator)]
    bufs = [b for m in self.modules() if _mutates_in_forward(m) for b in m.buffers(recurse=False)]
    extra = {}
    if gens or bufs:  # only then a recomputation context (the plain call is what torch.compile traces best)
        before = _AsInForward(gens, [g.get_state() for g in gens], bufs, [b.detach().clone() for b in bufs])
        extra["context_fn"] = lambda: (nullcontext(), before)
    return checkpoint(call, self, *args, use_reentrant=False, **extra, **kwargs)


class _AsInForward:
    """The recomputation's context: explicit generators and self-updated buffers as the forward found them, and
    afterwards as the forward left them. Entered again for every recomputation (a double backward, R1's,
    recomputes more than once)."""

    def __init__(self, gens: list[torch.Generator], gen_states: list[torch.Tensor], bufs: list[torch.Tensor],
                 buf_states: list[torch.Tensor]):
        self.gens, self.gen_states, self.bufs, self.buf_states = gens, gen_states, bufs, buf_states

    def __enter__(self):
        self.now = [g.get_state() for g in self.gens], [b.detach().clone() for b in self.bufs]
        self._set(self.gen_states, self.buf_states)

    def __exit__(self, *exc):
        self._set(*self.now)
        return False

    def _set(self, gen_states, buf_states):
        for g, s in zip(self.gens, gen_states):
            g.set_state(s)
        with torch.no_grad():
            for b, v in zip(self.bufs, buf_states):
                b.copy_(v)

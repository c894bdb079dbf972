"""Engine-specific glue kept out of the loop (DeepSpeed checkpoint loading)."""

from __future__ import annotations

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine


def _deepspeed_safe_globals() -> list:
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


class SafeTorchCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, reading with ``weights_only=True``.

    DeepSpeed reads its own files with ``weights_only=False``, which would run
    any pickled code a tampered checkpoint holds. This engine allows tensors,
    plain data and the few DeepSpeed value types above, nothing else.
    """

    def __init__(self, base: TorchCheckpointEngine):  # noqa: D107 - adopts the configured engine's settings
        self.__dict__.update(base.__dict__)

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)

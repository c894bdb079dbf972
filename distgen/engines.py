"""Engine-specific glue kept out of the loop: DeepSpeed's precision settings, its loss scale, and
checkpoint loading that runs no pickled code.

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

import json
import os
from pathlib import Path
from typing import Optional

import torch

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


def loss_scale(engine) -> Optional[float]:
    """The dynamic loss scale of a DeepSpeed engine under fp16 (None without one). A step whose scale
    comes out lower than it went in was skipped for an overflow: that is the scaler's only reason to back off."""
    opt = getattr(engine, "optimizer", None)
    for scaler in (getattr(opt, "torch_autocast_gradscaler", None), getattr(engine, "torch_autocast_z0_gradscaler", None)):
        if scaler is not None and scaler.is_enabled():
            return float(scaler.get_scale())
    ls = getattr(opt, "loss_scaler", None)  # DeepSpeed's own fp16 mode
    if ls is not None and getattr(ls, "dynamic", False):
        return float(ls.cur_scale)
    return None


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
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    return SafeTorchCheckpointEngine(base)

"""Reading feature extractors' weights without running pickled code, shared by InceptionV3 and the domain
classifier (:mod:`distgen.evaluate.extractors`) and DINOv2 / CLIP (:mod:`distgen.evaluate.foundation`).

torch-fidelity reads a weights path with ``torch.load(weights_only=False)``; distgen reads the file itself
(safetensors, or ``torch.load(weights_only=True)``), bounded in size and checked, and hands on plain tensors.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import torch

from distgen.errors import EvalError

# Weights files distgen reads (DINOv2-g, the largest extractor, is 4.5 GB in float32): a file, and the tensors a
# zip-format torch file unpacks to, are refused beyond this before they are read.
MAX_WEIGHTS_BYTES = 8 << 30


class WeightsUnavailable(EvalError):
    """The feature extractor's weights are not here and cannot be fetched."""


def unpickling_problem(e: Exception) -> str:
    """What torch's weights-only loader refused, in a few words (its own message advises unpickling anyway)."""
    pickled = re.search(r"Unsupported (?:global|class): (?:GLOBAL )?(\S+?)\.? ", str(e))
    if pickled:
        return f"it pickles {pickled.group(1)}"
    if "Weights only load failed" in str(e):
        return "it pickles objects"
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first[:300]}"


def check_weights_size(path: Path, limit: int = MAX_WEIGHTS_BYTES) -> None:
    """Refuse a weights file, or a zip-format one whose members unpack to more, beyond ``limit`` bytes (from the
    file system and the zip headers: nothing is read or allocated yet)."""
    try:
        size = path.stat().st_size
        if size > limit:
            raise EvalError(f"{path}: {size} bytes, more than distgen reads as weights ({limit})")
        if path.is_file() and zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                unpacked = sum(i.file_size for i in z.infolist())
            if unpacked > limit:
                raise EvalError(f"{path}: its members unpack to {unpacked} bytes, more than distgen reads as "
                                f"weights ({limit})")
    except FileNotFoundError:
        raise EvalError(f"{path}: missing") from None
    except (OSError, zipfile.BadZipFile) as e:
        raise EvalError(f"{path}: unreadable ({e})") from None


def check_finite(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse weights with NaN or infinite values: every feature, and so every figure, would be NaN."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise EvalError(f"{path}: tensor(s) {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} hold NaN or "
                        f"infinite values")


def load_weights(path: Path, also: str = "") -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a torch file, without running pickled code. ``also``: other formats
    the caller reads, for the message."""
    path = Path(path)
    check_weights_size(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise EvalError(f"{path}: not a weights file distgen can read ({unpickling_problem(e)}); it must be a "
                        f"plain state dict (torch.save(model.state_dict())){',' if also else ' or'} safetensors{also}: "
                        f"distgen does not unpickle other objects") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise EvalError(f"{path}: expected a state dict of tensors")
    for k, v in state.items():
        # a view of more elements than its storage (stride 0): a few bytes could describe a network of any size
        if v.numel() * v.element_size() > v.untyped_storage().nbytes():
            raise EvalError(f"{path}: {k}: a {list(v.shape)} tensor on a storage of {v.untyped_storage().nbytes()} "
                            f"bytes (an expanded view); a weights file holds every element")
    return state

"""Atomic, self-describing checkpoints that load without running pickled code.

A checkpoint is a folder ``checkpoints/step-NNNNNNNN/``:

- ``meta.json``: step, samples seen, data-stream position, counters, EMA
  steps, world size and the resolved config;
- ``<net>.safetensors`` and ``ema<i>-<net>.safetensors``: weights;
- ``optim-<net>.pt``, ``scaler.pt``: each trained network's optimizer and
  the loss-scaler state (tensors and numbers only, read back with
  ``torch.load(weights_only=True)``);
- ``rng-<rank>.safetensors`` + ``rng-<rank>.json``: every rank's RNG states;
- ``deepspeed/<net>/``: DeepSpeed's partitioned model and optimizer states, when
  DeepSpeed runs.

Everything is written into ``.tmp-step-NNNNNNNN`` and renamed when complete;
``latest`` then names it. A folder cut off mid-write keeps its ``.tmp-``
name and is never loaded; the newest complete one is.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STEP_RE = re.compile(r"^step-(\d{8})$")
FORMAT = "distgen-checkpoint/1"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def tmp_dir(root: Path, step: int) -> Path:
    return root / f".tmp-step-{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder is complete once renamed and holding meta.json)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_RE.match(p.name) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_RE.match(p.name).group(1)))


def newest_checkpoint(root: Path) -> Optional[Path]:
    cps = complete_checkpoints(root)
    return cps[-1] if cps else None


def finalize(root: Path, step: int, keep: int) -> Path:
    """Rank 0, after every rank has written into the temporary folder: rename, point ``latest``, prune."""
    tmp, final = tmp_dir(root, step), step_dir(root, step)
    if final.exists():  # the same step saved again (e.g. end of run right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = root / "latest.tmp"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, root / "latest")
    for old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step-*"):
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return final


# --------------------------------------------------------------------------- tensors and states
def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the checkpoint")
    return load_file(str(path))


def save_state(path: Path, state: Any) -> None:
    torch.save(state, path)


def load_state(path: Path) -> Any:
    """Optimizer / scheduler / scaler state: tensors and plain data only."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the checkpoint")
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's RNG states: torch (CPU, CUDA), numpy and Python's random."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    py = random.getstate()
    extra = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)], "python": [py[0], list(py[1]), py[2]]}
    return tensors, extra


def set_rng_state(tensors: dict[str, torch.Tensor], extra: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
        if states:
            torch.cuda.set_rng_state_all(states)
    kind, pos, has_gauss, gauss = extra["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    v, internal, g = extra["python"]
    random.setstate((v, tuple(internal), g))


def save_rng(folder: Path, rank: int) -> None:
    tensors, extra = rng_state()
    save_tensors(folder / f"rng-{rank}.safetensors", tensors)
    (folder / f"rng-{rank}.json").write_text(json.dumps(extra))


def load_rng(folder: Path, rank: int) -> bool:
    """Restore this rank's RNG states; False when the checkpoint has none for this rank (other world size)."""
    p = folder / f"rng-{rank}.safetensors"
    if not p.is_file():
        return False
    set_rng_state(load_tensors(p), json.loads((folder / f"rng-{rank}.json").read_text()))
    return True


def write_meta(folder: Path, meta: dict) -> None:
    (folder / "meta.json").write_text(json.dumps({"format": FORMAT, **meta}, indent=2) + "\n")


def read_meta(folder: Path) -> dict:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{folder}/meta.json: unreadable ({e})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{folder}/meta.json: not a {FORMAT} checkpoint")
    return meta

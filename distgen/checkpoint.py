"""Atomic, self-describing checkpoints that load without running pickled code.

A checkpoint is a folder ``checkpoints/step-NNNNNNNN/``:

Every file name is written and read here (the layout section at the end).

- ``meta.json``: step, samples seen, data-stream position, counters, EMA
  steps, world size, global batch, the resumes at another world size
  (:mod:`distgen.world_change`) and the resolved config;
- ``<net>.safetensors`` and ``ema<i>-<net>.safetensors``: weights;
- ``optim-<net>.pt``, ``scaler.pt``: each trained network's optimizer and
  the loss-scaler state (tensors and numbers only, read back with
  ``torch.load(weights_only=True)``);
- ``rng-<rank>.safetensors`` + ``rng-<rank>.json``: every rank's RNG states;
- ``family-<rank>.safetensors``: a family's per-rank tensors (CycleGAN's image histories), when it keeps any;
- ``<net>.dcp/`` and ``optim-<net>.dcp/`` instead of a trained network's weights and optimizer files with
  ``train.checkpoint_format: sharded``: every rank's shards as torch.distributed.checkpoint writes them
  (:mod:`distgen.checkpoint_dcp`, which reads them without unpickling code);
- ``deepspeed/<net>/``: DeepSpeed's partitioned model and optimizer states, when
  DeepSpeed runs.

Everything is written into ``.tmp-step-NNNNNNNN``, flushed to disk (every file,
then the folders), and renamed when complete; ``latest`` then names it. A
folder cut off mid-write keeps its ``.tmp-`` name and is never loaded. A
``step-`` folder is a checkpoint whatever it holds: one that does not load is
damaged (reported by file name), never taken for an absent one. With
``train.async_checkpoint`` rank 0's files, the rename and the pruning are
written by a background thread (:mod:`distgen.async_save`), under the same rules.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

from distgen import readback as rb
from distgen.durable import atomic_dir, fsync_path, write_text_durably
from distgen.errors import CheckpointError, TrainingError

if TYPE_CHECKING:
    import torch

# torch, numpy and safetensors are imported in the functions that use them: the launchers read a run's
# meta.json (is it finished? preempted?) on nodes and in jobs where importing torch would cost seconds.

STEP_RE = re.compile(r"^step-(\d{8})$")
FORMAT = "distgen-checkpoint/1"
# What a training checkpoint's meta.json must hold to resume from it.
RESUME_KEYS = ("step", "nimg", "world_size", "reason", "data_start_step", "counters", "interval", "ema_steps",
               "family", "data_info", "config")
# What sampling, export and evaluation need of it.
EMA_KEYS = ("step", "nimg", "family", "data_info", "config")
REASONS = ("periodic", "preempted", "end")
_COUNT = rb.Int(0, rb.MAX_COUNT)
# meta.json as read back: every key distgen uses, typed and bounded (a training checkpoint has them all; best/
# has the EMA_KEYS and best). Keys a later distgen may add are let through unread.
_WORLD = rb.Int(1, 1 << 20)
# one resume at another process count (distgen.world_change.BatchPlan.record)
_WORLD_CHANGE = rb.Obj({"step": _COUNT, "nimg": _COUNT, "from_world": _WORLD, "to_world": _WORLD,
                        "from_global_batch": rb.Int(1, rb.MAX_COUNT), "to_global_batch": rb.Int(1, rb.MAX_COUNT)})
META_SCHEMA = rb.Obj({
    "format": rb.Str(choices=(FORMAT,)), "step": _COUNT, "nimg": _COUNT, "world_size": _WORLD,
    "global_batch": rb.Int(1, rb.MAX_COUNT), "world_size_changes": rb.List(_WORLD_CHANGE, max_len=10_000),
    "reason": rb.Str(choices=REASONS), "data_start_step": _COUNT, "data_skip": _COUNT,
    "counters": rb.Map(_COUNT, max_len=100),
    # "<phase>/<name>" -> [sum, count] of the interval's finite values
    "interval": rb.Map(rb.Tuple(rb.Num(), _COUNT), max_len=1000),
    "ema_steps": rb.Map(rb.List(_COUNT, max_len=100), max_len=100),
    "best": rb.Opt(rb.Obj({"metric": rb.Str(max_len=64), "value": rb.Num(), "step": _COUNT})),
    "family_state": rb.Map(rb.Data(), max_len=100), "family": rb.Str(max_len=64), "data_info": rb.DATA_INFO,
    "config": rb.CONFIG, "checkpoint_format": rb.Str(choices=("full", "sharded")),
}, optional=("step", "nimg", "world_size", "global_batch", "world_size_changes", "reason", "data_start_step",
             "data_skip", "counters", "interval", "ema_steps", "best", "family_state", "family", "data_info",
             "config", "checkpoint_format"), extra=True)
_RNG_SCHEMA = rb.Obj({
    "numpy": rb.Tuple(rb.Str(max_len=32), rb.Int(0, 1 << 20), rb.Int(0, 1), rb.Num()),  # kind, pos, has_gauss, gauss
    # version, the Mersenne Twister's 625 words, gauss_next
    "python": rb.Tuple(rb.Int(0, 100), rb.List(rb.Int(0, 2 ** 32), min_len=625, max_len=625), rb.Opt(rb.Num())),
}, extra=True)


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def tmp_dir(root: Path, step: int) -> Path:
    return root / f".tmp-step-{step:08d}"


def checkpoint_folders(root: Path) -> list[Path]:
    """Every checkpoint folder (``step-NNNNNNNN``), oldest first, whatever it holds: the rename from
    ``.tmp-`` is what makes a checkpoint complete, so one that does not load is damaged, not absent."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_RE.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_RE.match(p.name).group(1)))


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders that hold a meta.json, oldest first."""
    return [p for p in checkpoint_folders(root) if (p / "meta.json").is_file()]


def first_line(e: BaseException) -> str:
    """An exception's message in one line (its type's name when it has none)."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def describe_failure(folder: Path, e: BaseException) -> str:
    """A checkpoint read error in one line, naming the file when the message does not already."""
    msg = first_line(e)
    return msg if str(folder) in msg else f"{type(e).__name__}: {msg}"


def no_checkpoint_loads(root: Path, failures: list[tuple[Path, str]]) -> str:
    lines = "\n".join(f"  {f.name}: {why}" for f, why in failures)
    return (f"{root}: none of its {len(failures)} checkpoint folder(s) loads, and distgen does not start afresh "
            f"over them (move them away to start a new run):\n{lines}")


def set_aside(folder: Path) -> Path:
    """Rename a damaged checkpoint folder out of the way (``step-NNNNNNNN.damaged``), keeping its files."""
    target = folder.with_name(folder.name + ".damaged")
    i = 1
    while target.exists():
        i += 1
        target = folder.with_name(f"{folder.name}.damaged-{i}")
    os.replace(folder, target)
    return target


def finalize(root: Path, step: int, keep: int) -> Path:
    """Rank 0, after every rank has written and flushed its files into the temporary folder: flush the
    folders, rename, point ``latest``, prune."""
    tmp, final = tmp_dir(root, step), step_dir(root, step)
    for here, _dirs, _files in os.walk(tmp, topdown=False):
        fsync_path(Path(here))
    if final.exists():  # the same step saved again (e.g. end of run right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(root)
    write_text_durably(root / "latest", final.name + "\n")
    for old in checkpoint_folders(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step-*"):
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return final


# --------------------------------------------------------------------------- tensors and states
def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    with os_errors(path):
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    fsync_path(path)


@contextmanager
def os_errors(path: Path) -> Iterator[None]:
    """Writing ``path``: an I/O failure (a full disk, a read-only file system) surfaces as an OSError naming it,
    also where safetensors reports it in its own error type ("... (os error 28)")."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise
    except Exception as e:  # noqa: BLE001 - only I/O failures are translated; anything else is re-raised as is
        m = re.search(r"os error (\d+)", str(e))
        if m is None:
            raise
        code = int(m.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing from the checkpoint")
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # truncated or not safetensors at all
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def save_state(path: Path, state: Any) -> None:
    import torch

    with open(path, "wb") as f, os_errors(path):
        out = _Writes(f)
        try:
            torch.save(state, out)
        except RuntimeError:
            if out.error is not None:  # torch's writer reports a failed write as a bare "unexpected pos"
                raise out.error from None
            raise
    fsync_path(path)


class _Writes:
    """A file for torch.save that keeps the first OSError of its writes (torch's zip writer swallows it)."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()


def load_state(path: Path) -> Any:
    """Optimizer / scheduler / scaler state: tensors and plain data only (pickled code is refused)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing from the checkpoint")
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: refused or unreadable ({first_line(e)})") from None


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's RNG states: torch (CPU, CUDA), numpy and Python's random."""
    import numpy as np
    import torch

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
    import numpy as np
    import torch

    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
        if states:
            torch.cuda.set_rng_state_all(states)
    kind, pos, has_gauss, gauss = extra["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    v, internal, g = extra["python"]
    random.setstate((v, tuple(internal), g))


def _write_json(path: Path, data: Any, indent: Optional[int] = None) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(data, indent=indent) + "\n")
        f.flush()
        os.fsync(f.fileno())


def save_rng(folder: Path, rank: int) -> None:
    tensors, extra = rng_state()
    save_tensors(folder / f"rng-{rank}.safetensors", tensors)
    _write_json(folder / f"rng-{rank}.json", extra)


def read_rng(folder: Path, rank: int) -> Optional[tuple[dict[str, torch.Tensor], dict]]:
    """This rank's RNG states as stored (None when the checkpoint has none for this rank)."""
    p = folder / f"rng-{rank}.safetensors"
    if not p.is_file():
        return None
    extra = rb.read_json(folder / f"rng-{rank}.json", _RNG_SCHEMA, error=CheckpointError, max_bytes=64 * 1024)
    return load_tensors(p), extra


def load_rng(folder: Path, rank: int) -> bool:
    """Restore this rank's RNG states; False when the checkpoint has none for this rank (other world size)."""
    got = read_rng(folder, rank)
    if got is None:
        return False
    set_rng_state(*got)
    return True


def write_meta(folder: Path, meta: dict) -> None:
    _write_json(folder / "meta.json", {"format": FORMAT, **meta}, indent=2)


def read_meta(folder: Path, required: tuple[str, ...] = ()) -> dict:
    """A checkpoint's meta.json, or a CheckpointError naming the file (not JSON, another format, or
    lacking one of ``required``)."""
    path = folder / "meta.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (a checkpoint folder without its meta.json)")
    meta = rb.read_json(path, META_SCHEMA, error=CheckpointError, max_bytes=16 * rb.MiB, what="meta.json")
    missing = [k for k in required if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: lacks {', '.join(missing)}")
    return meta


# --------------------------------------------------------------------------- the layout: every file name here
def weights_file(folder: Path, net: str) -> Path:
    """A network's weights (buffers included): every network under DDP, the frozen ones under DeepSpeed."""
    return folder / f"{net}.safetensors"


def misfit(path: Path, e: Exception) -> TrainingError:
    """The error of weights from ``path`` that do not load into the configured network (a size mismatch: another
    model config), whichever engine loads them."""
    first = " ".join(str(e).split())[:400]
    return TrainingError(f"{path}: does not fit the configured network ({first})")


def optimizer_file(folder: Path, net: str) -> Path:
    return folder / f"optim-{net}.pt"


def sharded_weights_dir(folder: Path, net: str) -> Path:
    """A trained network's weights as torch.distributed.checkpoint wrote them (train.checkpoint_format: sharded)."""
    return folder / f"{net}.dcp"


def is_sharded(meta: dict) -> bool:
    """Was this checkpoint written with ``train.checkpoint_format: sharded`` (meta.json says; older ones: full)?"""
    return meta.get("checkpoint_format", "full") == "sharded"


def sharded_optimizer_dir(folder: Path, net: str) -> Path:
    return folder / f"optim-{net}.dcp"


def ema_file(folder: Path, index: int, net: str) -> Path:
    """EMA number ``index`` of a network (0: the primary one, which sampling and export use)."""
    return folder / f"ema{index}-{net}.safetensors"


def scaler_file(folder: Path) -> Path:
    return folder / "scaler.pt"


def family_rank_file(folder: Path, rank: int) -> Path:
    """A family's per-rank state (``Family.rank_state``), for families that keep one."""
    return folder / f"family-{rank}.safetensors"


def deepspeed_dir(folder: Path, net: str) -> Path:
    """DeepSpeed's own partitioned model and optimizer states of a network."""
    return folder / "deepspeed" / net


@dataclass
class CheckpointData:
    """What a checkpoint holds for one rank, read into memory before anything is applied."""

    meta: dict
    weights: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    optimizers: dict[str, Any] = field(default_factory=dict)
    emas: dict[str, list[dict[str, torch.Tensor]]] = field(default_factory=dict)
    scaler: Optional[Any] = None
    rng: Optional[tuple[dict[str, torch.Tensor], dict]] = None
    family_rank: dict[str, torch.Tensor] = field(default_factory=dict)


def write(tmp: Path, *, weights: dict, optimizers: dict, scaler: Optional[Any],
          emas: dict[str, list[dict[str, torch.Tensor]]], meta: dict) -> None:
    """Rank 0: distgen's shared files (weights, optimizers, scaler, EMAs, meta.json) into the temporary folder
    ``tmp``, each flushed to disk as it is written. Every rank adds its own RNG states (:func:`save_rng`)."""
    for n, state in weights.items():
        save_tensors(weights_file(tmp, n), state)
    for n, state in optimizers.items():
        save_state(optimizer_file(tmp, n), state)
    if scaler is not None:
        save_state(scaler_file(tmp), scaler)
    for n, tensors in emas.items():
        for i, t in enumerate(tensors):
            save_tensors(ema_file(tmp, i, n), t)
    write_meta(tmp, meta)


def commit(root: Path, step: int, keep: int, shared: dict, shards: Optional[Callable[[], Any]] = None) -> Path:
    """Rank 0, once every rank's own files are in the temporary folder: the shared files (:func:`write`'s keyword
    arguments ``shared``), then :func:`finalize`. A failure removes the temporary folder (distgen's own), leaving
    the checkpoints as they were. What a background write runs (:mod:`distgen.async_save`), and a synchronous one;
    in the background with sharded files, ``shards`` first: every rank's shards, which it returns from once all
    are flushed (:func:`distgen.checkpoint_dcp.stage`)."""
    tmp = tmp_dir(root, step)
    try:
        if shards is not None:
            shards()
        write(tmp, **shared)
        return finalize(root, step, keep)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read(folder: Path, meta: dict, *, rank: int, weights: list[str], optimizers: list[str],
         deepspeed: list[str], emas: dict[str, int], scaler: bool, family_rank: bool = False) -> CheckpointData:
    """Every file of ``folder`` that this rank resumes from, read into memory (nothing applied yet), or a
    CheckpointError naming the file that is missing, truncated or refused.

    ``emas`` maps a network to its number of EMAs; ``deepspeed`` lists the networks whose states are
    DeepSpeed's own files (only checked to be there: DeepSpeed reads them itself); ``family_rank``: the
    family keeps per-rank tensors (a rank the writing run did not have starts without them).
    """
    data = CheckpointData(meta)
    for n in deepspeed:
        state = deepspeed_dir(folder, n) / "state"
        if not state.is_dir() or not any(state.iterdir()):
            raise CheckpointError(f"{state}: missing or empty (DeepSpeed's states of {n})")
    for n in weights:
        data.weights[n] = load_tensors(weights_file(folder, n))
    for n in optimizers:
        data.optimizers[n] = load_state(optimizer_file(folder, n))
    for n, count in emas.items():
        if n not in meta.get("ema_steps", {}):
            raise CheckpointError(f"{folder / 'meta.json'}: ema_steps lacks {n}")
        data.emas[n] = [load_tensors(ema_file(folder, i, n)) for i in range(count)]
    if scaler and scaler_file(folder).is_file():
        data.scaler = load_state(scaler_file(folder))
    data.rng = read_rng(folder, rank)
    if data.rng is None and rank < meta["world_size"]:  # a rank the writing run had must find its states
        raise CheckpointError(f"{folder / f'rng-{rank}.safetensors'}: missing from the checkpoint")
    if family_rank and rank < meta["world_size"]:
        data.family_rank = load_tensors(family_rank_file(folder, rank))
    return data


def write_best(folder: Path, emas: dict[str, dict[str, torch.Tensor]], meta: dict) -> None:
    """The primary EMA weights that scored best, as a self-describing folder (``distgen sample/eval/export``
    read it), built beside ``folder`` and renamed over it: a crash leaves the previous best intact."""
    with atomic_dir(folder) as tmp:
        for n, tensors in emas.items():
            save_tensors(ema_file(tmp, 0, n), tensors)
        write_meta(tmp, meta)


def load_newest(root: Path, load: Callable[[Path], Any], *, main: bool = True,
                failed_anywhere: Callable[[bool], bool] = lambda failed: failed, set_aside_damaged: bool = False,
                log: Callable[[str], None] = print) -> tuple[Optional[Path], Any]:
    """The newest checkpoint folder under ``root`` that ``load(folder)`` reads (or applies) without an error
    on every rank, and what ``load`` returned. ``failed_anywhere(failed)`` tells every rank whether any
    rank failed (a single process: whether it did).

    A newer folder that fails is reported through ``log`` by file and reason; with ``set_aside_damaged``
    (training) it is renamed ``step-NNNNNNNN.damaged`` so that neither this run nor a later one tries it
    again (its files stay); sampling and export only read, and rename nothing. ``(None, None)`` when there
    is no checkpoint folder; with folders of which none loads, a CheckpointError listing them: distgen never
    starts afresh over them. A TrainingError from ``load`` that is not a CheckpointError (a changed
    config) is not damage and stops at once.
    """
    from distgen.errors import TrainingError

    failures: list[tuple[Path, str]] = []
    for folder in reversed(checkpoint_folders(root)):
        why = None
        try:
            value = load(folder)
        except TrainingError as e:
            if not isinstance(e, CheckpointError):
                raise
            why = describe_failure(folder, e)
        except Exception as e:  # anything that goes wrong reading a checkpoint means it is damaged
            why = describe_failure(folder, e)
        if why is not None and not main:  # rank 0 reports its own in the summary below
            print(f"distgen: checkpoint {folder} does not load on this rank: {why}", file=sys.stderr, flush=True)
        if not failed_anywhere(why is not None):
            for bad, reason in failures if main else ():
                if set_aside_damaged:
                    log(f"distgen: {bad.name} does not load ({reason}); kept as {set_aside(bad).name}, "
                        f"resuming from the newest checkpoint that loads, {folder.name}")
                else:
                    log(f"distgen: checkpoint {bad} does not load ({reason}); using {folder}")
            return folder, value
        failures.append((folder, why or "does not load on another rank"))
    if failures:
        raise CheckpointError(no_checkpoint_loads(root, failures))
    return None, None

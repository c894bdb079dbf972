"""Sharded checkpoints (``train.checkpoint_format: sharded``): each trained network's weights and optimizer state
written by every rank with torch.distributed.checkpoint (DCP) into ``<net>.dcp/`` and ``optim-<net>.dcp/`` of the
checkpoint folder, and read back at any process count (DCP reshards on load) or whole in one process without a
process group (:func:`read_full`, what ``distgen sample`` uses for weights that have no EMA).

Why not save full state dicts: under FSDP2 a full save gathers every network on rank 0 (its memory and one
writer's bandwidth); here each rank writes its own shards (under DDP the replicated tensors once, spread over the
ranks by DCP's deduplication). With ``train.async_checkpoint`` a periodic save copies each rank's shards to host
memory and every rank writes them in the background (:func:`stage`).

Reading back without running code: torch 2.14's ``FileSystemReader.read_metadata`` unpickles ``.metadata`` with
``pickle.load`` and its default planner loads non-tensor values (the optimizer's param_groups) with
``torch.load(weights_only=False)``: a crafted file would run code. :class:`SafeReader` unpickles the metadata with
an unpickler that builds only DCP's metadata dataclasses (and torch.Size, dtypes, layouts, paths), then checks what
it describes (shard files by plain name, present and long enough, no stream transforms); :class:`SafePlanner` loads
non-tensor values with ``weights_only=True``. Tensor data DCP itself reads with ``torch.load(weights_only=True)``
(``FileSystemReader.read_data``). Every failure is a CheckpointError naming the file, so that
:func:`distgen.checkpoint.load_newest` falls back over a damaged checkpoint as over a damaged full one.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from distgen import checkpoint as ckpt
from distgen.errors import CheckpointError

FORMATS = ("full", "sharded")
MAX_METADATA_BYTES = 1 << 30
_SHARD_NAME = re.compile(r"^__\d+_\d+\.distcp$")  # what FileSystemWriter names its files (one per rank and writer)
_DCP_META = "torch.distributed.checkpoint.metadata"
# Everything a DCP .metadata pickle names (torch 2.14, FileSystemWriter): data classes and values, no code
_ALLOWED = {(_DCP_META, n) for n in ("Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorStorageMetadata",
                                     "BytesStorageMetadata", "TensorProperties", "StorageMeta",
                                     "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("torch._utils", "_get_layout"),  # a layout by its name
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),  # StorageMeta.checkpoint_id
    ("collections", "OrderedDict")}


# --------------------------------------------------------------------------- writing (every rank, a collective)
def save(net: torch.nn.Module, opt: torch.optim.Optimizer, folder: Path, name: str) -> None:
    """Every rank: ``net``'s weights and ``opt``'s state (as DCP holds them: this rank's shards under FSDP2, plain
    tensors under DDP, keyed by parameter name) into ``folder``, every file flushed to disk (``sync_files``); the
    folders are flushed by the checkpoint's commit."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    for path, state in ((ckpt.sharded_weights_dir(folder, name), get_model_state_dict(net)),
                        (ckpt.sharded_optimizer_dir(folder, name), get_optimizer_state_dict(net, opt))):
        with _quiet():
            dcp.save(state, storage_writer=dcp.FileSystemWriter(path, sync_files=True))


def stage(nets: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]], folder: Path) -> Callable[[], None]:
    """Every rank, for a save in the background (train.async_checkpoint): what :func:`save` writes of each network
    (name -> (network, optimizer)), copied here to host memory by DCP's own staging (what its ``async_save`` does:
    the steps that follow cannot change the copies), and the function that writes those copies, to run on every
    rank in distgen's writer thread (distgen.async_save). The same ``dcp.save`` on the same values: the files hold
    the tensors a foreground save writes, bit for bit. Its collectives run on a gloo group of their own
    (:func:`_writer_group`), beside the main thread's on the default group. When it returns on rank 0, every
    rank's shard files are flushed: DCP's last step gathers every rank's write result before rank 0 writes
    ``.metadata``, so the folder may then be renamed into place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    staged = []
    for name, (net, opt) in nets.items():
        for path, state in ((ckpt.sharded_weights_dir(folder, name), get_model_state_dict(net)),
                            (ckpt.sharded_optimizer_dir(folder, name), get_optimizer_state_dict(net, opt))):
            writer = dcp.FileSystemWriter(path, sync_files=True)
            staged.append((writer, writer.stage(state)))
    group = _writer_group()
    if group is None:  # one process: DCP would warn from the thread (warnings' filters are not thread-safe to swap)
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)

    def write() -> None:
        from torch.distributed.checkpoint.api import CheckpointException

        for writer, state in staged:
            try:
                dcp.save(state, storage_writer=writer, process_group=group)
            except CheckpointException as e:  # its message lists only the ranks: the first one's cause, by folder
                rank, (exc, _trace) = next(iter(e.failures.items())) if e.failures else (None, (e, None))
                raise CheckpointError(f"{writer.path}: rank {rank}: {type(exc).__name__}: "
                                      f"{ckpt.first_line(exc)[:300]}") from None

    return write


_GROUP: list = []  # the background writes' gloo group, while a run has one (release_writer_group)


def _writer_group():
    """Every rank alike, on the main thread (``new_group`` is a collective of the default group): a gloo group for
    the background writes' collectives, made at a run's first such save (None without a process group). A group of
    its own, so they never interleave with the training's collectives on the default group, and gloo, which runs
    them on CPU tensors whatever the training's backend (DCP's async_save asks the same)."""
    import torch.distributed as tdist

    if not (tdist.is_available() and tdist.is_initialized()):
        return None
    if not _GROUP:
        _GROUP.append(tdist.new_group(backend="gloo"))
    return _GROUP[0]


def release_writer_group() -> None:
    """Every rank, once its writes have ended (the run's end, :meth:`distgen.async_save.CheckpointWriter.close`): the
    group destroyed now. Held here until interpreter teardown, gloo's threads abort a finished process (exit -6)."""
    import torch.distributed as tdist

    while _GROUP:
        group = _GROUP.pop()
        if tdist.is_initialized():
            try:
                tdist.destroy_process_group(group)
            except Exception:  # noqa: BLE001 - leaving anyway (the default group may be gone with it)
                pass


# --------------------------------------------------------------------------- reading
def read(net: torch.nn.Module, opt: torch.optim.Optimizer, folder: Path, name: str) -> tuple[dict, dict]:
    """Every rank (a collective): a checkpoint's weights and optimizer state of ``net`` in the layout the running
    engine holds them (this rank's shards at whatever process count), read into copies: nothing is applied yet."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    from torch.utils._pytree import tree_map_only

    out = []
    for path, state in ((ckpt.sharded_weights_dir(folder, name), get_model_state_dict(net)),
                        (ckpt.sharded_optimizer_dir(folder, name), get_optimizer_state_dict(net, opt))):
        if not out:
            _check_fits(state, path)
        state = tree_map_only(torch.Tensor, lambda t: t.detach().clone(), state)
        _load(state, path)
        out.append(state)
    return out[0], out[1]


def _check_fits(weights: dict, path: Path) -> None:
    """Every rank alike (the same files, the same network): weights of another shape or with other names are
    another model config (a TrainingError, :func:`distgen.checkpoint.misfit`), not a damaged checkpoint to pass
    over, as for full checkpoints; DCP would report both as one failure."""
    saved = read_metadata(path / ".metadata").state_dict_metadata
    odd = sorted(set(saved) ^ set(weights))
    if odd:
        raise ckpt.misfit(path, ValueError(f"names differ: {', '.join(odd[:5])}"))
    for k, v in weights.items():
        size = getattr(saved[k], "size", None)
        if torch.is_tensor(v) and (size is None or tuple(size) != tuple(v.shape)):
            raise ckpt.misfit(path, ValueError(f"{k}: saved {tuple(size or ())}, the network's {tuple(v.shape)}"))


def apply(net: torch.nn.Module, opt: torch.optim.Optimizer, weights: dict, optimizer: dict) -> None:
    """Every rank: what :func:`read` returned into the network and its optimizer."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(net, weights)
    set_optimizer_state_dict(net, opt, optimizer)


def read_full(path: Path) -> dict:
    """One process, no process group: everything a DCP folder holds, every tensor whole (assembled from the
    ranks' chunks), nested as it was saved (an optimizer's ``{"state": ..., "param_groups": [...]}``)."""
    md = read_metadata(path / ".metadata")
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    flat: dict[str, Any] = {k: torch.empty(m.size, dtype=m.properties.dtype) if isinstance(m, TensorStorageMetadata)
                            else None for k, m in md.state_dict_metadata.items()}
    _load(flat, path, no_dist=True)
    return _nest(flat, md.planner_data or {})


def read_weights(folder: Path, net: str) -> Optional[dict[str, torch.Tensor]]:
    """A network's whole weights from a checkpoint of either format, in this process: ``<net>.safetensors``, or
    ``<net>.dcp/`` assembled (:func:`read_full`); None when the checkpoint holds neither."""
    if ckpt.weights_file(folder, net).is_file():
        return ckpt.load_tensors(ckpt.weights_file(folder, net))
    path = ckpt.sharded_weights_dir(folder, net)
    if not path.is_dir():
        return None
    tensors = read_full(path)
    bad = [k for k, v in tensors.items() if not torch.is_tensor(v)]
    if bad:
        raise CheckpointError(f"{path}: holds values that are not tensors ({', '.join(bad[:3])})")
    return tensors


def _load(state: dict, path: Path, no_dist: bool = False) -> None:
    """DCP's load into ``state`` with distgen's reader and planner; any failure (on any rank: DCP gathers them)
    as a CheckpointError naming the file when one is known."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    reader = SafeReader(path)
    try:
        with _quiet():
            dcp.load(state, storage_reader=reader, planner=SafePlanner(), no_dist=no_dist)
    except CheckpointException as e:  # a BaseException: load_newest would not take it for damage
        raise CheckpointError(reader.refused or _first_failure(path, e)) from None
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - anything else reading it means the checkpoint does not load
        raise CheckpointError(reader.refused or f"{path}: {ckpt.first_line(e)}") from None


def _first_failure(path: Path, e) -> str:
    for exc, _trace in e.failures.values():
        if isinstance(exc, CheckpointError):
            return str(exc)
    exc = next(iter(e.failures.values()))[0] if e.failures else e
    return f"{path}: does not load ({type(exc).__name__}: {ckpt.first_line(exc)[:300]})"


def _dcp_fallback_note(record: logging.LogRecord) -> bool:
    """False for DCP's log of a refused ``.metadata`` ("... not found. Falling back to rank local metadata", with
    its traceback, on the root logger): distgen reports the refusal itself, once, naming the file."""
    return not str(record.msg).startswith(("Global metadata is not found", "Rank local metadata is not found"))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """DCP warns that it loads "in a single process" without a process group (meant: the one-process reads and
    1-process runs), and logs a refused metadata file with a traceback (:func:`_dcp_fallback_note`)."""
    root = logging.getLogger()
    root.addFilter(_dcp_fallback_note)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        root.removeFilter(_dcp_fallback_note)


# --------------------------------------------------------------------------- reading without running code
class _MetadataUnpickler(pickle.Unpickler):
    """An unpickler that builds DCP's metadata and nothing else: any other global (a function, a class with side
    effects) is refused by name, before anything is called."""

    def __init__(self, data: bytes, path: Path):
        super().__init__(io.BytesIO(data))
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise CheckpointError(f"{self.path}: refused: it names {module}.{name}, which DCP's metadata never holds "
                              f"(distgen unpickles no code from a checkpoint)")


def read_metadata(path: Path):
    """A DCP folder's ``.metadata`` read with :class:`_MetadataUnpickler` and checked against the folder's files,
    or a CheckpointError naming the file."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, Metadata, MetadataIndex,
                                                       TensorStorageMetadata)

    if not path.is_file():
        raise CheckpointError(f"{path}: missing from the checkpoint")
    if path.stat().st_size > MAX_METADATA_BYTES:
        raise CheckpointError(f"{path}: larger than {MAX_METADATA_BYTES} bytes, not DCP metadata")
    try:
        md = _MetadataUnpickler(path.read_bytes(), path).load()
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated or not a pickle at all
        raise CheckpointError(f"{path}: not readable DCP metadata ({type(e).__name__}: {ckpt.first_line(e)})") from None
    ok = isinstance(md, Metadata) and isinstance(md.state_dict_metadata, dict) and all(
        isinstance(k, str) and isinstance(v, (TensorStorageMetadata, BytesStorageMetadata))
        for k, v in md.state_dict_metadata.items()) and isinstance(md.storage_data, dict)
    if not ok:
        raise CheckpointError(f"{path}: not DCP metadata (unexpected structure)")
    sizes: dict[str, int] = {}
    for index, info in md.storage_data.items():
        if not (isinstance(index, MetadataIndex) and isinstance(info, _StorageInfo)
                and isinstance(info.relative_path, str) and _SHARD_NAME.match(info.relative_path)
                and isinstance(info.offset, int) and isinstance(info.length, int) and info.offset >= 0
                and info.length >= 0 and not info.transform_descriptors):
            raise CheckpointError(f"{path}: names storage distgen does not read ({index!r})")
        shard = path.parent / info.relative_path
        if info.relative_path not in sizes:
            if not shard.is_file():
                raise CheckpointError(f"{shard}: missing from the checkpoint")
            sizes[info.relative_path] = shard.stat().st_size
        if info.offset + info.length > sizes[info.relative_path]:
            raise CheckpointError(f"{shard}: truncated ({sizes[info.relative_path]} bytes; the metadata places "
                                  f"data up to byte {info.offset + info.length})")
    # what a tensor's metadata asks to allocate, against the bytes its chunks take in the shard files (torch.save'd:
    # at least the raw data), so a crafted size cannot make a reader allocate more than the folder holds
    stored: dict[str, int] = {}
    for index, info in md.storage_data.items():
        stored[index.fqn] = stored.get(index.fqn, 0) + info.length
    for key, m in md.state_dict_metadata.items():
        if not isinstance(m, TensorStorageMetadata):
            continue
        dims = tuple(m.size) if isinstance(m.size, tuple) else None
        dtype = getattr(getattr(m, "properties", None), "dtype", None)
        if dims is None or not all(isinstance(d, int) and d >= 0 for d in dims) or not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"{path}: not DCP metadata ({key}: size {m.size!r}, dtype {dtype!r})")
        if math.prod(dims) * dtype.itemsize > stored.get(key, 0):
            raise CheckpointError(f"{path}: {key} is {tuple(dims)} {dtype}, more than its {stored.get(key, 0)} "
                                  f"stored bytes hold")
    pd = md.planner_data
    if pd is not None and not (isinstance(pd, dict) and all(
            isinstance(k, str) and isinstance(v, tuple) and all(isinstance(p, (str, int)) for p in v)
            for k, v in pd.items())):
        raise CheckpointError(f"{path}: not DCP metadata (unexpected planner data)")
    return md


class SafeReader(FileSystemReader):
    """DCP's file reader with :func:`read_metadata`. It takes no keyword arguments: DCP then never falls back to a
    rank's own ``__<rank>.metadata`` (which distgen does not write) when the folder's own is refused."""

    def __init__(self, path: Path):
        super().__init__(path)
        self.refused: Optional[str] = None

    def read_metadata(self):  # noqa: D102 - see the class
        from torch.distributed.checkpoint.metadata import StorageMeta

        try:
            md = read_metadata(Path(self.path) / ".metadata")
        except CheckpointError as e:
            self.refused = str(e)  # DCP wraps it in its own message; distgen reports the file
            raise
        md.storage_meta = StorageMeta(load_id=self.load_id)
        return md


class SafePlanner(DefaultLoadPlanner):
    """DCP's load planner with non-tensor values (an optimizer's param_groups) read as data only."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        obj = torch.load(value, map_location="cpu", weights_only=True)  # the parent's weights_only=False runs code
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _nest(flat: dict[str, Any], paths: dict[str, tuple]) -> dict:
    """DCP's flat keys back into the nested state dict they were flattened from (lists by their indices)."""
    out: dict = {}
    for key, value in flat.items():
        path = paths.get(key, (key,))
        here = out
        for p in path[:-1]:
            here = here.setdefault(p, {})
        here[path[-1]] = value

    def lists(d):
        if not isinstance(d, dict):
            return d
        d = {k: lists(v) for k, v in d.items()}
        if d and all(isinstance(k, int) for k in d) and sorted(d) == list(range(len(d))):
            return [d[i] for i in range(len(d))]
        return d

    return lists(out)

"""Every distributed concern in one place: ranks, process-group set-up, barriers, gathers.

Works with or without an initialised process group (one process is world 1),
so models, data stages and tests never import torch.distributed themselves.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import torch.distributed as td


def initialized() -> bool:
    return td.is_available() and td.is_initialized()


def rank() -> int:
    return td.get_rank() if initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return td.get_world_size() if initialized() else int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return rank() == 0


def print0(*values: Any, sep: str = " ", end: str = "\n", file=None) -> None:
    """``print`` on rank 0 only, flushed at once: what every rank would say alike is said once, and a log read
    while the run goes on (or after a crash) has it. Messages carry their own prefix (``distgen: ...``)."""
    if is_main():
        print(*values, sep=sep, end=end, file=file, flush=True)


def init_from_env(backend: str = "gloo") -> None:
    """Join the process group described by torchrun-style env vars (no-op if world 1 or done)."""
    if not initialized() and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        td.init_process_group(backend=backend)


def cpu_only() -> bool:
    """True when Accelerate should form CPU process groups (gloo): no GPU, and not DeepSpeed
    (whose own CPU accelerator picks the backend)."""
    return not torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true"


def accelerate_handlers() -> list:
    """Accelerate kwargs handlers for this machine: DeepSpeed without GPUs needs gloo named
    explicitly (Accelerate would otherwise see no backend and count one process)."""
    if not torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        from accelerate.utils import InitProcessGroupKwargs

        return [InitProcessGroupKwargs(backend="gloo")]
    return []


def derive_seed(*parts: int) -> int:
    """A 32-bit seed from a tuple of integers (seed, rank, step, ...), well mixed by numpy's SeedSequence.

    Every stream that must be reproducible from its coordinates (data per rank and
    worker, training noise per step, one image per index) is seeded through here.
    """
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def seed_host_generators(seed: int, rank: int) -> None:
    """Seed Python's ``random`` and numpy's global generator from (seed, rank)."""
    import random

    s = derive_seed(seed, rank)
    random.seed(s)
    np.random.seed(s)


def free_port() -> int:
    """A TCP port free on this host now, for a local rendezvous (tests, benchmarks)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shutdown() -> None:
    """Leave the process group as a command ends. Left to interpreter teardown, gloo's threads were seen
    (rarely) to abort a process that had finished its work ("terminate called without an active exception",
    exit -6, after a 2-process ``distgen sample`` had written its file). No barrier: a rank that failed must
    not wait for the others."""
    if initialized():
        try:
            torch.distributed.destroy_process_group()
        except Exception:  # noqa: BLE001 - leaving anyway; the command's own result stands
            pass


def end_rank(code: int) -> None:
    """End this process, one rank of a multi-process launch whose work is done: its process group left, stdout and
    stderr flushed, Python's exit handlers run (logging, trackers, worker processes), then ``os._exit`` without
    the interpreter's teardown. After the group was destroyed, that teardown was still seen to abort a rank that
    had written its output ("terminate called without an active exception", exit -6, no Python frame left: a gloo
    thread's objects freed as the interpreter went), failing the whole launch."""
    import atexit
    import sys

    shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def barrier() -> None:
    if initialized():
        td.barrier()


def all_reduce_sum(value: int | float) -> int | float:
    """Sum a number over all ranks (an int stays an int)."""
    total = all_reduce_floats([float(value)])[0]
    return int(total) if isinstance(value, int) else total


_host_group = None


def agreed(flag: bool) -> bool:
    """Did any rank raise ``flag``? (The same answer on every rank.)"""
    return all_reduce_sum(int(flag)) > 0 if world_size() > 1 else flag


def _cpu_group():
    """A gloo group for numbers the host holds (flags, counts): over NCCL they would be copied to the GPU
    and read back, a wait for everything queued on it. Made on first use, which every rank reaches alike."""
    global _host_group
    if td.get_backend() != "nccl":
        return None  # the default group works on CPU tensors
    if _host_group is None:
        _host_group = td.new_group(backend="gloo")
    return _host_group


def all_reduce_floats(values: list[float]) -> list[float]:
    """Sum each of a few numbers over all ranks, in one collective (on the host)."""
    if not initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    td.all_reduce(t, group=_cpu_group())
    return t.tolist()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order."""
    if not initialized():
        return [obj]
    out: list[Any] = [None] * td.get_world_size()
    td.all_gather_object(out, obj)
    return out


def gather_object(obj: Any, dst: int = 0) -> list[Any] | None:
    """Every rank's ``obj`` in rank order on ``dst`` (None elsewhere): big results go to one rank only."""
    if not initialized():
        return [obj]
    out: list[Any] | None = [None] * td.get_world_size() if td.get_rank() == dst else None
    td.gather_object(obj, out, dst=dst)
    return out


def all_reduce_tensor_(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks, in place."""
    if initialized():
        td.all_reduce(t)
    return t

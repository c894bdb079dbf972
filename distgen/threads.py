"""CPU threads per process, chosen once at start-up for every command that runs torch.

torch's default is one thread per core of the machine, in every process: two processes on two cores then run four
threads that spin against each other, and small convolutions get several times slower (about 10x measured on a
busy 2-core machine). distgen gives each process the cores it may run on (its CPU affinity, and a container's CPU
quota) divided by the processes of the job on this machine (LOCAL_WORLD_SIZE, set by torchrun and accelerate
launch; MPI's local size), at least one.

Who decides, first that applies: ``$DISTGEN_THREADS`` (a number, or ``auto`` for distgen's choice even where
OMP_NUM_THREADS is set); ``$OMP_NUM_THREADS`` as the user or the launcher set it (accelerate launch and torchrun set
1 for several processes); distgen's choice. An environment variable rather than a config key: sample, eval, export
and ema have no config of their own, the choice belongs to the machine a command runs on rather than to the
experiment, and it has to be made before the config is read (torch sizes its pools at the first parallel op).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Mapping, Optional

from distgen.config.core import ConfigError

ENV = "DISTGEN_THREADS"
# processes of this job on this machine: torchrun / accelerate launch, then MPI's (accelerate's multi-CPU launcher)
LOCAL_SIZE_ENVS = ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_LOCAL_SIZE")
CGROUP = Path("/sys/fs/cgroup")

chosen: Optional[tuple[int, str]] = None  # (threads, why) once :func:`configure` ran


def cpu_quota(root: Path = CGROUP) -> Optional[float]:
    """A container's CPU limit in cores (cgroup v2 cpu.max, or v1's CFS quota), or None when unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def available_cores() -> int:
    """The cores this process may run on: its affinity (taskset, a scheduler's cpuset), within a CPU quota."""
    n = len(os.sched_getaffinity(0))
    quota = cpu_quota()
    return max(1, min(n, math.ceil(quota))) if quota else n


def _positive(value: str) -> Optional[int]:
    try:
        n = int(value.split(",")[0])  # OMP_NUM_THREADS may list nested levels: 4,2
    except ValueError:
        return None
    return n if n >= 1 else None


def local_processes(env: Mapping[str, str]) -> int:
    for k in LOCAL_SIZE_ENVS:
        n = _positive(env.get(k, ""))
        if n:
            return n
    return 1


def choose(env: Optional[Mapping[str, str]] = None, cores: Optional[int] = None) -> tuple[int, str]:
    """(threads per process, where the number comes from), as :func:`configure` applies it."""
    env = os.environ if env is None else env
    given = env.get(ENV, "").strip()
    if given and given != "auto":
        n = _positive(given)
        if n is None:
            raise ConfigError(f"${ENV}={given!r}: must be a whole number >= 1, or auto (distgen's choice)")
        return n, f"${ENV}"
    omp = _positive(env.get("OMP_NUM_THREADS", ""))
    if omp and not given:
        return omp, "$OMP_NUM_THREADS"
    cores = available_cores() if cores is None else cores
    local = local_processes(env)
    return max(1, cores // local), f"{cores} core(s) / {local} process(es) on this machine"


def configure() -> tuple[int, str]:
    """Choose and apply the thread count, before the command's first torch op."""
    global chosen
    n, why = choose()
    # Also in the environment: accelerate's PartialState resets torch's count on CPU when OMP_NUM_THREADS is unset
    # (to physical cores / local processes, which ignores affinity), and loader workers inherit it.
    os.environ["OMP_NUM_THREADS"] = str(n)
    # torch not yet imported (a config check imports none: `train --dry-run`): its OpenMP pool reads the variable
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)
    chosen = (n, why)
    return chosen


def describe() -> str:
    """The start-up line's words: ``CPU threads 1 per process (2 core(s) / 2 process(es) on this machine)``."""
    if chosen is None:
        import torch

        return f"CPU threads {torch.get_num_threads()} per process (torch's default)"
    n, why = chosen
    return f"CPU threads {n} per process ({why}{'' if why == '$' + ENV else f'; ${ENV} sets it'})"

"""SLURM: checks before submission, the rendezvous of a job's machines, and the per-machine command.

Used by ``launch/submit.py`` (submitit) and mirrored by ``slurm/*.sbatch``.
A job's machines are its tasks: task ``SLURM_PROCID`` of ``SLURM_NTASKS`` is
machine rank ``r`` of ``n``, and each runs one ``accelerate launch`` with its
share of processes (one per GPU, or ``procs_per_machine`` on CPU). The main
process lives on the first host of the job's node list; the port is derived
from the job id, so a requeued job finds it again.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from distgen.assets import asset


class SlurmError(RuntimeError):
    """The job cannot be submitted as asked."""


def parse_time(text: str) -> int:
    """A SLURM time limit (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``) in minutes."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise SlurmError(f"--time: {text!r} is not a SLURM time (HH:MM:SS, MM, D-HH:MM:SS, ...)")
    days, a, b, c = m.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        h, mi, s = int(a), int(b or 0), int(c or 0)
        total = int(days) * 1440 + h * 60 + mi + (s > 0)
        bad = h >= 24 or mi >= 60 or s >= 60
    elif c is not None:  # HH:MM:SS
        h, mi, s = int(a), int(b), int(c)
        total, bad = h * 60 + mi + (s > 0), mi >= 60 or s >= 60
    elif b is not None:  # MM:SS
        mi, s = int(a), int(b)
        total, bad = mi + (s > 0), s >= 60
    else:  # MM
        total, bad = int(a), False
    if bad or total < 1:
        raise SlurmError(f"--time: {text!r} is not a valid time limit of at least a minute")
    return total


def _sinfo(*args: str) -> list[str]:
    if shutil.which("sinfo") is None:
        raise SlurmError("sinfo not found: this machine is not a SLURM login node (or SLURM is not on PATH)")
    r = subprocess.run(["sinfo", "-h", *args], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise SlurmError(f"sinfo failed: {r.stderr.strip() or r.stdout.strip()}")
    return [l.strip() for l in r.stdout.splitlines() if l.strip()]


def check_partition(partition: str, gpus_per_node: int) -> None:
    """The partition exists, and has GPUs (GRES gpu) if GPUs are asked for."""
    parts = {p.rstrip("*") for p in _sinfo("-o", "%P")}
    if partition not in parts:
        raise SlurmError(f"--partition: no partition {partition!r} (sinfo lists: {', '.join(sorted(parts))})")
    if gpus_per_node > 0:
        gres = _sinfo("-p", partition, "-o", "%G")
        if not any("gpu" in g for g in gres):
            raise SlurmError(f"--gpus-per-node {gpus_per_node}: partition {partition!r} has no GPUs "
                             f"(its GRES: {', '.join(sorted(set(gres)))}); use --gpus-per-node 0 for CPU")


@dataclass(frozen=True)
class Rendezvous:
    machine_rank: int
    num_machines: int
    main_host: str
    port: int


def rendezvous(env: Optional[dict] = None) -> Rendezvous:
    """This task's place in the job, from SLURM's variables."""
    env = dict(os.environ if env is None else env)
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise SlurmError("not inside a SLURM job (SLURM_JOB_NODELIST is not set)")
    hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                           check=True).stdout.split()
    job = int(env.get("SLURM_ARRAY_JOB_ID") or env["SLURM_JOB_ID"])
    return Rendezvous(machine_rank=int(env.get("SLURM_PROCID", 0)), num_machines=int(env.get("SLURM_NTASKS", 1)),
                      main_host=hosts[0], port=20000 + job % 20000)


def train_command(config: str, overrides: list[str], procs_per_machine: int, rdv: Rendezvous) -> list[str]:
    """One machine's ``accelerate launch ... -m distgen train CONFIG`` of a multi-machine job."""
    return [sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", str(asset("accelerate", "multinode.yaml")),  # packaged: no source tree needed
            "--num_machines", str(rdv.num_machines), "--machine_rank", str(rdv.machine_rank),
            "--main_process_ip", rdv.main_host, "--main_process_port", str(rdv.port),
            "--num_processes", str(rdv.num_machines * procs_per_machine),
            "-m", "distgen", "train", config, *overrides]


def run_state(config: str, overrides: list[str]) -> str:
    """Where the run of ``config`` stands, from its newest checkpoint whose meta.json reads:

    ``finished`` (its final checkpoint, ``"reason": "end"``, at the configured length), ``preempted``
    (it stopped on a signal), ``started`` (checkpoints, but neither of those) or ``new`` (none).
    """
    from distgen import checkpoint as ckpt
    from distgen.config import load_config
    from distgen.errors import CheckpointError

    cfg = load_config(config, overrides)
    for folder in reversed(ckpt.checkpoint_folders(Path(cfg.run.folder) / "checkpoints")):
        try:
            meta = ckpt.read_meta(folder, ("step", "nimg", "reason"))
        except CheckpointError:
            continue
        tc = cfg.train
        at_end = meta["nimg"] >= tc.total_kimg * 1000 or (tc.max_steps is not None and meta["step"] >= tc.max_steps)
        if meta["reason"] == "end" and at_end:
            return "finished"
        return "preempted" if meta["reason"] == "preempted" else "started"
    return "new"


def was_preempted(config: str, overrides: list[str]) -> bool:
    """Did the run of ``config`` stop on a signal (its newest checkpoint says ``reason: preempted``)?"""
    return run_state(config, overrides) == "preempted"


def main(argv: Optional[list[str]] = None) -> int:
    """For sbatch scripts: ``python -m distgen.slurm run-state CONFIG [key=value ...]`` prints finished,
    preempted, started or new; ``was-preempted`` exits 0 if the run stopped on a signal."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or argv[0] not in ("run-state", "was-preempted"):
        print("usage: python -m distgen.slurm run-state|was-preempted CONFIG [key=value ...]", file=sys.stderr)
        return 2
    state = run_state(argv[1], argv[2:])
    if argv[0] == "run-state":
        print(state)
        return 0
    return 0 if state == "preempted" else 1


if __name__ == "__main__":
    raise SystemExit(main())

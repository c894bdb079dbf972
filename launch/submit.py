#!/usr/bin/env python
"""Submit a distgen training job to SLURM through submitit.

    python launch/submit.py CONFIG --nodes N --gpus-per-node G --partition P --time HH:MM:SS \
        [--account A] [--qos Q] [--constraint C] [--mem M] [--cpus-per-task C] \
        [--procs-per-node K] [--tasks-per-node T] [--logs DIR] [--dry-run] [key=value ...]

Each task of the job is one machine: it runs one `accelerate launch` with its
machine rank, the machine count, the first host of the job as main process
and a port derived from the job id (distgen.slurm). With --tasks-per-node > 1
several machines share a node: one task per GPU with --tasks-per-node G
--gpus-per-node G (each task sees its own GPU), or, on one CPU node, a test of
the multi-machine rendezvous.
CPU-only partitions work with --gpus-per-node 0 (gloo; --procs-per-node
processes per machine).

Time limit and preemption: SLURM sends SIGTERM to every process of the job
(90 s before the limit, or when preempting). distgen's processes finish their
step, write a checkpoint and exit; submitit then requeues the job, which
resumes from the run folder's newest checkpoint. A signal after the final
checkpoint requeues nothing (the job completes), and a job whose run has
finished returns at once.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# submitit's preemption signal: SIGTERM, the one torchrun forwards and SLURM sends on preemption
# (its default, SIGUSR2, would kill torchrun). Read when submitit is imported, here and in the job.
os.environ.setdefault("SUBMITIT_PREEMPT_SIGNAL", "TERM")

from distgen.slurm import SlurmError, check_partition, parse_time, rendezvous, run_state, train_command  # noqa: E402


def _wait_exit(pid: int, timeout: float) -> None:
    """Wait for a child to end without reaping it: this runs in a signal handler that may have
    interrupted Popen.wait() on the same child, whose lock it would deadlock on."""
    end = time.time() + timeout
    while time.time() < end:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.5)


class Train:
    """The job's function: one machine's `accelerate launch ... distgen train`, checkpointable."""

    def __init__(self, config: str, overrides: list[str], procs_per_machine: int, gpus_per_machine: int = 0):
        self.config, self.overrides, self.procs, self.gpus = config, overrides, procs_per_machine, gpus_per_machine
        self.proc = None

    def __getstate__(self):
        return {**self.__dict__, "proc": None}

    def __call__(self) -> str:
        from submitit.core.utils import UncompletedJobError

        if run_state(self.config, self.overrides) == "finished":
            print(f"distgen submit: the run of {self.config} has already finished; nothing to do", flush=True)
            return "done"
        place = rendezvous()
        cmd = train_command(self.config, self.overrides, self.procs, place)
        print("distgen submit: " + " ".join(cmd), flush=True)
        env = dict(os.environ)
        tasks_here = int(env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0] or 1)
        if self.gpus and tasks_here > 1:
            # Several machines (tasks) on a node, e.g. one task per GPU: each sees its own GPUs.
            local = int(env.get("SLURM_LOCALID", 0))
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(local * self.gpus + i) for i in range(self.gpus))
        self.proc = subprocess.Popen(cmd, env=env)
        try:
            code = self.proc.wait()
            state = run_state(self.config, self.overrides)
        except UncompletedJobError:
            # submitit raises this from its signal handler when checkpoint() declined to requeue: the
            # signal came after the run's final checkpoint. The run is done; let the job complete.
            code = self.proc.wait()
            state = run_state(self.config, self.overrides)
        if code == 0 or state == "finished":  # a signal after the end checkpoint can fail the launcher
            return "done"
        if state == "preempted":
            if place.machine_rank != 0:
                # This machine's part of the checkpoint is written and task 0's submitit handler is requeueing
                # the job: this task is done. (Waiting for the requeue's SIGTERM to end it did not work: submitit
                # ignores SIGTERM on tasks other than 0, so SLURM killed a waiting task only after KillWait,
                # 30 s by default; restoring the default handler first still lost a SIGTERM that came while
                # this machine's training was ending, seen under CI.)
                print("distgen submit: preempted; this machine's part of the checkpoint is written", flush=True)
                return "preempted"
            # Task 0's training took a signal that this process did not get, so nothing requeues the job.
            raise RuntimeError(f"{self.config}: training was stopped by a signal and checkpointed, but the job "
                               "got no preemption signal and is not requeued; submit it again to resume")
        raise RuntimeError(f"training exited with status {code}")

    def checkpoint(self):
        """Called by submitit on task 0 when the job is preempted or out of time.

        Every process got the signal and is writing its part of the checkpoint; wait for that, then ask
        for the same job again (it resumes from the checkpoint) unless the run has finished meanwhile.
        """
        import submitit

        if self.proc is not None:
            _wait_exit(self.proc.pid, timeout=600)
        if run_state(self.config, self.overrides) == "finished":
            print("distgen submit: the signal came after the final checkpoint; no requeue", flush=True)
            return None
        return submitit.helpers.DelayedSubmission(Train(self.config, self.overrides, self.procs, self.gpus))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="launch/submit.py", description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the config")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0)
    p.add_argument("--partition", required=True)
    p.add_argument("--time", required=True, help="time limit, HH:MM:SS (or any SLURM form)")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--constraint")
    p.add_argument("--mem", help="memory per node, e.g. 64G")
    p.add_argument("--cpus-per-task", type=int, default=None)
    p.add_argument("--tasks-per-node", type=int, default=1, help="machines per node (1 on a real cluster)")
    p.add_argument("--procs-per-node", type=int, default=None,
                   help="processes per machine (default: --gpus-per-node, or 1 on CPU)")
    p.add_argument("--name", default=None, help="job name (default: the config's run.name)")
    p.add_argument("--logs", default="logs/submitit", help="submitit's folder for job logs (default logs/submitit)")
    p.add_argument("--dry-run", action="store_true", help="print what would be submitted and exit")
    a = p.parse_intermixed_args(argv)  # key=value overrides may come after the options

    from distgen.config import ConfigError, load_config

    try:
        if not Path(a.config).is_file():
            raise SlurmError(f"{a.config}: no such config file")
        cfg = load_config(a.config, a.overrides)  # a bad key or value fails here, before SLURM hears of it
        minutes = parse_time(a.time)
        for flag in ("nodes", "tasks_per_node"):
            if getattr(a, flag) < 1:
                raise SlurmError(f"--{flag.replace('_', '-')}: must be >= 1")
        if a.gpus_per_node < 0:
            raise SlurmError("--gpus-per-node: must be >= 0")
        gpus_per_task, rem = divmod(a.gpus_per_node, a.tasks_per_node)
        if rem:
            raise SlurmError(f"--gpus-per-node {a.gpus_per_node} does not split over {a.tasks_per_node} tasks")
        procs = a.procs_per_node or gpus_per_task or 1
        check_partition(a.partition, a.gpus_per_node)
    except (SlurmError, ConfigError) as e:
        print(f"launch/submit.py: error: {e}", file=sys.stderr)
        return 2

    config = str(Path(a.config).resolve())
    name = a.name or cfg.run.name
    params = dict(job_name=name, partition=a.partition, time=minutes, nodes=a.nodes,
                  ntasks_per_node=a.tasks_per_node, cpus_per_task=a.cpus_per_task,
                  gpus_per_node=a.gpus_per_node or None, account=a.account, qos=a.qos, constraint=a.constraint,
                  mem=a.mem, signal_delay_s=90, additional_parameters={"requeue": True})
    params = {k: v for k, v in params.items() if v is not None}
    machines = a.nodes * a.tasks_per_node
    summary = (f"{name}: {a.nodes} node(s) x {a.tasks_per_node} machine(s) x {procs} process(es) = "
               f"{machines * procs} processes, partition {a.partition}, time {a.time}, run folder {cfg.run.folder}")
    if a.dry_run:
        print(f"would submit {summary}")
        print("sbatch parameters: " + ", ".join(f"{k}={v}" for k, v in params.items()))
        print("each machine runs: accelerate launch --config_file configs/accelerate/multinode.yaml "
              f"--num_machines {machines} --machine_rank $SLURM_PROCID --main_process_ip <first host> "
              f"--main_process_port <20000 + job id % 20000> --num_processes {machines * procs} "
              f"-m distgen train {config} {' '.join(a.overrides)}".rstrip())
        return 0

    import submitit

    executor = submitit.SlurmExecutor(folder=str(Path(a.logs) / "%j"), max_num_timeout=20)
    executor.update_parameters(**params)
    job = executor.submit(Train(config, list(a.overrides), procs, gpus_per_task))
    print(f"submitted job {job.job_id}: {summary}")
    print(f"logs: {Path(a.logs) / job.job_id}/ ({job.job_id}_0_log.out, ...)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Cluster launch on a real single-node SLURM: submitit and sbatch jobs, preemption and requeue,
multi-machine rendezvous (2 tasks on one node acting as 2 machines over loopback)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO
from distgen import checkpoint as ckpt
from test_train import launch, run, tiny_config, weights


def _slurm_up() -> str | None:
    """None when SLURM answers; else why not (after trying to start the local test cluster as root)."""
    if shutil.which("sbatch") is None:
        return "SLURM is not installed (Debian: slurmctld slurmd munge)"
    ok = lambda: subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True).stdout.strip()  # noqa
    state = ok()
    if state and "down" not in state and "drain" not in state:
        return None
    if os.geteuid() != 0:
        return "SLURM is not running and starting it needs root (slurm/local_cluster.sh)"
    r = subprocess.run([str(REPO / "slurm/local_cluster.sh")], capture_output=True, text=True)
    return None if r.returncode == 0 else f"SLURM could not start here: {r.stderr.strip()[-300:]}"


_why = _slurm_up()
if _why is not None and os.environ.get("CI", "").lower() == "true":
    # .ci/run installs and starts SLURM: under CI a green run must mean these tests ran, so one that cannot
    # fails, saying why. Elsewhere they skip, saying why.
    @pytest.fixture(autouse=True)
    def _slurm_required_under_ci():
        pytest.fail(f"SLURM tests cannot run under CI (CI=true): {_why}", pytrace=False)
pytestmark = [pytest.mark.e2e, pytest.mark.slurm,
              pytest.mark.skipif(_why is not None and os.environ.get("CI", "").lower() != "true", reason=_why or "")]


def _job_state(job: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def _wait(job: str, timeout: float = 420) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        st = _job_state(job)
        if st.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return st
        time.sleep(2)
    subprocess.run(["scancel", job])
    raise AssertionError(f"job {job} did not finish in {timeout}s: {_job_state(job).get('JobState')}")


def _preempt_after_first_checkpoint(job: str, run_dir: Path, signal: list[str] = ("--signal=TERM",)) -> None:
    end = time.time() + 300
    while not (run_dir / "checkpoints" / "latest").exists():
        assert time.time() < end, f"job {job} wrote no checkpoint: {_job_state(job).get('JobState')}"
        time.sleep(1)
    subprocess.run(["scancel", *signal, job], check=True)


def _kill_wait() -> float:
    """SLURM's KillWait: seconds between the SIGTERM that ends a job's tasks and the SIGKILL."""
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True).stdout
    return float(next(l for l in out.splitlines() if l.startswith("KillWait")).split("=")[1].split()[0])


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(l)["step"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def env(env_with_repo):
    return {**env_with_repo, "PYTHON": sys.executable}


def test_submitit_two_machines_preempted_and_requeued_end_as_an_uninterrupted_run(
        fm_test_shards, tmp_path, env):
    cfg = tiny_config(tmp_path, fm_test_shards, train={"total_kimg": 0.48, "checkpoint_every": 10})
    r = run([sys.executable, "launch/submit.py", str(cfg), "--partition", "debug", "--time", "00:15:00",
             "--tasks-per-node", "2", "--logs", str(tmp_path / "logs")], env)
    job = r.stdout.split("submitted job ")[1].split(":")[0]
    _preempt_after_first_checkpoint(job, tmp_path / "run")
    st = _wait(job)
    log = (tmp_path / "logs" / job / f"{job}_0_log.out").read_text()
    assert st["JobState"] == "COMPLETED", log[-3000:]
    assert int(st["Restarts"]) >= 1  # submitit requeued it
    assert "2 process(es)" in log and "resumed from" in log  # 2 machine ranks met over loopback
    steps = _steps(tmp_path / "run")
    assert steps == sorted(set(steps)) and steps[-1] == 30  # the step count went on from the checkpoint
    # The requeue ends every task with SIGTERM, and SLURM kills a task that outlives it after KillWait. The job
    # starts again once all are gone (plus the credential's expiry and a scheduling pass), so a task that waited
    # for the kill would put KillWait between the requeue and the restart.
    stamps = lambda text: [datetime.strptime(l.split("(", 1)[1].split(")", 1)[0], "%Y-%m-%d %H:%M:%S,%f")  # noqa
                           for l in log.splitlines() if l.startswith("submitit ") and text in l]
    requeued, restarted = stamps("Requeued job")[0], stamps("Starting with JobEnvironment")[1]
    assert (restarted - requeued).total_seconds() < _kill_wait(), (requeued, restarted)

    # The same config straight through, 2 processes on one machine: identical final weights.
    ref = tmp_path / "ref"
    data = yaml.safe_load(cfg.read_text())
    data["run"]["dir"] = str(ref)
    (tmp_path / "ref.yaml").write_text(yaml.safe_dump(data))
    run([*launch(2), "train", str(tmp_path / "ref.yaml")], env)
    a, b = weights(tmp_path / "run/checkpoints/step-00000030"), weights(ref / "checkpoints/step-00000030")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ea, eb = (weights(p / "checkpoints/step-00000030", "ema0-unet.safetensors") for p in (tmp_path / "run", ref))
    assert all(torch.equal(ea[k], eb[k]) for k in ea)


def _sbatch(cfg: Path, tmp_path: Path, env: dict, hold: Path) -> str:
    r = subprocess.run(["sbatch", "--parsable", "-o", str(tmp_path / "job-%j.out"), "slurm/train.sbatch"],
                       env={**env, "CONFIG": str(cfg), "DISTGEN_TEST_HOLD": str(hold)}, cwd=REPO,
                       capture_output=True, text=True, check=True)
    return r.stdout.strip().split(";")[0]


def _wait_for_checkpoint(job: str, run_dir: Path, reason: str, timeout: float = 300) -> dict:
    """The meta.json of the first checkpoint seen whose reason is ``reason``."""
    end = time.time() + timeout
    while time.time() < end:
        for cp in ckpt.checkpoint_folders(run_dir / "checkpoints"):
            try:
                meta = ckpt.read_meta(cp)
            except ckpt.CheckpointError:
                continue
            if meta["reason"] == reason:
                return meta
        time.sleep(0.1)
    raise AssertionError(f"job {job} wrote no {reason} checkpoint: {_job_state(job).get('JobState')}")


def test_sbatch_template_trains_and_requeues_itself_after_a_signal(fm_test_shards, tmp_path, env):
    cfg = tiny_config(tmp_path, fm_test_shards, train={"total_kimg": 0.24, "checkpoint_every": 10})
    hold = tmp_path / "hold"
    hold.touch()  # test setting: the run waits after each checkpoint until a signal comes
    job = _sbatch(cfg, tmp_path, env, hold)
    # The run is held after its first checkpoint (step 10 of 30), so the signal provably lands mid-training.
    _wait_for_checkpoint(job, tmp_path / "run", "periodic")
    # What SLURM does before the time limit (--signal=B:USR1@120): USR1 to the batch script only.
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    meta = _wait_for_checkpoint(job, tmp_path / "run", "preempted")
    hold.unlink()  # the requeued job trains through
    st = _wait(job)
    log = (tmp_path / f"job-{job}.out").read_text()
    assert st["JobState"] == "COMPLETED", log[-3000:]
    assert meta["step"] == 11 and "time-limit signal: checkpointing" in log
    assert int(st["Restarts"]) == 1 and "requeueing job" in log and "resumed from" in log
    assert _steps(tmp_path / "run")[-1] == 30
    final = tmp_path / "run" / "checkpoints" / "step-00000030"
    assert json.loads((final / "meta.json").read_text())["reason"] == "end"


def test_sbatch_signal_after_the_final_checkpoint_completes_without_requeue(fm_test_shards, tmp_path, env):
    cfg = tiny_config(tmp_path, fm_test_shards, train={"total_kimg": 0.08, "checkpoint_every": 100})
    hold = tmp_path / "hold"
    hold.touch()
    job = _sbatch(cfg, tmp_path, env, hold)
    # Held after its final checkpoint (step 10): the signal lands while distgen is finishing.
    _wait_for_checkpoint(job, tmp_path / "run", "end")
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    st = _wait(job)
    log = (tmp_path / f"job-{job}.out").read_text()
    assert st["JobState"] == "COMPLETED" and int(st["Restarts"]) == 0, log[-3000:]
    assert "time-limit signal" in log and "the signal came after the final checkpoint; no requeue" in log
    assert "requeueing" not in log
    # The same job submitted again (as a requeue would start it): done at once, saying so.
    again = _sbatch(cfg, tmp_path, env, hold)
    st = _wait(again)
    log = (tmp_path / f"job-{again}.out").read_text()
    assert st["JobState"] == "COMPLETED" and "has already finished; nothing to do" in log, log[-3000:]
    assert "global batch" not in log and [p.name for p in ckpt.checkpoint_folders(tmp_path / "run" / "checkpoints")] \
        == ["step-00000010"]


@pytest.mark.parametrize("args,message", [
    (["missing.yaml", "--partition", "debug", "--time", "00:10:00"], "missing.yaml: no such config file"),
    (["{cfg}", "--partition", "nope", "--time", "00:10:00"], "--partition: no partition 'nope'"),
    (["{cfg}", "--partition", "debug", "--time", "10:75:00"], "--time: '10:75:00' is not a valid time"),
    (["{cfg}", "--partition", "debug", "--time", "1:00:00", "--gpus-per-node", "4"],
     "partition 'debug' has no GPUs"),
    (["{cfg}", "--partition", "debug", "--time", "1:00:00", "train.batch_size=0"], "train.batch_size: must be >= 1"),
])
def test_submit_refuses_bad_requests_before_submitting(fm_test_shards, tmp_path, env, args, message):
    cfg = tiny_config(tmp_path, fm_test_shards)
    before = subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout
    r = subprocess.run([sys.executable, "launch/submit.py", *[a.format(cfg=cfg) for a in args]], env=env, cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout == before


def test_submit_dry_run_prints_the_job(fm_test_shards, tmp_path, env):
    cfg = tiny_config(tmp_path, fm_test_shards)
    r = run([sys.executable, "launch/submit.py", str(cfg), "--nodes", "2", "--partition", "debug", "--time",
             "2-00:00:00", "--procs-per-node", "2", "--dry-run"], env)
    assert "2 node(s) x 1 machine(s) x 2 process(es) = 4 processes" in r.stdout
    assert "time=2880" in r.stdout and "--num_machines 2" in r.stdout

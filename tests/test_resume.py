"""Exact resume, one harness for every family, process count and engine: N steps straight against the same run
stopped part-way (between periodic checkpoints, so the data stream's position is restored too) and resumed to N.
The final checkpoints must be the same bit for bit: weights, EMAs, optimizer and scaler states, the family's own
state (ADA's accumulators, ProGAN's growth, CycleGAN's histories, the EBM's buffers), every rank's RNG states; and
so must every logged record and every post-hoc EMA snapshot. DeepSpeed's ZeRO stages go through the same comparison
in test_deepspeed.py. A resume with another process count (not exact) is tests/test_world_size.py's."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, descendants
from distgen import checkpoint as ckpt
from distgen import phema
from matrix import MODELS, STEPS, STOP, TRAIN, VARIANTS, differences, edm2_off_sphere, \
    launch_matrix, record_differences, records, snapshot_differences, straight_and_resumed
from test_train import launch

pytestmark = pytest.mark.e2e  # the shared runs and real kills (make test-fast leaves these out)

# one process as well: a family of each kind of state, and the new backbones (EDM2 in diffusion-fast;
# the class-conditional DiT in diffusion-flow): each formulation and each backbone once; every pair of them resumes
# with 2 processes (matrix.PAIRS)
ONE_PROCESS = ("diffusion", "gan-dcgan", "cyclegan", "ebm", "glow", "diffusion-fast", "diffusion-flow")
LAST = f"checkpoints/step-{STEPS:08d}"


def _check(root: Path, rec: dict, run: str) -> None:
    assert [c.get("rc") for c in rec["calls"]] == [0, 0, 0], rec["calls"]
    a, b = root / f"{run}-a", root / f"{run}-b"
    assert differences(a / LAST, b / LAST) == []
    assert record_differences(a, b, STOP) == []


@pytest.mark.parametrize("name", [*MODELS, *(v for v in VARIANTS if v != "diffusion-fast")])  # that one: 1 process
def test_two_processes_resume_exactly(trained, name):
    root, results = trained
    _check(root, results[name], name)
    if name == "diffusion-power":
        a, b = root / f"{name}-a", root / f"{name}-b"
        assert len(phema.read_index(a)) == STEPS and snapshot_differences(a, b) == []
    if name == "diffusion-edm":  # the engine renormalised EDM2's stored weights after the last step
        off = edm2_off_sphere(ckpt.load_tensors(root / f"{name}-a" / LAST / "unet.safetensors"))
        assert off < 1e-5


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, matrix_data):
    root = tmp_path_factory.mktemp("resume-1p")
    data = matrix_data
    spec = [straight_and_resumed(root, n, data, STEPS, STOP, TRAIN) for n in ONE_PROCESS]
    return root, launch_matrix(spec, root, 1, "configs/accelerate/ddp.yaml")


@pytest.mark.parametrize("name", ONE_PROCESS)
def test_one_process_resumes_exactly(one_process, name):
    root, results = one_process
    _check(root, results[name], name)
    if name == "diffusion-fast":  # the run was made with both switches on
        train = yaml.safe_load((root / f"{name}-b" / "config.yaml").read_text())["train"]
        assert (train["channels_last"], train["optimizer_impl"]) == (True, "fused")


def _own_copy(root: Path, run: str, run_dir: Path) -> Path:
    """The config of ``run`` (a shared run), training into ``run_dir`` instead."""
    c = yaml.safe_load((root / f"{run}.yaml").read_text())
    c["run"]["dir"] = str(run_dir)
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(c))
    return path


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1"}


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_run_killed_mid_step_resumes_exactly(trained, tmp_path):
    """kill -9 of the whole process tree (the launcher and both ranks) while step 5 or its snapshot runs, after the
    periodic checkpoint at step 4: the resume drops the snapshot taken after it (written by the killed run),
    takes it again, and ends as the uninterrupted run did, bit for bit."""
    root, _ = trained
    run_dir = tmp_path / "run"
    cfg = _own_copy(root, "diffusion-power-a", run_dir)
    cmd = launch(2) + ["train", str(cfg), f"train.max_steps={STEPS}"]
    p = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and p.poll() is None:  # until the snapshot after step 4's checkpoint exists
            if (run_dir / "checkpoints" / "step-00000004").is_dir() and len(phema.read_index(run_dir, False)) >= 5:
                break
            time.sleep(0.02)
        assert p.poll() is None, "the run ended before it could be killed"
        tree = descendants(p.pid)
        assert len(tree) >= 3  # the launcher and two ranks
        for q in tree:
            os.kill(q, signal.SIGKILL)
        p.wait(30)
    finally:
        for q in descendants(p.pid) if p.poll() is None else ():
            os.kill(q, signal.SIGKILL)
    deadline = time.time() + 30
    while any(_alive(q) for q in tree) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(_alive(q) for q in tree), "a process of the killed run survived"
    assert ckpt.read_meta(run_dir / "checkpoints" / "step-00000004")["step"] == 4
    assert not (run_dir / LAST).exists()
    r = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "resumed from" in r.stdout and "(step 4," in r.stdout and "EMA snapshot(s) after" in r.stdout
    straight = root / "diffusion-power-a"
    assert differences(straight / LAST, run_dir / LAST) == []
    assert snapshot_differences(straight, run_dir) == []
    assert [s for s in records(run_dir)] == list(range(1, STEPS + 1))

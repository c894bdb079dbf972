"""Shared fixtures: real Fashion-MNIST shards (Debian's dataset-fashion-mnist), made once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from distgen.data import write_shards
from distgen.data.sources.fashion_mnist import FASHION_MNIST_DIR

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # 2 workers on 2 cores: one thread each, in the worker and in the processes it starts. Two torch thread
        # pools on one core spin against each other and slow small convolutions several times over.
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    if not Path(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz").is_file():
        raise pytest.UsageError(
            f"{FASHION_MNIST_DIR} is missing: install Debian's dataset-fashion-mnist (make test does)"
        )


def made_once(tmp_path_factory, name: str, make) -> Path:
    """A folder ``make(folder)`` fills once per pytest run. Under pytest-xdist (`make test` runs 2 workers, one
    test file to a worker) every worker has its own session, so the first to get here makes it in the run's shared
    temporary folder under a file lock and the others wait for it, then read it (pytest-xdist's own recipe for
    session fixtures). A failed make leaves no folder that passes for made."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        folder = tmp_path_factory.mktemp(name)
        make(folder)
        return folder
    import shutil

    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent  # the run's folder; each worker's basetemp is inside it
    folder, done = shared / name, shared / f"{name}.made"
    with FileLock(str(shared / f"{name}.lock")):
        if not done.is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def fm_test_shards(tmp_path_factory) -> Path:
    """Fashion-MNIST's 10000 test images in 4 shards (3000, 3000, 3000, 1000). Returns the manifest."""
    out = tmp_path_factory.mktemp("fm_test")
    write_shards("fashion-mnist", out, "test", samples_per_shard=3000)
    return out / "test.manifest.json"


@pytest.fixture
def env_with_repo():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture
def env(env_with_repo):
    """env_with_repo with one thread per process: small convolutions slow down tenfold when two threads share
    two busy cores (the score, EBM, FFJORD and PixelRNN tests: solvers, SGLD and recurrences are many small ops)."""
    return {**env_with_repo, "OMP_NUM_THREADS": "1"}


@pytest.fixture
def one_thread():
    """One torch thread in the test process itself, for the same reason (``pytestmark = usefixtures``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def domain_features(tmp_path_factory, fm_test_shards):
    """A tiny domain extractor (`distgen eval fit-features`, ResNet of width 8, 8 kimg) fitted once per session on
    the test split's shards (made for other tests anyway: no shards to write for it), its accuracy and calibration
    taken on 500 images of the train split, which it never sees. Returns (file, stdout)."""
    import itertools
    import subprocess
    import sys

    import numpy as np

    from distgen.data.sources import open_source

    def make(root: Path) -> None:
        items = list(itertools.islice(open_source("fashion-mnist", "train").items(), 500))
        np.savez(root / "held-out.npz", x=np.stack([i[0] for i in items]), y=np.array([i[1] for i in items]))
        write_shards(f"npz:{root / 'held-out.npz'}", root / "held-out", "test", samples_per_shard=250)
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        r = subprocess.run([sys.executable, "-m", "distgen", "eval", "fit-features", str(fm_test_shards),
                            str(root / "fm-features.safetensors"), "--kimg", "8", "--lr", "5e-3", "--width", "8",
                            "--calibration-images", "500", "--test", str(root / "held-out" / "test.manifest.json")],
                           env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        (root / "stdout.txt").write_text(r.stdout)

    root = made_once(tmp_path_factory, "domain", make)
    return root / "fm-features.safetensors", (root / "stdout.txt").read_text()


@pytest.fixture(scope="session")
def matrix_data(tmp_path_factory, fm_test_shards) -> dict:
    """The data sections the matrices' families train on (tests/matrix.data_sets): the edges and class-domain
    shards and the tiny autoencoder, made once per pytest run (about 10 s each time) and shared by every matrix."""
    from matrix import data_sets

    return data_sets(made_once(tmp_path_factory, "matrix-data", lambda root: data_sets(root, fm_test_shards)),
                     fm_test_shards)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, matrix_data):
    """Every family of tests/matrix.py MODELS (and VARIANTS) trained with 2 processes (DDP) in one launch,
    each twice: 6 steps
    straight (``<name>-a``) and 3 steps then a resume to 6 (``<name>-b``). Made once per pytest run: the exact-
    resume harness (test_resume.py) compares them, and the families' tests sample, export and evaluate their
    ``-a`` run folders. Returns (root, {name: the launch's record})."""
    from matrix import MODELS, STEPS, STOP, TRAIN, VARIANTS, launch_matrix, read_matrix, straight_and_resumed

    def make(root: Path) -> None:
        data = matrix_data
        spec = [straight_and_resumed(root, n, data, STEPS, STOP, TRAIN) for n in [*MODELS, *VARIANTS]
                if n != "diffusion-fast"]
        launch_matrix(spec, root, 2, "configs/accelerate/ddp.yaml")

    root = made_once(tmp_path_factory, "trained", make)
    return root, read_matrix(root)


def descendants(pid: int) -> set[int]:
    """``pid`` and every process below it (torch's launcher starts each rank in a session of its own, so a process
    group does not hold them all)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [pid]
    while todo:
        q = todo.pop()
        out.add(q)
        todo += children.get(q, [])
    return out

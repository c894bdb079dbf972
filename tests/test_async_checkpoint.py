"""Checkpoints written in the background (train.async_checkpoint, distgen/async_save.py), as users meet them: the
same bits as synchronous saves (1 and 2 processes) with the loop held for less than the write; a kill -9 during a
background write leaves the previous checkpoint the newest that loads, and the resumed run ends as the straight one;
a signal during a write waits for it; a write that fails (a real file-size limit) stops the run at the next save,
naming the folder; DeepSpeed refuses the option at start. With sharded checkpoints (every rank writes its DCP shards
in the background) in one 2-process FSDP2 launch on a slowed disk: the same tensors as foreground sharded saves with
the loop held for less than half the write, and a kill -9 of every process of a launch during a write that leaves
the previous checkpoint the newest and a resume that ends as the straight run.

A background write has to be seen under way from outside. The same-bits and kill tests use a model whose checkpoint
takes a while to write: the MLP GAN at its paper size on 48x48 images (8.5M parameters: weights, Adam's two moments
and 4 EMAs of the generator make ~170 MB, each file flushed to disk; ~0.3 s to write here, longer than a step) and
see the write when one of rank 0's files appears in the temporary folder (the main thread writes only the RNG files
there). The signal test needs the write to outlast the next step whatever the machine's load: every fsync of the
run is held 0.1 s by strace, as a slow disk would."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from conftest import REPO, descendants
from distgen import checkpoint as ckpt
from distgen.dist import free_port
from matrix import ACCEL, differences, launch_matrix, records
from test_train import run

pytestmark = pytest.mark.e2e  # trains, launches and kills processes

STEPS, EVERY = 6, 2
STRAIGHT = f"checkpoints/step-{STEPS:08d}"


def big_config(folder: Path, manifest: Path, async_checkpoint: bool, steps: int = STEPS, **model) -> Path:
    """A config whose checkpoints take a while to write (the module's docstring), training into ``folder/run``."""
    cfg = {"run": {"dir": str(folder / "run"), "seed": 1, "trackers": []},
           "data": {"train": [str(manifest)], "resolution": 48, "channels": 1, "resize": "stretch", "workers": 0,
                    "shuffle_buffer": 50},
           "model": {"family": "gan", "arch": "mlp", "preset": "paper", **model},
           "train": {"batch_size": 4, "total_kimg": steps * 4 / 1000, "log_every": 1, "checkpoint_every": EVERY,
                     "keep_checkpoints": 10, "sample_every": 0, "sample_num": 1, "async_checkpoint": async_checkpoint},
           "ema": {"halflife_kimg": [0.05, 0.1, 0.2, 0.4], "rampup": None}}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1"}


def _background_write_seen(folders: list[Path]) -> bool:
    """Has rank 0's background write started filling one of ``folders``? (Its files are all but the ranks' RNG
    files.)"""
    for folder in folders:
        try:
            if any(not n.startswith("rng-") for n in os.listdir(folder)):
                return True
        except OSError:
            pass
    return False


def _slow_fsync(cmd: list[str], delay_s: float) -> list[str]:
    """``cmd`` under strace, each of its fsync calls held ``delay_s`` before the kernel runs it: a slow disk, with
    nothing of distgen's changed. Without strace the test is skipped, saying so (under CI, `.ci/run` installs it,
    and the test fails instead)."""
    strace = shutil.which("strace")
    if strace is None:
        why = "strace is not installed (apt-get install strace): the test slows the run's fsync calls with it"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return [strace, "-f", "--seccomp-bpf", "-qq", "-o", os.devnull, "-e", "trace=fsync",
            "-e", f"inject=fsync:delay_enter={int(delay_s * 1e6)}", *cmd]


def _start_and_catch_write(cmd: list[str], folders: list[Path], **popen) -> subprocess.Popen:
    """``cmd`` (a `distgen train`) in a fresh process of its own session, returned as soon as the background write
    into one of ``folders`` is seen (polled every 2 ms)."""
    p = subprocess.Popen(cmd, env=_env(), cwd=REPO, start_new_session=True, **popen)
    deadline = time.time() + 120
    while not _background_write_seen(folders):
        if p.poll() is not None or time.time() > deadline:
            p.kill()
            out = p.communicate()[0] if popen.get("stdout") == subprocess.PIPE else ""
            pytest.fail(f"the write into {folders[0]} was not seen under way (exit {p.returncode}): "
                        f"{str(out)[-2000:]}")
        time.sleep(0.002)
    return p


def _train_cmd(cfg: Path) -> list[str]:
    return [sys.executable, "-m", "distgen", "train", str(cfg)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, fm_test_shards):
    """The big config trained 6 steps (checkpoints at 2, 4, 6) in this process, with synchronous and with
    asynchronous saves. Returns {"sync" | "async": (run folder, stdout)}."""
    root = tmp_path_factory.mktemp("async-straight")
    out = {}
    for mode in ("sync", "async"):
        cfg = big_config(root / mode, fm_test_shards, mode == "async")
        out[mode] = (root / mode / "run", run([sys.executable, "-m", "distgen", "train", str(cfg)], _env()).stdout)
    return out


def test_background_saves_write_the_same_bits_and_hold_the_loop_less_than_the_write(straight):
    (sync, _), (bg, said) = straight["sync"], straight["async"]
    assert "checkpoints in the background" in said and "checkpoints synchronous" in straight["sync"][1]
    for step in range(EVERY, STEPS + 1, EVERY):  # the periodic ones (written in the background) and the final one
        name = f"step-{step:08d}"
        assert differences(sync / "checkpoints" / name, bg / "checkpoints" / name) == [], name
    assert (bg / "checkpoints" / "latest").read_text().strip() == f"step-{STEPS:08d}"
    assert not list((bg / "checkpoints").glob(".tmp-*"))
    for run_dir in (sync, bg):  # a record after each periodic save says how long it held the loop
        rec = records(run_dir)
        assert [s for s in rec if "checkpoint_blocked_s" in rec[s]] == [3, 5], run_dir
    rs, ra = records(sync), records(bg)
    # synchronous: the save held the loop for its whole write (the write is timed inside the save)
    assert rs[3]["checkpoint_blocked_s"] >= rs[3]["checkpoint_write_s"] > 0
    # in the background: the first save (nothing in flight before it) held the loop for the copy to host memory and
    # the RNG files; its write, timed in the thread, does more with the same bytes (serialises them, copies them into
    # the page cache and flushes every file) and ended before the next save (which waits for it) at the latest
    write = next(ra[s]["checkpoint_write_s"] for s in (3, 4, 5) if "checkpoint_write_s" in ra[s])
    assert ra[3]["checkpoint_blocked_s"] < write


def test_a_kill_during_a_background_write_leaves_the_previous_checkpoint_and_resumes_exactly(
        straight, tmp_path, fm_test_shards):
    """kill -9 as soon as the background write of step 4 is seen: step 2 stays the newest checkpoint that loads, the
    cut folder is never taken for one, and the resumed run removes it and ends as the straight run, bit for bit."""
    cfg = big_config(tmp_path, fm_test_shards, True)
    root = tmp_path / "run" / "checkpoints"
    cut = ckpt.tmp_dir(root, 4)
    # (watched under its final name too: a write that went there directly would be caught under way as well)
    p = _start_and_catch_write(_train_cmd(cfg), [cut, ckpt.step_dir(root, 4)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(30)
    assert [f.name for f in ckpt.checkpoint_folders(root)] == ["step-00000002"]  # no step-4, complete or not
    assert cut.is_dir() and not (cut / "meta.json").exists()  # killed mid-write (meta.json is its last file)
    newest, meta = ckpt.load_newest(root, lambda f: ckpt.read_meta(f, ckpt.RESUME_KEYS))
    assert newest == root / "step-00000002" and meta["reason"] == "periodic"

    r = run([sys.executable, "-m", "distgen", "train", str(cfg)], _env())
    assert f"resumed from {root / 'step-00000002'} (step 2," in r.stdout and f"done at step {STEPS}" in r.stdout
    assert "does not load" not in r.stdout and not list(root.glob("*.damaged*"))
    assert not list(root.glob(".tmp-*"))  # the cut folder removed as distgen's own
    assert differences(straight["sync"][0] / STRAIGHT, tmp_path / "run" / STRAIGHT) == []


def test_a_signal_during_a_background_write_waits_for_it(tmp_path, fm_test_shards):
    """SIGTERM as soon as the background write of step 2 is seen, every fsync of the run held 0.1 s (a slow disk:
    the write, ~13 of them, lasts well past the next step, which has none): the step ends, the signal's save waits
    for the write (saying so), writes its own checkpoint, and the process exits 75 with both complete."""
    cfg = big_config(tmp_path, fm_test_shards, True, steps=40, preset="tiny")
    root = tmp_path / "run" / "checkpoints"
    p = _start_and_catch_write(_slow_fsync(_train_cmd(cfg), 0.1), [ckpt.tmp_dir(root, 2)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    trainer = int(Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()[0])  # strace's one child
    os.kill(trainer, signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 75, out[-2000:] + err[-3000:]
    assert [f.name for f in ckpt.complete_checkpoints(root)] == ["step-00000002", "step-00000003"]
    assert f"waiting for the checkpoint write in flight ({root / 'step-00000002'})" in out
    periodic, preempted = ckpt.complete_checkpoints(root)
    assert periodic.name == "step-00000002" and ckpt.read_meta(periodic, ckpt.RESUME_KEYS)["reason"] == "periodic"
    meta = ckpt.read_meta(preempted, ckpt.RESUME_KEYS)
    assert meta["reason"] == "preempted" and f"checkpoint {preempted} written at step {meta['step']}" in out
    assert sorted(f.name for f in periodic.iterdir()) == sorted(f.name for f in preempted.iterdir())
    assert (root / "latest").read_text().strip() == preempted.name and not list(root.glob(".tmp-*"))


@contextmanager
def _file_size_limit(limit: int):
    """No file this process writes may grow past ``limit`` bytes (RLIMIT_FSIZE's soft limit, put back after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_failed_background_write_stops_the_run_at_the_next_save_naming_the_folder(tmp_path, fm_test_shards):
    """A real limit: no file may grow past 64 KiB (RLIMIT_FSIZE; Python ignores SIGXFSZ, so a write past it fails
    with EFBIG, as on a full disk). The tiny MLP GAN's weights (~2 MB) cannot be written; every other file of the run
    (RNG states, metrics.jsonl, config.yaml) stays below it. The step-2 write fails in the background; the loop goes
    on to step 4, whose save raises it on the way in."""
    cfg = big_config(tmp_path, fm_test_shards, True, preset="tiny")
    with _file_size_limit(64 * 1024):
        r = run(_train_cmd(cfg), _env(), check=False)  # in this process: the limit is put back after
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    root = tmp_path / "run" / "checkpoints"
    error = [line for line in r.stderr.splitlines() if line.startswith("distgen: error:")]
    assert len(error) == 1 and error[0].startswith(
        f"distgen: error: {root / 'step-00000002'}: not written: its write in the background "
        f"(train.async_checkpoint) failed: OSError: [Errno 27] File too large: '{ckpt.tmp_dir(root, 2)}/"), error
    assert sorted(records(tmp_path / "run")) == [1, 2, 3, 4]  # trained on after the failed save, stopped at the next
    assert not ckpt.checkpoint_folders(root) and not list(root.glob(".tmp-*"))  # nothing half-written left
    assert json.loads((tmp_path / "run" / "last-error.json").read_text())["type"] == "TrainingError"


def test_two_processes_write_the_same_bits_in_the_background(tmp_path, fm_test_shards):
    """2 processes (gloo), one launch: every rank writes its own files at the save, rank 0 the rest in the
    background, and the ranks agree at each save; synchronous against background saves of the module's model, 3
    steps (a periodic checkpoint at 2, written in the background while step 3 trains; the final one at 3)."""
    spec = [{"name": mode, "calls": [{"config": str(big_config(tmp_path / mode, fm_test_shards, mode == "async")),
                                      "overrides": ["train.max_steps=3"]}]} for mode in ("sync", "async")]
    results = launch_matrix(spec, tmp_path, 2, "configs/accelerate/ddp.yaml", timeout=300)
    assert [c.get("rc") for m in ("sync", "async") for c in results[m]["calls"]] == [0, 0], results
    for step in (2, 3):
        name = f"run/checkpoints/step-{step:08d}"
        assert sorted(p.name for p in (tmp_path / "async" / name).iterdir() if p.name.startswith("rng-")) == [
            "rng-0.json", "rng-0.safetensors", "rng-1.json", "rng-1.safetensors"]
        assert differences(tmp_path / "sync" / name, tmp_path / "async" / name) == [], name


@pytest.mark.parametrize("option, why", [
    ("train.async_checkpoint=true", "train.async_checkpoint: DeepSpeed writes its partitioned states itself"),
    ("train.checkpoint_format=sharded", "train.checkpoint_format=sharded: DeepSpeed writes its own partitioned states")],
    ids=["async", "sharded"])
def test_deepspeed_refuses_background_saves_and_sharded_checkpoints_at_start_by_name(tmp_path, fm_test_shards, option,
                                                                                   why):
    """`accelerate launch` with a DeepSpeed config tells the engine so (ACCELERATE_USE_DEEPSPEED); the option is
    refused before any Accelerator, network or run folder exists."""
    cfg = big_config(tmp_path, fm_test_shards, False, preset="tiny")
    r = run(_train_cmd(cfg) + [option], {**_env(), "ACCELERATE_USE_DEEPSPEED": "true"}, check=False)
    assert r.returncode == 2
    assert r.stderr.startswith(f"distgen: error: {why}"), r.stderr[-3000:]
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- sharded checkpoints in the background
FSDP2 = "configs/accelerate/fsdp2.yaml"
SHARDED_STEPS = 6
SHARDED_LAST = f"checkpoints/step-{SHARDED_STEPS:08d}"


def _sharded_config(folder: Path, manifest: Path, async_checkpoint: bool) -> Path:
    """The module's model at its tiny size (GAN: G and D trained, each written as DCP shards), 6 steps of 2
    processes, a checkpoint every 2 with train.checkpoint_format sharded."""
    path = big_config(folder, manifest, async_checkpoint, preset="tiny")
    cfg = yaml.safe_load(path.read_text())
    cfg["train"].update(checkpoint_format="sharded", total_kimg=SHARDED_STEPS * 8 / 1000)  # a global batch of 8
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, fm_test_shards):
    """2 processes under FSDP2 (gloo), every fsync held 0.1 s (a slow disk: the background write outlasts a step).
    First a run killed (-9, every process of the launch) as soon as the background write of step 4 is seen; then one
    launch that trains the module's tiny model with sharded checkpoints in the foreground and in the background, and
    resumes the killed run. Returns (root, the killed run's checkpoints as the kill left them, results)."""
    root = tmp_path_factory.mktemp("async-sharded")
    slow = _slow_fsync([], 0.1)
    cfg = _sharded_config(root / "killed", fm_test_shards, True)
    ckpts = root / "killed" / "run" / "checkpoints"
    launch = [*ACCEL, "--config_file", FSDP2, "--num_processes", "2", "--main_process_port", str(free_port()),
              "-m", "distgen", "train", str(cfg)]
    for _ in range(3):
        p = _start_and_catch_write(slow + launch, [ckpt.tmp_dir(ckpts, 4), ckpt.step_dir(ckpts, 4)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for pid in descendants(p.pid):
            os.kill(pid, signal.SIGKILL)
        p.wait(30)
        if ckpt.tmp_dir(ckpts, 4).is_dir():
            break
        # The 2 s write was over (renamed) before the kill landed: this process was not scheduled in time on a
        # loaded machine. Not the case under test: start the run again.
        shutil.rmtree(root / "killed" / "run")
    else:
        pytest.fail("three kills in a row came after the background write of step 4 had ended")
    left = {"folders": [f.name for f in ckpt.checkpoint_folders(ckpts)],
            "cut": sorted(f.name for f in ckpt.tmp_dir(ckpts, 4).iterdir())}
    spec = [{"name": mode, "calls": [{"config": str(_sharded_config(root / mode, fm_test_shards, mode == "bg"))}]}
            for mode in ("fg", "bg")] + [{"name": "killed", "calls": [{"config": str(cfg)}]}]
    return root, left, launch_matrix(spec, root, 2, FSDP2, timeout=600, prefix=tuple(slow))


def test_sharded_background_saves_write_the_same_tensors_and_hold_the_loop_less_than_the_write(sharded):
    """Every rank copies its shards at the save and writes them in its writer thread; rank 0 renames the folder once
    all are flushed. The same tensors as foreground sharded saves (DCP's files read whole), every rank's shards in
    each DCP folder, and the loop held at the step-2 save for less than half its write and than the foreground
    save's hold. (The foreground run, first in the launch, imported DCP in these processes: the background run's
    first save does not pay for it; each write lasts past the next save here, which waits for it.)"""
    root, _, results = sharded
    assert [c.get("rc") for m in ("fg", "bg") for c in results[m]["calls"]] == [0, 0], results
    fg, bg = root / "fg" / "run", root / "bg" / "run"
    for step in range(EVERY, SHARDED_STEPS + 1, EVERY):
        name = f"checkpoints/step-{step:08d}"
        assert sorted(p.name for p in ckpt.sharded_optimizer_dir(bg / name, "G").iterdir()) == [
            ".metadata", "__0_0.distcp", "__1_0.distcp"]
        assert differences(fg / name, bg / name) == [], name
    assert not list((bg / "checkpoints").glob(".tmp-*"))
    rf, ra = records(fg), records(bg)
    assert rf[3]["checkpoint_blocked_s"] >= rf[3]["checkpoint_write_s"] > 0  # foreground: held for the whole write
    # the step-2 write ended by the save at 4 (which waits for it): reported in a record from 3 to 5
    write = next(ra[s]["checkpoint_write_s"] for s in (3, 4, 5) if "checkpoint_write_s" in ra[s])
    print(f"sharded, step 2: held {ra[3]['checkpoint_blocked_s']:.3f} s in the background, written in {write:.3f} s; "
          f"held {rf[3]['checkpoint_blocked_s']:.3f} s in the foreground")
    # held: 2 slowed fsyncs a rank (its RNG files); the write: ~20 (8 of DCP's on rank 0, its EMAs, meta.json, the
    # folders): under half of it, where shards written at the save (distgen before) hold the loop about as long
    assert ra[3]["checkpoint_blocked_s"] < min(write / 2, rf[3]["checkpoint_blocked_s"])


def test_a_kill_during_a_background_sharded_write_leaves_the_previous_checkpoint_and_resumes_exactly(sharded):
    """kill -9 of the launcher and both ranks during the background write of step 4: step 2 stays the newest
    checkpoint, the cut folder is never taken for one, and the resumed run ends as the straight foreground one."""
    root, left, results = sharded
    assert left["folders"] == ["step-00000002"] and "meta.json" not in left["cut"], left
    assert [c.get("rc") for c in results["killed"]["calls"]] == [0], results["killed"]
    ckpts = root / "killed" / "run" / "checkpoints"
    assert f"resumed from {ckpts / 'step-00000002'} (step 2," in (root / "launch.out").read_text()
    assert not list(ckpts.glob("*.damaged*")) and not list(ckpts.glob(".tmp-*"))
    assert differences(root / "fg" / "run" / SHARDED_LAST, root / "killed" / "run" / SHARDED_LAST) == []

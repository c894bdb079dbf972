"""Files distgen reads back are untrusted (issue: run folders, indexes, configs, exports): each numbered case of
the probe that found them, and their siblings. Nothing outside distgen's folders is deleted or written, nothing
hangs or grows without bound, and every refusal names the file and field."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
import yaml

from conftest import REPO
from test_train import run as distgen_run  # in this process: no 7 s of imports per call
from distgen import phema
from distgen.cli import main as cli
from distgen.config import ConfigError, load_config
from distgen.errors import SampleError

CONFIG = str(REPO / "configs" / "fashion_mnist_dcgan.yaml")


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _as_from_a_terminal() -> None:
    """preexec_fn: SIGINT at its default, as in a shell. (A library in the test process may have set it to be
    ignored, and an ignored SIGINT is inherited: the child's Ctrl-C would then do nothing.)"""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _limited(mem_bytes: int):
    """preexec_fn: a child process that may use at most ``mem_bytes`` of address space."""
    return lambda: resource.setrlimit(resource.RLIMIT_AS, (mem_bytes, mem_bytes))


# ----------------------------------------------------------------------------- configs (YAML)
BOMB = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))


def test_a_billion_laughs_config_is_refused_in_bounded_time_and_memory(tmp_path):
    """Case 3: 485 bytes of nested aliases grew `train --dry-run` to 22.8 GB; now refused before expanding."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    assert len(BOMB) < 600
    r = subprocess.run([sys.executable, "-m", "distgen", "train", str(bomb), "train.lr=0.1", "--dry-run"],
                       env=_env(), capture_output=True, text=True, timeout=60, preexec_fn=_limited(1 << 30))
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.startswith(f"distgen: error: {bomb}: ") and "alias" in r.stderr


@pytest.mark.parametrize("text, why", [
    ("a: " + "[" * 20000 + "]" * 20000 + "\n", "nested more than"),  # stopped while scanning, not by recursion
    ("a: " + "[" * 100 + "]" * 100 + "\n", "nested more than"),  # within the parser's reach, past the limit
    ("".join(" " * i + f"k{i}:\n" for i in range(1000)), "nested more than"),  # block indentation, 0.5 MB
    ("train:\n  lr: 0.1\n  lr: 0.2\n", "line 3: the key 'lr' is given twice"),
    ("a: &x [*x]\n", "refers to a value that holds it"),
    ("train:\n  batch_size: " + "9" * 5000 + "\n", "Exceeds the limit"),
])
def test_configs_python_or_yaml_would_choke_on_are_refused_by_name(tmp_path, text, why):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value).startswith(f"{p}: ") and why in str(e.value), e.value


def test_huge_integer_overrides_are_refused_by_name():
    with pytest.raises(ConfigError, match=r"^train.batch_size: '9999.*\.\.\. \(5000 characters\) is out of range"):
        load_config(None, ["train.batch_size=" + "9" * 5000])
    with pytest.raises(ConfigError, match=r"^train.batch_size: 10{30} is out of range"):
        load_config(None, ["train.batch_size=1" + "0" * 30])


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("base: &b {batch_size: 4, lr: 0.1}\ntrain:\n  <<: *b\n  lr: 0.2\n")
    data = __import__("distgen.config.core", fromlist=["load_yaml"]).load_yaml(p)
    assert data["train"] == {"batch_size": 4, "lr": 0.2}


@pytest.mark.parametrize("name", ["..", ".", "a/b", "../x", "/abs", "x\ny", ""])
def test_run_names_that_are_not_one_folder_name_are_refused(name):
    """Case 4: run.name=.. trained into the current folder, overwriting what was there."""
    with pytest.raises(ConfigError, match=r"^run.name: "):
        load_config(None, [f"run.name={name}"])


# ----------------------------------------------------------------------------- EMA snapshot index
def _index(run: Path, entries: list[dict]) -> Path:
    folder = run / phema.SNAPSHOT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / phema.INDEX).write_text(json.dumps({"snapshots": entries}))
    return folder / phema.INDEX


def _entry(nimg: int, **over) -> dict:
    return {"file": phema.snapshot_name(nimg), "step": nimg // 8, "nimg": nimg, "stds": [0.05, 0.1], "size": 3,
            "sha256": "0" * 64, **over}


@pytest.mark.parametrize("bad", ["/ABS", "../../victim.txt", "../victim.txt", "ema-000000000200.safetensors",
                                 "index.json"])
def test_a_crafted_index_entry_deletes_nothing(tmp_path, bad):
    """Case 1: a resume deleted every index entry newer than its checkpoint, whatever the entry named."""
    victim = tmp_path / "victim.txt"
    victim.write_text("thesis")
    run = tmp_path / "deep" / "run"
    bad = bad.replace("/ABS", str(victim))
    idx = _index(run, [_entry(100), _entry(300, file=bad)])
    (idx.parent / phema.snapshot_name(100)).write_bytes(b"abc")
    before = _tree(tmp_path)
    with pytest.raises(SampleError) as e:
        phema.drop_snapshots_after(run, 100)
    assert str(e.value).startswith(f"{idx}: snapshots[1]") and "file" in str(e.value), e.value
    assert _tree(tmp_path) == before


def test_an_index_entry_that_is_a_link_out_of_the_folder_is_removed_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("thesis")
    run = tmp_path / "run"
    idx = _index(run, [_entry(100), _entry(300)])
    (idx.parent / phema.snapshot_name(300)).symlink_to(victim)
    assert phema.drop_snapshots_after(run, 100) == 1
    assert victim.read_text() == "thesis" and not (idx.parent / phema.snapshot_name(300)).is_symlink()
    # a listed snapshot that is a link leading out is refused when read
    idx = _index(run, [_entry(100)])
    (idx.parent / phema.snapshot_name(100)).symlink_to(victim)
    with pytest.raises(SampleError, match="a link that leads out of"):
        phema.check_snapshots(run, phema.read_index(run))


@pytest.mark.parametrize("entry, field", [
    ({"nimg": -5}, "nimg"), ({"nimg": "100"}, "nimg"), ({"stds": [float("nan")]}, "stds[0]"),
    ({"size": 10 ** 30}, "size"), ({"sha256": "x"}, "sha256"), ({"stds": []}, "stds"), ({"step": True}, "step"),
])
def test_index_numbers_are_typed_and_bounded(tmp_path, entry, field):
    idx = _index(tmp_path, [{**_entry(100), **entry}])
    with pytest.raises(SampleError) as e:
        phema.read_index(tmp_path)
    assert str(e.value).startswith(f"{idx}: snapshots[0].{field}: "), e.value


# ----------------------------------------------------------------------------- export / ema outputs
@pytest.mark.parametrize("command", [["export", "{run}", "{out}", "--force"],
                                     ["ema", "{run}", "--sigma-rel", "0.05", "--out", "{out}", "--force"]])
@pytest.mark.parametrize("marker", ["distgen.json", "posthoc.json"])
def test_force_replaces_only_a_folder_whose_marker_reads_as_distgens(tmp_path, capsys, command, marker):
    """Case 6: `export DIR --force` emptied DIR when it held any file named distgen.json."""
    run, out = tmp_path / "run", tmp_path / "thesis"
    (run / "checkpoints").mkdir(parents=True)
    (out / "src").mkdir(parents=True)
    (out / marker).write_text('{"my": "settings"}')
    (out / "src" / "main.py").write_text("print('mine')")
    (out / "thesis.tex").write_text("\\documentclass{article}")
    before = _tree(tmp_path)
    assert cli([a.format(run=run, out=out) for a in command]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"distgen: error: {out}: "), err
    assert _tree(tmp_path) == before


# ----------------------------------------------------------------------------- run folders
def _tiny(tmp_path: Path, manifest: Path, run_dir: Path, **train) -> Path:
    from test_train import tiny_config

    cfg = tiny_config(tmp_path, manifest, train={"checkpoint_every": 2, "log_every": 2, **train})
    c = yaml.safe_load(cfg.read_text())
    c["run"]["dir"] = str(run_dir)
    cfg.write_text(yaml.safe_dump(c))
    return cfg


@pytest.mark.e2e
def test_train_refuses_a_folder_it_did_not_make(tmp_path, fm_test_shards):
    """Case 5: run.dir= an existing folder lost its config.yaml and metrics.jsonl records without a word."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my: experiment\n")
    (mine / "metrics.jsonl").write_text('{"step": 1, "mine": true}\n')
    (mine / "distgen-run.json").write_text('{"format": "something else"}')  # a marker's name is not proof
    before = _tree(tmp_path)
    cfg = _tiny(tmp_path / "cfg", fm_test_shards, mine)
    after_cfg = _tree(tmp_path)
    r = distgen_run([sys.executable, "-m", "distgen", "train", str(cfg)], _env(), check=False)
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].startswith(f"distgen: error: run.dir {mine}: a folder of other files")
    assert {k: v for k, v in _tree(tmp_path).items() if not k.startswith("cfg")} == before
    assert _tree(tmp_path) == after_cfg


@pytest.mark.e2e
def test_one_trainer_per_run_folder_and_a_killed_ones_lock_is_taken_over(tmp_path, fm_test_shards):
    """Case 5: two trainers on one run folder interleaved their checkpoints. The second is refused, told who
    holds the folder; after the holder is killed (SIGKILL: no clean-up runs) the next trainer takes over."""
    run_dir = tmp_path / "run"
    cfg = _tiny(tmp_path, fm_test_shards, run_dir, total_kimg=0.064)  # 8 steps
    hold = tmp_path / "hold"
    hold.touch()
    first = subprocess.Popen([sys.executable, "-m", "distgen", "train", str(cfg)], env={**_env(), "DISTGEN_TEST_HOLD":
                             str(hold)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        for line in first.stdout:  # held after its first periodic checkpoint, the lock taken
            if "holding after the periodic checkpoint" in line:
                break
        r = distgen_run([sys.executable, "-m", "distgen", "train", str(cfg)], _env(), check=False)
        assert r.returncode == 2, r.stderr[-3000:]
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith(f"distgen: error: run.dir {run_dir}: another distgen train is training in it "
                               f"(pid {first.pid} on "), last
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    r = distgen_run([sys.executable, "-m", "distgen", "train", str(cfg)], _env(), check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "resumed from" in r.stdout and "done at step 8" in r.stdout


@pytest.mark.e2e
def test_a_name_too_long_is_reported_with_the_path_and_what_to_do(tmp_path, fm_test_shards):
    run_dir = tmp_path / ("x" * 300) / "run"
    cfg = _tiny(tmp_path, fm_test_shards, run_dir)
    r = distgen_run([sys.executable, "-m", "distgen", "train", str(cfg)], _env(), check=False)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"distgen: error: run.dir {run_dir}: cannot be written (") and "shorter name" in last, last


# ----------------------------------------------------------------------------- signals
def _stuck_on_its_data(tmp_path: Path, fm_test_shards: Path, env: Optional[dict] = None) -> subprocess.Popen:
    """A fresh `distgen train` in a session of its own, returned once its first step waits for data that never
    comes (a pipe whose command sleeps); stdout and stderr together in its stdout."""
    cfg = _tiny(tmp_path, fm_test_shards, tmp_path / "run")
    c = yaml.safe_load(cfg.read_text())
    reading = tmp_path / "reading"  # made by the pipe's command: the first step is waiting for its data
    c["data"].update(train=[f"pipe:touch {reading} && sleep 120"], workers=0)
    cfg.write_text(yaml.safe_dump(c))
    p = subprocess.Popen([sys.executable, "-m", "distgen", "train", str(cfg)], env={**_env(), **(env or {})},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not reading.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    return p


def _kill_session(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)  # the pipe's sleep, orphaned by the exit
    except ProcessLookupError:
        pass


@pytest.mark.parametrize("how", ["watchdog", "duplicate", "second-signal"])
@pytest.mark.e2e
def test_a_signal_ends_a_run_whose_step_never_comes(tmp_path, fm_test_shards, how):
    """A step stuck on its data (a pipe that never delivers) still ends within the grace period, or at once on a
    second signal, with the requeue status; without them it would wait for good. A copy of the first signal
    (SLURM and torch's launcher both deliver it, within milliseconds) is not a second one."""
    from distgen.preemption import DUPLICATE_S

    grace = 30 if how == "second-signal" else 3
    p = _stuck_on_its_data(tmp_path, fm_test_shards, {"DISTGEN_SIGNAL_GRACE": str(grace)})
    try:
        t0 = time.time()
        p.send_signal(signal.SIGTERM)
        if how != "watchdog":
            time.sleep(0.1 if how == "duplicate" else DUPLICATE_S + 0.5)
            p.send_signal(signal.SIGTERM)
        rc = p.wait(60)
        took = time.time() - t0
        out = p.stdout.read()
    finally:
        _kill_session(p)
    assert rc == 75, out[-2000:]
    if how == "second-signal":
        assert "a second signal (SIGTERM)" in out and took < DUPLICATE_S + 3, (took, out[-1000:])
    else:  # the watchdog's exit, the duplicate ignored
        assert "no checkpoint within 3 s of the signal" in out and 2.5 < took < 20, (took, out[-1000:])
        assert "second signal" not in out
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


@pytest.mark.e2e
def test_a_native_crash_prints_every_threads_python_stack(tmp_path, fm_test_shards):
    """A crash below Python (an abort in a collective's library, a kernel's segfault) leaves the job's log the
    stack of each thread, naming where the loop was, rather than only the launcher's exit code."""
    p = _stuck_on_its_data(tmp_path, fm_test_shards)
    try:
        p.send_signal(signal.SIGABRT)  # what glibc raises on a corrupted heap
        rc = p.wait(60)
        out = p.stdout.read()
    finally:
        _kill_session(p)
    assert rc == -signal.SIGABRT, out[-2000:]
    assert "Fatal Python error: Aborted" in out, out[-2000:]
    stack = out.split("Fatal Python error: Aborted", 1)[1]
    assert "Current thread" in stack and 'distgen/train.py", line' in stack, stack[-3000:]


@pytest.mark.e2e
def test_ctrl_c_during_training_ends_with_one_line_and_130(tmp_path, fm_test_shards):
    run_dir = tmp_path / "run"
    cfg = _tiny(tmp_path, fm_test_shards, run_dir)
    hold = tmp_path / "hold"
    hold.touch()
    p = subprocess.Popen([sys.executable, "-m", "distgen", "train", str(cfg)], env={**_env(), "DISTGEN_TEST_HOLD":
                         str(hold), "PYTHONFAULTHANDLER": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=_as_from_a_terminal)
    for line in p.stdout:
        if "holding after the periodic checkpoint" in line:
            break
    p.send_signal(signal.SIGINT)
    try:
        _, err = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # where it hangs: faulthandler prints every thread's stack on SIGABRT
        p.send_signal(signal.SIGABRT)
        pytest.fail("train did not end within 60 s of SIGINT; its threads:\n" + p.communicate(timeout=60)[1][-8000:])
    assert p.returncode == 130, err[-3000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("distgen: interrupted (SIGINT): train")
    ckpts = run_dir / "checkpoints"
    assert [q.name for q in ckpts.iterdir() if q.name.startswith(".")] == []  # no temporary folder left
    assert (ckpts / "step-00000002" / "meta.json").is_file()  # the finished checkpoint kept


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, fm_test_shards):
    root = tmp_path_factory.mktemp("tiny_run")
    cfg = _tiny(root, fm_test_shards, root / "run", total_kimg=0.016)
    r = distgen_run([sys.executable, "-m", "distgen", "train", str(cfg)], _env(), check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return root / "run"


@pytest.mark.parametrize("command, delay", [("sample", 1.0), ("sample", 4.0), ("export", 4.0)])
@pytest.mark.e2e
def test_ctrl_c_during_sample_or_export_ends_with_one_line_and_no_half_written_output(tiny_run, tmp_path, command,
                                                                                       delay):
    """Whenever it lands (start-up, loading, sampling, writing), Ctrl-C ends the command with one line and 130,
    and leaves no output that looks finished but is not."""
    out = tmp_path / ("s.npz" if command == "sample" else "export")
    args = ["sample", str(tiny_run), "--num", "4000", "--out", str(out)] if command == "sample" else \
        ["export", str(tiny_run), str(out)]
    p = subprocess.Popen([sys.executable, "-m", "distgen", *args], env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, preexec_fn=_as_from_a_terminal)
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    if p.returncode == 0:  # it finished first: then its output is whole
        assert out.exists()
        return
    assert p.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith(f"distgen: interrupted (SIGINT): {command}")
    assert sorted(q.name for q in tmp_path.iterdir()) == []  # neither an output nor a temporary file


# ----------------------------------------------------------------------------- OS errors in words
@pytest.fixture
def tmpfs(tmp_path):
    """Mount a small tmpfs (root only): ``mount(size, ro)`` -> its path; unmounted afterwards."""
    mounted = []

    def mount(size: str, ro: bool = False) -> Path:
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}" + (",ro" if ro else ""), "tmpfs", str(where)],
                           capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or 'not root'}): the full-disk and read-only "
                        f"cases need one")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.mark.parametrize("case", ["full", "read-only"])
@pytest.mark.e2e
def test_a_full_or_read_only_disk_is_one_line_with_the_path_and_what_to_do(tmp_path, fm_test_shards, tmpfs, case):
    fs = tmpfs("1M", ro=case == "read-only")
    cfg = _tiny(tmp_path, fm_test_shards, fs / "run")
    r = distgen_run([sys.executable, "-m", "distgen", "train", str(cfg)], _env(), check=False)
    assert r.returncode == 2, r.stdout[-1000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    if case == "full":
        assert last.startswith(f"distgen: error: {fs}/run/checkpoints/.tmp-step-") and \
            "No space left on device (the disk is full: free space or write elsewhere)" in last, last
        assert [p.name for p in (fs / "run" / "checkpoints").iterdir()] == []  # the unfinished checkpoint removed
    else:
        assert last == (f"distgen: error: run.dir {fs}/run: cannot be written ({fs}/run: Read-only file system (the "
                        f"file system is read-only: write elsewhere))"), last


def test_a_users_folder_named_like_a_temporary_one_is_never_deleted(tmp_path):
    """atomic_dir (exports, ema outputs, best/) removes a crash's leftover .<name>.tmp / .<name>.old only when it
    holds distgen's mark; a user's folder of that name stops the write instead."""
    from distgen.durable import PARTIAL, atomic_dir

    final = tmp_path / "export"
    mine = tmp_path / ".export.tmp"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a folder distgen left there"):
        with atomic_dir(final) as tmp:
            (tmp / "a").write_text("new")
    assert (mine / "notes.txt").read_text() == "mine" and not final.exists()
    mine.rename(tmp_path / "kept")
    # a crash's leftovers (marked) are cleared; the result is complete, without the mark
    for name in (".export.tmp", ".export.old"):
        (tmp_path / name).mkdir()
        (tmp_path / name / PARTIAL).touch()
    with atomic_dir(final) as tmp:
        (tmp / "a").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "kept"]
    assert sorted(p.name for p in final.iterdir()) == ["a"]


def test_a_pickled_bin_in_an_export_is_refused_without_running_it(tiny_run, tmp_path, capsys):
    """diffusers' from_pretrained falls back to a pickled diffusion_pytorch_model.bin where the .safetensors is
    missing; distgen reads exports from .safetensors alone: a .bin with a payload is named and never unpickled,
    beside the good file or in its place."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from test_untrusted_eval import Payload

    export = tmp_path / "export"
    assert cli(["export", str(tiny_run), str(export)]) == 0
    unet = export / "unet"
    good = unet / "diffusion_pytorch_model.safetensors"
    marker = tmp_path / "ran"
    torch.save({**load_file(good), "x": Payload(marker)}, unet / "diffusion_pytorch_model.bin")
    torch.load(unet / "diffusion_pytorch_model.bin", weights_only=False)["x"].close()  # the payload is real
    assert marker.exists()
    marker.unlink()
    capsys.readouterr()
    # beside the good file: the export samples, from the safetensors
    assert cli(["sample", str(export), "--num", "2", "--out", str(tmp_path / "a.npz")]) == 0
    assert not marker.exists()
    # in its place: refused by name, first line, nothing run
    shutil.move(good, tmp_path / "kept.safetensors")
    capsys.readouterr()
    assert cli(["sample", str(export), "--num", "2", "--out", str(tmp_path / "b.npz")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0].startswith(f"distgen: error: {unet / 'diffusion_pytorch_model.bin'}: a pickled weights "
                                          f"file, which distgen does not load"), err
    assert not marker.exists() and not (tmp_path / "b.npz").exists()

"""Reliability and security, tried as a user and as an attacker would: nothing deleted or executed that the
user did not ask for, resume that fails safe, and errors that name what is wrong."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO
from distgen import checkpoint as ckpt
from distgen import durable
from distgen.cli import main as cli
from distgen.data import DataError, make_loader, resolve_shards, write_shards
from distgen.data.tario import iter_entries
from test_eval import _fm_images
from test_train import launch, run, tiny_config

STEPS = 10


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: what must not change (but the run folder's lock file, which
    every trainer that takes the folder writes its name into)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "distgen.lock"}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A finished 10-step run (checkpoints at every 2nd step, all kept) on two shards of real images, the
    second corrupt mid-way (a header whose checksum fails, same size), trained with data.on_error=skip."""
    root = tmp_path_factory.mktemp("reliability")
    x, y = _fm_images(96)
    np.savez(root / "d.npz", x=x, y=y)
    write_shards(f"npz:{root / 'd.npz'}", root / "data", "train", samples_per_shard=48)
    broken = root / "data" / "train-000001.tar"
    with open(broken, "rb") as f:
        starts = [pos for _, _, pos in iter_entries(f, read_data=False)]
    data = bytearray(broken.read_bytes())
    data[starts[2 * 24] + 5] ^= 0xFF  # sample 24's first header (2 members a sample)
    broken.write_bytes(bytes(data))
    cfg = tiny_config(root, root / "data" / "train.manifest.json",
                      data={"on_error": "skip", "shuffle_buffer": 50},
                      train={"total_kimg": STEPS * 8 / 1000, "checkpoint_every": 2, "keep_checkpoints": 20})
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = run([*launch(1), "train", str(cfg)], env)
    return {"root": root, "cfg": cfg, "run": root / "run", "out": r.stdout, "env": env}


def _copy(base, tmp_path) -> tuple[Path, Path]:
    """The base run copied to ``tmp_path/run`` and a config pointing at the copy."""
    shutil.copytree(base["run"], tmp_path / "run")
    c = yaml.safe_load(base["cfg"].read_text())
    c["run"]["dir"] = str(tmp_path / "run")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(c))
    return tmp_path / "run", tmp_path / "c.yaml"


# ----------------------------------------------------------------------------- set-up
def test_installed_versions_are_the_locked_ones():
    """make test installs from requirements.lock: what this suite runs against is what the lock says."""
    locked = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            locked[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    assert {"torch", "deepspeed", "accelerate", "diffusers", "torch-fidelity", "transformers"} <= set(locked)
    wrong = {n: (v, metadata.version(n)) for n, v in locked.items() if metadata.version(n) != v}
    assert not wrong, f"installed versions differ from requirements.lock: {wrong}"


# ----------------------------------------------------------------------------- skipped data, counted
@pytest.mark.e2e
def test_skipped_samples_are_counted_and_recorded(base):
    recs = [json.loads(l) for l in (base["run"] / "metrics.jsonl").read_text().splitlines()]
    totals = [r["skipped_samples_total"] for r in recs]
    assert totals == sorted(totals) and totals[-1] > 0  # the corrupt shard was read, and what it lost counted
    assert f"{totals[-1]} bad input sample(s) skipped in this run" in base["out"]


def test_a_broken_shard_tail_counts_every_sample_it_loses(base):
    from distgen.config import DataConfig

    manifest = base["root"] / "data" / "train.manifest.json"
    cfg = DataConfig(resolution=28, channels=1, workers=0, on_error="skip")
    loader = make_loader(str(manifest), cfg, batch_size=16, mode="eval")
    keys = [k for b in loader for k in b["key"]]
    # The 24 samples from the corrupt header on, and the one before it: its members could go on past the header.
    assert len(keys) == 48 + 23 and loader.skipped == 25 and len(keys) + loader.skipped == 96
    # without a manifest the length of the rest is unknown: counted once, and said so
    loader = make_loader([str(base["root"] / "data" / "train-000001.tar")], cfg, batch_size=16, mode="eval")
    assert sum(len(b["key"]) for b in loader) == 23 and loader.skipped == 1


# ----------------------------------------------------------------------------- export never deletes
def test_export_refuses_the_run_folder_its_parent_and_other_folders(base, tmp_path, monkeypatch, capsys):
    run_dir, _ = _copy(base, tmp_path)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    before = _tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    cases = [(str(run_dir), "is the run folder"), (str(tmp_path), "or holds it"), (".", "or holds it"),
             (str(tmp_path / "notes"), "not a distgen export"), (str(tmp_path / "notes" / "todo.txt"), "not a folder"),
             (str(run_dir / "checkpoints"), "not a distgen export")]
    for out, why in cases:
        assert cli(["export", str(run_dir), out]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"distgen: error: {out}: ") and why in err, err
    assert _tree(tmp_path) == before  # nothing deleted, nothing written


def test_export_replaces_only_an_export_and_only_with_force(base, tmp_path, monkeypatch, capsys):
    out = tmp_path / "export"
    assert cli(["export", str(base["run"]), str(out)]) == 0
    first = _tree(out)
    assert cli(["export", str(base["run"]), str(out)]) == 2
    assert "holds an earlier export; pass --force" in capsys.readouterr().err
    # a failure part-way through a forced export leaves the earlier export as it was, and no temporary folder
    from distgen.families.diffusion import Diffusion

    def broken(self, nets, folder):
        (folder / "half.bin").write_bytes(b"x")
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(Diffusion, "export", broken)
        assert cli(["export", str(base["run"]), str(out), "--force"]) == 2
        assert capsys.readouterr().err.startswith("distgen: error: a file: disk full")
    assert _tree(out) == first and sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert cli(["export", str(base["run"]), str(out), "--force"]) == 0
    assert _tree(out) == first  # the same weights, written again


def test_a_broken_export_json_is_named(base, tmp_path):
    from distgen.errors import SampleError
    from distgen.sample import load_ema

    out = tmp_path / "export"
    assert cli(["export", str(base["run"]), str(out)]) == 0
    good = json.loads((out / "distgen.json").read_text())
    cases = [("{not json", "not readable JSON"),
             (json.dumps({**good, "extra": 1}), "extra: unknown key"),
             (json.dumps({**good, "config": [1, 2]}), "config: expected an object, got a list"),
             (json.dumps({**good, "data_info": "28x28"}), "data_info: expected an object, got a string"),
             (json.dumps({**good, "data_info": {**good["data_info"], "resolution": 10 ** 9}}),
              "data_info.resolution: 1000000000 is out of range"),
             (json.dumps({**good, "config": {**good["config"], "train": {"batch_size": "big"}}}),
              "train.batch_size: expected an integer")]
    for text, why in cases:
        (out / "distgen.json").write_text(text)
        with pytest.raises(SampleError) as e:
            load_ema(out)
        assert str(e.value).startswith(f"{out / 'distgen.json'}: ") and why in str(e.value), str(e.value)


# ----------------------------------------------------------------------------- no commands from data
def test_a_manifest_cannot_run_commands_or_name_files_outside_its_folder(base, tmp_path):
    marker = tmp_path / "MARKER"
    good = json.loads((base["root"] / "data" / "train.manifest.json").read_text())
    shutil.copy(base["root"] / "data" / "train-000000.tar", tmp_path / "good.tar")
    for name in (f"pipe:touch {marker}; cat good.tar", str(tmp_path / "good.tar"), "../good.tar",
                 "http://example.invalid/good.tar"):
        m = {**good, "shards": [{"name": name, "count": 48}]}
        (tmp_path / "sub").mkdir(exist_ok=True)
        (tmp_path / "sub" / "m.json").write_text(json.dumps(m))
        with pytest.raises(DataError, match=r"shards\[0\].name .*relative to its own folder"):
            resolve_shards(str(tmp_path / "sub" / "m.json"))
    assert not marker.exists()


def test_eval_of_an_export_runs_no_command_from_its_stored_config(base, tmp_path, capsys):
    out = tmp_path / "export"
    assert cli(["export", str(base["run"]), str(out)]) == 0
    marker = tmp_path / "MARKER"
    meta = json.loads((out / "distgen.json").read_text())
    meta["config"]["data"]["train"] = [f"pipe:touch {marker}; cat {base['root'] / 'data' / 'train-000000.tar'}"]
    (out / "distgen.json").write_text(json.dumps(meta))
    assert cli(["eval", str(out), "--metrics", "fid", "--num-samples", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"distgen: error: {out / 'distgen.json'}: its stored config's eval.ref or data.train "
                          "is a pipe: command") and "pass --ref" in err
    assert not marker.exists()


def test_shard_sizes_are_checked_at_start_and_hashes_on_demand(base, tmp_path, capsys):
    shutil.copytree(base["root"] / "data", tmp_path / "data")
    manifest = tmp_path / "data" / "train.manifest.json"
    assert cli(["data", "verify", str(manifest)]) == 2  # the base data's second shard was altered after sharding
    err = capsys.readouterr().err
    assert err.startswith(f"distgen: error: {manifest}: 1 of 2 shard(s) do not match") and \
        "train-000001.tar: sha256 differs" in err
    write_shards(f"npz:{base['root'] / 'd.npz'}", tmp_path / "data", "train", samples_per_shard=48)
    assert cli(["data", "verify", str(manifest)]) == 0
    shard = tmp_path / "data" / "train-000000.tar"
    with open(shard, "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(DataError, match=rf"{shard} is \d+ bytes, the manifest records \d+ .*distgen data verify"):
        resolve_shards(str(manifest))


# ----------------------------------------------------------------------------- clear data errors
def test_a_data_error_in_a_loader_worker_keeps_its_own_message(base):
    from distgen.config import DataConfig

    cfg = DataConfig(resolution=28, channels=1, workers=2)
    with pytest.raises(DataError) as e:
        for _ in make_loader(str(base["root"] / "data" / "train.manifest.json"), cfg, batch_size=16, mode="eval"):
            pass
    assert str(e.value).startswith(f"shard {base['root'] / 'data' / 'train-000001.tar'}: corrupt")
    assert "Caught" not in str(e.value) and "Traceback" not in str(e.value)


# ----------------------------------------------------------------------------- resume that fails safe
def _evil_optimizer_state(path: Path, marker: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"state": Evil()}, path)


@pytest.mark.e2e
def test_damaged_checkpoints_are_named_and_the_run_falls_back(base, tmp_path):
    run_dir, cfg = _copy(base, tmp_path)
    root = run_dir / "checkpoints"
    marker = tmp_path / "pwned"
    ema = root / "step-00000010" / "ema0-unet.safetensors"
    ema.write_bytes(ema.read_bytes()[:1000])  # truncated
    (root / "step-00000008" / "meta.json").write_text('{"format": "distgen-checkpoint/1", "st')  # not JSON
    meta6 = json.loads((root / "step-00000006" / "meta.json").read_text())
    del meta6["counters"]
    (root / "step-00000006" / "meta.json").write_text(json.dumps(meta6))  # lacks a key
    _evil_optimizer_state(root / "step-00000004" / "optim-unet.pt", marker)  # pickled code
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "kimg": 0.0')  # a torn last line
    r = run([*launch(1), "train", str(cfg)], base["env"])
    said = [l for l in r.stdout.splitlines() if "does not load" in l]
    assert len(said) == 4
    assert f"{ema}: not a readable safetensors file" in said[0]
    assert f"{root / 'step-00000008' / 'meta.json'}: not readable JSON" in said[1]
    assert f"{root / 'step-00000006' / 'meta.json'}: lacks counters" in said[2]
    assert f"{root / 'step-00000004' / 'optim-unet.pt'}: refused" in said[3]
    assert all("resuming from the newest checkpoint that loads, step-00000002" in l for l in said)
    assert f"resumed from {root / 'step-00000002'} (step 2" in r.stdout and "done at step 10" in r.stdout
    assert not marker.exists()
    # the damaged folders are kept, out of the way; the run wrote its own checkpoints again
    assert sorted(p.name for p in root.iterdir() if p.name.endswith(".damaged")) == [
        f"step-{s:08d}.damaged" for s in (4, 6, 8, 10)]
    assert [p.name for p in ckpt.checkpoint_folders(root)] == [f"step-{s:08d}" for s in (2, 4, 6, 8, 10)]
    assert "dropped 1 line(s) that are not whole records" in r.stdout
    steps = [json.loads(l)["step"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10]  # from the base run up to step 2: none; then this run's


@pytest.mark.e2e
def test_no_fresh_start_over_checkpoints_that_do_not_load(base, tmp_path):
    run_dir, cfg = _copy(base, tmp_path)
    root = run_dir / "checkpoints"
    for cp in ckpt.checkpoint_folders(root)[:-1]:
        shutil.rmtree(cp)
    (root / "step-00000010" / "meta.json").unlink()  # a folder without meta.json is damaged, not absent
    before = _tree(run_dir)
    r = run([*launch(1), "train", str(cfg)], base["env"], check=False)
    assert r.returncode == 2
    first = r.stderr.strip().splitlines()[0]
    assert first == (f"distgen: error: {root}: none of its 1 checkpoint folder(s) loads, and distgen does not start "
                     "afresh over them (move them away to start a new run):")
    assert f"step-00000010: {root / 'step-00000010' / 'meta.json'}: missing" in r.stderr
    after = _tree(run_dir)
    # `distgen status` learns why the run stopped (the one file added); no checkpoint replaced, metrics.jsonl and
    # latest as they were
    assert json.loads(after.pop("last-error.json"))["type"] == "CheckpointError" and after == before


@pytest.mark.e2e
def test_resume_refuses_a_changed_model_config_unless_allowed(base, tmp_path):
    run_dir, cfg = _copy(base, tmp_path)
    before = _tree(run_dir)
    r = run([*launch(1), "train", str(cfg), "model.prediction=v_prediction", "model.preset=small",
             "model.sample_steps=3", "train.total_kimg=0.096"], base["env"], check=False)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()[0]
    assert err.startswith(f"distgen: error: {run_dir / 'checkpoints' / 'step-00000010' / 'meta.json'}: the run was "
                          "trained with another model config; changed: ")
    assert "model.preset: 'tiny' -> 'small'" in err and "model.prediction: 'epsilon' -> 'v_prediction'" in err
    assert "sample_steps" not in err and "--allow-config-change" in err  # sampling-only fields may change
    after = _tree(run_dir)
    assert "config" in json.loads(after.pop("last-error.json"))["message"] and after == before  # (status reads it)
    r = run([*launch(1), "train", str(cfg), "model.prediction=v_prediction", "train.total_kimg=0.096",
             "--allow-config-change"], base["env"])
    assert "resuming with a changed config (--allow-config-change): model.prediction" in r.stdout
    assert "done at step 12" in r.stdout


@pytest.mark.e2e
def test_a_finished_run_ends_again_at_once_touching_nothing(base, tmp_path):
    run_dir, cfg = _copy(base, tmp_path)
    before = _tree(run_dir)
    r = run([*launch(1), "train", str(cfg)], base["env"])
    assert f"{run_dir} already finished at step 10" in r.stdout
    assert _tree(run_dir) == before


def _signal_handlers(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return int(line.split()[1], 16)
    return 0


@pytest.mark.e2e
def test_a_signal_during_start_up_exits_for_requeue_and_leaves_the_checkpoints(base, tmp_path):
    run_dir, cfg = _copy(base, tmp_path)
    before = _tree(run_dir / "checkpoints")
    proc = subprocess.Popen([*launch(1), "train", str(cfg), "train.total_kimg=10"], env=base["env"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # As soon as the handler is in place (the first thing `distgen train` does, before importing torch),
    # so the signal provably lands during start-up, seconds before any step.
    deadline = time.time() + 30
    while not _signal_handlers(proc.pid) & (1 << (signal.SIGTERM - 1)):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    assert "signal received during start-up, before step 11; no checkpoint written; exiting with 75" in out
    assert _tree(run_dir / "checkpoints") == before


WORKERS_SCRIPT = """
import sys, time
from distgen.config import DataConfig
from distgen.data import make_loader
loader = make_loader(sys.argv[1], DataConfig(resolution=28, workers=2, shuffle_buffer=10), batch_size=4, mode="train")
it = loader._start()  # the DataLoader's own iterator: its worker processes are visible
next(it)
print(" ".join(str(w.pid) for w in it._workers), flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.e2e
def test_loader_workers_die_with_their_parent(base, fm_test_shards):
    proc = subprocess.Popen([sys.executable, "-c", WORKERS_SCRIPT, str(fm_test_shards)], env=base["env"],
                            stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    time.sleep(1.0)  # the workers run ahead and block on a full queue
    proc.kill()
    proc.wait()
    deadline = time.time() + 10
    while any(_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)


# ----------------------------------------------------------------------------- sampling options, before compute
@pytest.mark.parametrize("args,message", [
    (["--steps", "0"], "--steps: must be >= 1, got 0"),
    (["--steps", "-3"], "--steps: must be >= 1, got -3"),
    (["--steps", "1001"], "--steps: must be in [1, 1000] (the model's training timesteps), got 1001"),
    (["--guidance", "3"], "--guidance: this model is unconditional"),
    (["--seed", "-1"], "--seed: must be >= 0, got -1"),
    (["--temperature", "0.5"], "the diffusion family takes no sampling option --temperature"),
    (["--out", "{tmp}/x.jpg"], "--out {tmp}/x.jpg: '.jpg' is not an output kind distgen writes"),
    (["--out", "{tmp}/file/grid.png"], "--out {tmp}/file/grid.png: cannot be written"),
    (["--out", "/proc/distgen-grid.png"], "--out /proc/distgen-grid.png: cannot be written"),
])
def test_sample_options_and_output_are_checked_before_any_compute(base, tmp_path, monkeypatch, capsys, args,
                                                                  message):
    import distgen.sample

    (tmp_path / "file").write_text("a file, not a folder")
    monkeypatch.setattr(distgen.sample, "generate", lambda *a, **k: pytest.fail("sampled before checking"))
    args = [a.format(tmp=tmp_path) for a in args]
    out = [] if "--out" in args else ["--out", str(tmp_path / "g.png")]
    assert cli(["sample", str(base["run"]), "--num", "4", *args, *out]) == 2
    assert capsys.readouterr().err.startswith(f"distgen: error: {message.format(tmp=tmp_path)}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_eval_refuses_sample_counts_a_metric_cannot_use(base, capsys):
    assert cli(["eval", str(base["run"]), "--metrics", "fid,prc", "--num-samples", "2"]) == 2
    assert capsys.readouterr().err.startswith("distgen: error: --num-samples: prc needs at least 4 images, got 2")
    assert cli(["eval", str(base["run"]), "--metrics", "isc", "--num-samples", "9"]) == 2
    assert "isc needs at least 10 images, got 9" in capsys.readouterr().err


# ----------------------------------------------------------------------------- durable checkpoints
def test_checkpoint_files_and_folders_reach_the_disk_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))),
                                                     real_replace(a, b))[1])
    root = tmp_path / "checkpoints"
    tmp = ckpt.tmp_dir(root, 7)
    tmp.mkdir(parents=True)
    ckpt.save_tensors(tmp / "net.safetensors", {"w": torch.ones(3)})
    ckpt.save_state(tmp / "optim-net.pt", {"step": torch.tensor(7)})
    (tmp / "deepspeed").mkdir()
    (tmp / "deepspeed" / "shard.pt").write_bytes(b"written by an engine")
    durable.sync_tree(tmp / "deepspeed")
    ckpt.save_rng(tmp, 0)
    ckpt.write_meta(tmp, {"step": 7})
    final = ckpt.finalize(root, 7, keep=2)
    rename = events.index(("replace", str(tmp), str(final)))
    synced = {e[1] for e in events[:rename] if e[0] == "fsync"}
    files = {str(tmp / p.relative_to(final)) for p in final.rglob("*")}
    assert files | {str(tmp)} <= synced  # every file and folder, before the rename that publishes them
    after = [e for e in events[rename + 1:]]
    assert after[0] == ("fsync", str(root))  # and the rename itself
    assert ("replace", str(root / ".latest.tmp"), str(root / "latest")) in after


def test_atomic_dir_leaves_nothing_half_written(tmp_path):
    final = tmp_path / "best"
    with durable.atomic_dir(final) as d:
        (d / "a.txt").write_text("one")
    with pytest.raises(RuntimeError):
        with durable.atomic_dir(final) as d:
            (d / "a.txt").write_text("two")
            raise RuntimeError("crash mid-write")
    assert (final / "a.txt").read_text() == "one" and sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_submitit_requeues_only_a_run_that_has_not_finished(base, tmp_path):
    """submitit's checkpoint hook (the job got the time-limit signal): no requeue once the final checkpoint
    is written; a requeue otherwise."""
    sys.path.insert(0, str(REPO / "launch"))
    try:
        from submit import Train
    finally:
        sys.path.remove(str(REPO / "launch"))
    assert Train(str(base["cfg"]), [], 1).checkpoint() is None
    longer = Train(str(base["cfg"]), ["train.total_kimg=0.2"], 1)
    assert longer.checkpoint().function.overrides == ["train.total_kimg=0.2"]
    assert Train(str(base["cfg"]), [], 1)() == "done"  # a finished run: the job's function returns at once

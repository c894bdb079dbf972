"""``distgen status``: a finished, a running, a preempted and a failed run, a folder of runs, damaged and edited
files named in one line each, and no torch imported. The runs are copies of the suite's shared diffusion runs
(conftest.trained: 6 steps, checkpoints at steps 4 and 6), turned into each state by what training would leave:
nothing here trains."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from distgen import ownership
from distgen.errors import TrainingError
from distgen.status import screen


@pytest.fixture(scope="module")
def source(trained):
    root, _ = trained
    return root / "diffusion-a", root / "diffusion-power-a"


@pytest.fixture
def run(source, tmp_path):
    shutil.copytree(source[0], tmp_path / "run")
    return tmp_path / "run"


def edit_meta(folder: Path, **changes) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, **changes}))


def keep_records(run: Path, n: int) -> None:
    """metrics.jsonl as it stood after ``n`` records (a run mid-way)."""
    lines = (run / "metrics.jsonl").read_text().splitlines()[:n]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_a_finished_run(source, run):
    text = screen(run)
    assert "state      finished at step 6" in text, text
    assert "step 6 of 125, 0.048 of 1 kimg" in text and "this launch stops at step 6 (train.max_steps)" in text
    assert "losses     loss " in text and "eta" not in text  # nothing left to estimate
    assert "step-00000004" in text and "step-00000006" in text
    assert [ln for ln in text.splitlines() if "<- loads" in ln][0].split()[0] == "step-00000006"
    power = screen(source[1])  # the power-EMA variant: a snapshot every step
    assert "snapshots  6 post-hoc EMA snapshot(s), 0.008 to 0.048 kimg, sigma_rel 0.05, 0.1" in power, power


def test_a_running_run_is_told_by_its_lock(run):
    """A live process holding the run's lock (what distgen train does while it trains) is 'training now', with its
    pid; once it is gone, however it ended, the run is not. Mid-way: 5 of its 6 records and its checkpoint at step 4,
    so an ETA."""
    keep_records(run, 5)
    shutil.rmtree(run / "checkpoints" / "step-00000006")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from distgen.ownership import "
         "lock_run_folder; lock = lock_run_folder(Path(sys.argv[1])); print('locked', flush=True); time.sleep(60)",
         str(run)], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    try:
        assert holder.stdout.readline().strip() == "locked"
        text = screen(run)
        assert f"state      training now (pid {holder.pid} on " in text, text
        assert "eta        " in text and "to step 6 at " in text and "if resumed" not in text
        assert "losses     loss " in text and "(step 5)" in text
    finally:
        holder.kill()
        holder.wait()
    assert "training now" not in screen(run)  # the kernel dropped the dead holder's lock


def test_a_status_probe_does_not_turn_away_a_trainer_starting_at_that_instant(run):
    """status probes the lock with a shared lock of an instant; a trainer taking it then tries again for half a
    second instead of reporting the folder as taken."""
    import fcntl

    fd = os.open(run / ownership.LOCK, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)  # a probe, held a little longer than a real one
    threading.Timer(0.15, os.close, [fd]).start()
    ownership.lock_run_folder(run).release()


def test_a_preempted_run(run):
    edit_meta(run / "checkpoints" / "step-00000006", reason="preempted")  # what a signal's checkpoint records
    text = screen(run)
    assert "state      preempted at step 6 (stopped on a signal)" in text, text


def test_a_failed_run_records_its_error_and_a_new_attempt_clears_it(run, monkeypatch):
    """train() records what stopped it (after the run folder is locked: never in a folder it does not own), and the
    next attempt on the folder clears the record. The loop itself is replaced: the wiring is what is tested."""
    from distgen import train as train_mod
    from distgen.config import load_config

    cfg = load_config(run / "config.yaml", [f"run.dir={run}"])

    def diverges(*args, **kwargs):
        assert ownership.lock_holder(run)[0], "the error is recorded while the folder is locked"
        raise TrainingError("10 non-finite steps in a row (step 5); stopping without saving")

    monkeypatch.setattr(train_mod, "_train", diverges)
    with pytest.raises(TrainingError):
        train_mod.train(cfg)
    text = screen(run)
    assert "state      failed: stopped on an error at step 6" in text, text
    assert "error      TrainingError: 10 non-finite steps in a row (step 5); stopping without saving (at " in text
    monkeypatch.setattr(train_mod, "_train", lambda *a, **k: 0)
    assert train_mod.train(cfg) == 0
    assert not (run / ownership.ERROR_FILE).exists() and "finished at step 6" in screen(run)


def test_damaged_and_edited_files_are_named_in_one_line_each(run):
    cps = run / "checkpoints"
    weights = cps / "step-00000006" / "ema0-unet.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # cut short, as a full disk leaves it
    (cps / ".tmp-step-00000008").mkdir()
    with open(run / "metrics.jsonl", "a") as f:
        # a scalar named with a terminal escape sequence (clear screen) is printed with '?' in its place
        f.write('{"step": "six"}\n\x1b[2J not json\n{"step": 7, "kimg": 0.056, "loss": 0.5, "\\u001b[2Jx": 1}\n')
    (run / "config.yaml").write_text("train: [1\n")
    (run / ownership.ERROR_FILE).write_text('{"type": 3}')
    (run / "ema-snapshots").mkdir()
    (run / "ema-snapshots" / "index.json").write_text('{"snapshots": [{"file": "../../etc/passwd"}]}')
    text = screen(run)
    lines = text.splitlines()
    assert "\x1b" not in text and "?[2Jx 1" in text and "Traceback" not in text
    row6 = next(ln for ln in lines if ln.strip().startswith("step-00000006"))
    assert "damaged: ema0-unet.safetensors: " in row6 and "truncated or damaged" in row6, text
    assert next(ln for ln in lines if "<- loads" in ln).split()[0] == "step-00000004"
    assert any(".tmp-step-00000008" in ln and "incomplete: a save cut off" in ln for ln in lines)
    problems = [ln for ln in lines if ln.startswith("  problem")]
    for file in ("metrics.jsonl: 2 line(s)", "config.yaml: not valid YAML", f"{ownership.ERROR_FILE}: ",
                 "index.json: snapshots[0]"):
        assert sum(file in p for p in problems) == 1, (file, text)
    assert "step 7" in text and "length unknown" in text  # what could be read is still shown


def test_a_folder_of_runs_without_torch(source, run, tmp_path):
    """One screen per run folder inside, other folders skipped; in a fresh interpreter, importing neither torch nor
    numpy nor a family (the point of status: seconds on a login node)."""
    folder = tmp_path
    shutil.copytree(source[1], folder / "power")
    (folder / "not-a-run").mkdir()
    edit_meta(run / "checkpoints" / "step-00000006", reason="preempted")
    code = ("import sys; from distgen.cli import main; rc = main(['status', sys.argv[1]]); "
            "heavy = [m for m in ('torch', 'numpy', 'distgen.families', 'safetensors') if m in sys.modules]; "
            "print('HEAVY', heavy); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert r.returncode == 0 and "HEAVY []" in r.stdout, r.stdout + r.stderr
    heads = [ln for ln in r.stdout.splitlines() if ln.startswith(str(folder))]
    assert heads == [f"{folder}/power  (diffusion, global batch 8)", f"{folder}/run  (diffusion, global batch 8)"]
    assert "finished at step 6" in r.stdout and "preempted at step 6" in r.stdout
    assert main_status(tmp_path / "not-a-run") == 2


def main_status(path) -> int:
    from distgen.cli import main

    return main(["status", str(path)])


def test_status_refuses_what_is_not_a_run(tmp_path, capsys):
    assert main_status(tmp_path / "absent") == 2
    assert "not a folder" in capsys.readouterr().err
    assert main_status(tmp_path) == 2
    assert "neither a run folder" in capsys.readouterr().err

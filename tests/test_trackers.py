"""Experiment trackers and step telemetry (docs/training.md#trackers, #telemetry): TensorBoard, W&B (offline) and MLflow
(a local file store) read back through their own readers and compared with metrics.jsonl, across a resume that
continues the same tracker runs; a tracker that is missing or cannot start refused before the first step; the
telemetry of every record present and sane (data wait near 1 behind a slow loader and near 0 behind an instant one,
peak memory growing with the batch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO
from distgen.config import load_config
from distgen.errors import ConfigError
from matrix import family_config
from test_train import in_process

pytestmark = pytest.mark.usefixtures("one_thread")

TELEMETRY = ("samples_per_s", "samples_per_s_per_device", "step_time_s", "data_wait_share", "peak_mem_gib",
             "state_gib")


def tiny(tmp_path: Path, fm_test_shards: Path, trackers: list, model: str = "diffusion", **train) -> Path:
    """The suite's smallest run of ``model`` (tests/matrix.py: diffusion at 8x8, batch 4), a record every step."""
    data = {"*": {"train": [str(fm_test_shards)]}}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = family_config(tmp_path, model, "run", data, {"checkpoint_every": 2, **train})
    cfg = yaml.safe_load(path.read_text())
    cfg["run"]["trackers"] = trackers
    path.write_text(yaml.safe_dump(cfg))
    return path


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def numbers_by_step(recs: list[dict]) -> dict[int, dict]:
    """Every number of metrics.jsonl at its step (a step's training and evaluation records merged)."""
    out: dict[int, dict] = {}
    for r in recs:
        out.setdefault(r["step"], {}).update(
            {k: v for k, v in r.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)})
    return out


class FakeEvaluator:
    """Evaluation results without feature extractors: FID 5, 3, 4, 2 at the evaluations in turn."""

    skipped: dict = {}

    def __init__(self):
        self.values = iter([5.0, 3.0, 4.0, 2.0])

    def run(self, family, nets, data):
        return {"fid": next(self.values)}


def wandb_history(files: list[Path]) -> list[tuple[dict[int, dict], dict]]:
    """Each offline run file's history rows by step and its config, read by wandb's own reader: the wandb-core
    binary that `wandb leet inspect --json FILE` runs, called as that command calls it (wandb/cli/leet.py) without
    the seconds of the Python CLI's start-up."""
    from wandb.util import get_core_path

    procs = [subprocess.Popen([get_core_path(), "leet", "inspect", "--no-observability", "--json", "--run-file",
                               str(f), str(f.parents[1])], stdout=subprocess.PIPE, text=True) for f in files]
    out = []
    for p in procs:
        text, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        config = {k: v for r in rows if r["type"] in ("run", "config")
                  for k, v in (r["run"]["config"] if r["type"] == "run" else r["config"])["update"].items()}
        config["id"] = next(r["run"]["run_id"] for r in rows if r["type"] == "run")
        out.append(({r["history"]["step"]["num"]: r["history"]["item"] for r in rows if r["type"] == "history"},
                    config))
    return out


@pytest.mark.e2e
def test_trackers_read_back_equal_metrics_jsonl_and_a_resume_continues_their_runs(tmp_path, fm_test_shards,
                                                                                  monkeypatch):
    """One run with TensorBoard, W&B and MLflow at once: 4 steps, then resumed to 8. Every number of every
    metrics.jsonl record (losses, telemetry, evaluation results, the best so far) is in each tracker at its step;
    the config is their hyperparameters; the sample grids their images; the resume continued the same W&B and
    MLflow runs (one id, steps 5-8 after 1-4)."""
    import distgen.train

    # in this process, its environment restored after each run (W&B and MLflow export variables for child
    # processes); W&B offline: its local run files only, in the run folder; no console capture
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "WANDB_"))}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_CONSOLE="off")
    evaluator = FakeEvaluator()
    monkeypatch.setattr(distgen.train, "make_evaluator", lambda cfg, eng: evaluator)
    cfg = tiny(tmp_path, fm_test_shards, ["tensorboard", "wandb", "mlflow"], sample_every=2)
    over = ["eval.every=2"]
    for steps in (4, 8):
        r = in_process(["train", str(cfg), f"train.max_steps={steps}", *over], env)
        assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "trackers: tensorboard, wandb, mlflow" in r.stdout
    run = tmp_path / "run"
    recs = records(run)
    want = numbers_by_step(recs)
    assert sorted(want) == list(range(1, 9)) and all(set(TELEMETRY) <= set(want[s]) for s in want)
    assert [want[s].get("best/fid") for s in (2, 4, 6, 8)] == [5.0, 3.0, 3.0, 2.0]
    assert [want[s].get("best/step") for s in (2, 4, 6, 8)] == [2, 4, 4, 8]
    ids = json.loads((run / "trackers.json").read_text())

    # ---- MLflow, through its own client on the file store in the run folder
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads a file store only with it
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    runs = client.search_runs([ids["mlflow"]["experiment_id"]])
    assert [r.info.run_id for r in runs] == [ids["mlflow"]["run_id"]]  # one run, continued by the resume
    ml = runs[0]
    assert ml.info.status == "FINISHED" and ml.data.params["train.batch_size"] == "4"
    assert ml.data.params["model.family"] == "diffusion" and ml.data.tags["mlflow.runName"] == "run"
    keys = {k for v in want.values() for k in v}
    assert keys == set(ml.data.metrics)
    for key in keys:
        got = {m.step: m.value for m in client.get_metric_history(ml.info.run_id, key)}
        assert got == pytest.approx({s: v[key] for s, v in want.items() if key in v}, rel=1e-12), key
    images = [a.path for a in client.list_artifacts(ml.info.run_id, "images")]
    assert {int(p.split("+step+")[1].split("+")[0]) for p in images} == {2, 4, 6, 8}

    # ---- W&B: two offline segments of one run id, in the run folder, read back by wandb itself
    files = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [f.name for f in files] == [f"run-{ids['wandb']['id']}.wandb"] * 2
    (first, config), (second, config2) = wandb_history(files)
    assert config["id"] == config2["id"] == ids["wandb"]["id"]
    assert sorted(first) == [1, 2, 3, 4] and sorted(second) == [5, 6, 7, 8]  # the resume's steps continue
    assert config["train.batch_size"] == 4 and config["run.trackers"] == '["tensorboard", "wandb", "mlflow"]'
    for step, row in {**first, **second}.items():
        assert {k: row[k] for k in want[step]} == pytest.approx(want[step], rel=1e-12), step
        assert (row.get("samples._type") == "images/separated") == (step % 2 == 0)  # the grids

    # ---- TensorBoard: the same numbers (float32), the grids
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer().AddRunsFromDirectory(str(run / "tensorboard"))
    mux.Reload()
    main = [r for r in mux.Runs() if r.startswith("events") or r == "."]
    assert main == ["."]
    for key in keys:
        got = {e.step: e.value for e in mux.Scalars(".", key)}
        assert got == pytest.approx({s: v[key] for s, v in want.items() if key in v}, rel=1e-6, abs=1e-30), key
    assert sorted(e.step for e in mux.Images(".", "samples")) == [2, 4, 6, 8]


@pytest.mark.e2e
def test_a_tracker_that_is_missing_or_cannot_start_stops_the_run_before_its_first_step(tmp_path, fm_test_shards,
                                                                                       monkeypatch):
    with pytest.raises(ConfigError, match=r"run.trackers: unknown tracker\(s\) \['comet'\]"):
        load_config(None, ["run.trackers=[comet]"])
    # not installed: said with what to install, before anything is built
    cfg = tiny(tmp_path, fm_test_shards, ["tensorboard", "wandb"])
    monkeypatch.setitem(sys.modules, "wandb", None)  # what importlib finds of a package that is not installed
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "WANDB_"))}
    r = in_process(["train", str(cfg), "train.max_steps=2"], env)
    err = r.stderr
    assert r.returncode != 0
    assert "run.trackers: wandb is not installed (pip install 'distgen[trackers]'" in err, err
    assert not (tmp_path / "run").exists()
    # installed but cannot start (an MLflow tracking server that is not there): refused before step 1
    cfg = tiny(tmp_path, fm_test_shards, ["tensorboard", "mlflow"])
    r = in_process(["train", str(cfg), "train.max_steps=2"], {**env, "MLFLOW_TRACKING_URI": "nosuchscheme://nowhere"})
    err = r.stderr
    assert r.returncode != 0
    assert "run.trackers: mlflow could not start:" in err and "nosuchscheme" in err, err
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "run" / "trackers.json").exists()


# Trainings one after another in one fresh process, each behind an artificially slow (or instant) loader stage: the
# first batch again and again, after DELAY seconds. argv[1]: JSON [[delay, distgen argv], ...].
LOADER = """
import json, sys, time
import distgen.train
from distgen.cli import main

real = distgen.train.make_train_loader

class Stage:
    def __init__(self, inner, delay):
        self.inner, self.delay, self.skipped = inner, delay, 0

    def __iter__(self):
        batch = next(iter(self.inner))
        while True:
            if self.delay:
                time.sleep(self.delay)
            yield batch

for delay, argv in json.loads(sys.argv[1]):
    distgen.train.make_train_loader = lambda *a, delay=delay, **k: Stage(real(*a, **k), delay)
    print("=== run", flush=True)
    if main(argv):
        sys.exit(1)
"""


@pytest.mark.e2e
def test_telemetry_data_wait_memory_and_mfu(tmp_path, fm_test_shards, env):
    """One fresh process (on CPU the peak is the process's own since it started) trains twice: batch 4 behind a
    loader stage that takes 1 s a batch, which waits on data most of each step, and exactly that second; then batch
    1024 behind an instant one, which hardly ever waits and raises the peak. MFU only with a peak to compare against
    (train.peak_tflops; none on CPU otherwise)."""
    runs = {"slow": (1.0, 4, []), "fast": (0.0, 1024, ["train.peak_tflops=0.5"])}
    spec = []
    for name, (delay, batch, over) in runs.items():
        cfg = tiny(tmp_path / name, fm_test_shards, [], checkpoint_every=100)  # no stream restart mid-run
        spec.append([delay, ["train", str(cfg), "train.max_steps=2", f"train.batch_size={batch}",
                             "train.total_kimg=10", *over]])
    r = subprocess.run([sys.executable, "-c", LOADER, json.dumps(spec)], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    outs = dict(zip(runs, r.stdout.split("=== run\n")[1:]))
    slow, fast = records(tmp_path / "slow" / "run"), records(tmp_path / "fast" / "run")
    for recs, batch in ((slow, 4), (fast, 1024)):
        assert [r["step"] for r in recs] == [1, 2] and all(set(TELEMETRY) <= set(r) for r in recs)
        for r in recs:
            assert r["samples_per_s_per_device"] == r["samples_per_s"]  # one process
            assert r["samples_per_s"] * r["step_time_s"] == pytest.approx(batch)  # samples a step
    # the second record (the first's interval holds the start-up): each step waits at least the stage's second (a
    # sleep never wakes early; how late it wakes depends on the machine's load, so no upper bound is asserted), and
    # a larger share of its step than the instant stage's run waits of its own
    s, f = slow[1], fast[1]
    assert s["data_wait_share"] * s["step_time_s"] >= 1.0 and s["data_wait_share"] > f["data_wait_share"], (s, f)
    assert f["data_wait_share"] * f["step_time_s"] < 0.01 and f["data_wait_share"] < 0.02, f
    # 256 times the batch: its activations (about 0.4 GiB here) above the start-up's and the small run's peak
    assert fast[-1]["peak_mem_gib"] > slow[-1]["peak_mem_gib"] + 0.2, (fast[-1], slow[-1])
    assert "step " in outs["slow"] and " data " in outs["slow"] and "GiB" in outs["slow"]  # progress lines
    # MFU: none on CPU without a peak (said why); with one, FLOPs / step time / peak
    assert all("mfu" not in r for r in slow) and "no MFU: no peak known on cpu" in outs["slow"]
    gflop = float(outs["fast"].split("distgen: telemetry: ")[1].split(" GFLOP")[0])
    for r in fast:
        assert 0 < r["mfu"] < 1
        assert r["mfu"] == pytest.approx(gflop * 1e9 / r["step_time_s"] / 0.5e12, rel=1e-3)


@pytest.mark.e2e
def test_counting_a_steps_flops_leaves_no_trace(tmp_path, fm_test_shards, env):
    """The FLOP count runs a step's phases outside the engines before training: a GAN with BatchNorm statistics,
    ADA's state, lazy R1 (a phase every 2nd step) and two discriminator steps trains to the same weights and losses
    with it (train.peak_tflops set) as without it."""
    from safetensors.torch import load_file

    weights, losses = {}, {}
    for peak in ("null", "1.0"):
        cfg = tiny(tmp_path / peak, fm_test_shards, [], model="gan-dcgan")
        r = in_process(["train", str(cfg), "train.max_steps=2", f"train.peak_tflops={peak}"], env)
        assert r.returncode == 0, r.stderr[-3000:]
        cp = tmp_path / peak / "run" / "checkpoints" / "step-00000002"
        weights[peak] = {n: load_file(str(cp / f"{n}.safetensors")) for n in ("D", "G")}
        losses[peak] = [{k: v for k, v in r.items() if k.startswith(("loss", "D/", "G/"))}
                        for r in records(tmp_path / peak / "run")]
        assert ("GFLOP a step per device" in r.stdout) == (peak != "null"), r.stdout[-2000:]
    assert losses["null"] == losses["1.0"] and all(r["mfu"] > 0 for r in records(tmp_path / "1.0" / "run"))
    for n in ("D", "G"):
        assert weights["null"][n].keys() == weights["1.0"][n].keys()
        assert all(weights["null"][n][k].equal(weights["1.0"][n][k]) for k in weights["null"][n]), n


def test_the_peak_table_finds_each_device_and_the_config_key_overrides_it(monkeypatch):
    """Device names as torch.cuda.get_device_name gives them, each to its row (L4 is not L40S, A10 not A100; GH200
    and H200 have H100 SXM's compute), at the run's precision; a GPU the table lacks, and CPU, have none unless
    train.peak_tflops says."""
    import torch

    from distgen.telemetry import device_peak

    cuda, tc = torch.device("cuda"), load_config(None, []).train
    bf16, fp16 = (load_config(None, [f"train.mixed_precision={p}"]).train for p in ("bf16", "fp16"))
    cases = [("NVIDIA H100 80GB HBM3", bf16, True, 989.4), ("NVIDIA H100 PCIe", bf16, True, 756.5),
             ("NVIDIA H100 NVL", fp16, True, 835.5), ("NVIDIA H200", tc, True, 494.7),
             ("NVIDIA GH200 480GB", tc, False, 66.9),
             ("NVIDIA A100-SXM4-80GB", tc, True, 156), ("NVIDIA A100 80GB PCIe", tc, False, 19.5),
             ("NVIDIA A10", bf16, True, 125.0), ("NVIDIA L40S", bf16, True, 362.05), ("NVIDIA L4", bf16, True, 121.0),
             ("NVIDIA B200", bf16, True, 2250), ("AMD Instinct MI300X", bf16, True, 1307.4),
             ("NVIDIA B200", tc, False, None), ("NVIDIA GeForce RTX 4090", bf16, True, None)]
    for name, t, tf32, want in cases:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        peak, where = device_peak(t, cuda, tf32)
        assert peak == want, (name, where)
        assert (name in where) and ("set train.peak_tflops" in where) == (want is None), where
    over = load_config(None, ["train.peak_tflops=123.5"]).train
    assert device_peak(over, cuda, True) == (123.5, "train.peak_tflops, tf32")
    assert device_peak(over, torch.device("cpu"), False) == (123.5, "train.peak_tflops, fp32")
    assert device_peak(tc, torch.device("cpu"), False)[0] is None


def test_each_record_holds_the_peak_since_the_one_before():
    """On CPU the peak is the resident set's high-water mark (VmHWM). 256 MiB touched (its own mapping: an
    allocation that large is mmapped, so freeing it returns it to the system) shows in the peak, and after it is
    freed a reset brings the peak back down. The margins are half the allocation: the rest of the process may
    allocate or free a little meanwhile (a full suite's worker did, by 24 KB), but not 128 MiB."""
    from distgen.telemetry import peak_memory, reset_peak_memory

    def resident() -> int:
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmRSS:"))

    cpu, mib = torch.device("cpu"), 2 ** 20
    reset_peak_memory(cpu)
    before = resident()
    x = torch.ones(256 * mib // 4)
    high = peak_memory(cpu)
    del x
    reset_peak_memory(cpu)
    assert high >= before + 128 * mib and peak_memory(cpu) <= high - 128 * mib, (before, high, peak_memory(cpu))

"""Resuming at another world size (distgen.world_change): the global batch kept when it divides by the new process
count, else the per-device batch kept and the change said; the samples seen go on; the log, every later checkpoint's
meta.json and `distgen status` say that the count changed; DeepSpeed refuses another count by name, with the command
that converts its states. Exactness is promised only at the same count: here the runs go on, with finite losses
(1 -> 2 -> 1 -> 2 processes under DDP, then 2 -> 3 under DDP and under FSDP2)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from distgen import checkpoint as ckpt
from distgen.errors import CheckpointError
from distgen.status import screen
from distgen.world_change import plan_batch, run_length
from test_train import launch, run


def _config(tmp_path: Path, manifest: Path, batch: int, name: str = "c") -> Path:
    cfg = {"run": {"dir": str(tmp_path / "run"), "seed": 1},
           "model": {"family": "diffusion", "preset": "tiny", "sample_steps": 2},
           "data": {"train": [str(manifest)], "resolution": 8, "channels": 1, "resize": "stretch", "workers": 0,
                    "shuffle_buffer": 50},
           "train": {"batch_size": batch, "total_kimg": 1, "log_every": 1, "checkpoint_every": 2,
                     "keep_checkpoints": 10, "sample_every": 0, "sample_num": 1},
           "ema": {"halflife_kimg": [0.05], "rampup": None}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(nproc: int, cfg: Path, steps: int, env: dict, accel: str = "configs/accelerate/ddp.yaml", check=True):
    return run(launch(nproc, accel) + ["train", str(cfg), f"train.max_steps={steps}"], env, check=check)


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _meta(run_dir: Path, step: int) -> dict:
    return ckpt.read_meta(run_dir / "checkpoints" / f"step-{step:08d}")


def _change(step, nimg, a, b, ga, gb) -> dict:
    return {"step": step, "nimg": nimg, "from_world": a, "to_world": b, "from_global_batch": ga, "to_global_batch": gb}


@pytest.fixture(scope="module")
def chain(tmp_path_factory, fm_test_shards):
    """One run of batch 3: 2 steps with 1 process (global 3); with 2 to step 5 (3 does not divide by 2: 3 per device,
    global 6); with 1 to step 7 (6 per device); with 2 to step 9 (3 per device). Steps 5 and 7 are no periodic
    checkpoint's (every 2 steps): a resume there at the same count would draw again the batch drawn since step 4 or 6.
    Returns the run folder, each stretch's output, and the data streams the third stretch (in this process) built:
    (batch size, images drawn)."""
    import os

    import distgen.train
    from conftest import REPO

    root = tmp_path_factory.mktemp("world")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    cfg = _config(root, fm_test_shards, 3)
    outs = [_train(1, cfg, 2, env).stdout, _train(2, cfg, 5, env).stdout]
    loaders, real = [], distgen.train.make_train_loader

    def spy(*args, **kw):
        loaders.append(real(*args, **kw))
        return loaders[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(distgen.train, "make_train_loader", spy)
        outs.append(_train(1, cfg, 7, env).stdout)
    outs.append(_train(2, cfg, 9, env).stdout)
    return root / "run", outs, [(loader.dataset.batch_size, loader.count) for loader in loaders]


@pytest.mark.e2e
def test_a_global_batch_that_does_not_divide_keeps_the_per_device_batch_and_says_what_changes(chain):
    run_dir, outs, _ = chain
    assert (f"distgen: world size changed: {run_dir / 'checkpoints' / 'step-00000002'} was written by 1 "
            f"process(es), resuming with 2; global batch 3 -> 6 (3 does not divide by 2 process(es) x 1 accumulation, "
            f"so the per-device batch stays 3): 3 per device x 2 process(es) x 1 accumulation; learning rate "
            f"unchanged (train.lr: distgen does not scale it with the batch); the data stream restarts at step 2"
            ) in outs[1], outs[1][-3000:]
    assert "global batch 6 = 3 per device x 2 process(es) x 1 accumulation; 168 steps for 1 kimg" in outs[1]  # 2+994/6
    meta = _meta(run_dir, 5)
    assert (meta["world_size"], meta["global_batch"], meta["nimg"]) == (2, 6, 2 * 3 + 3 * 6)
    assert meta["world_size_changes"] == [_change(2, 6, 1, 2, 3, 6)]


@pytest.mark.e2e
def test_two_processes_to_one_keep_the_global_batch_and_say_so(chain):
    run_dir, outs, drawn = chain
    assert ("was written by 2 process(es), resuming with 1; global batch 6 kept: 6 per device x 1 process(es) x 1 "
            "accumulation; learning rate unchanged; the data stream restarts at step 5") in outs[2], outs[2][-3000:]
    assert "global batch 6 = 6 per device x 1 process(es) x 1 accumulation; 168 steps for 1 kimg" in outs[2]
    meta = _meta(run_dir, 7)
    assert (meta["world_size"], meta["global_batch"], meta["nimg"]) == (1, 6, 24 + 2 * 6)
    assert meta["world_size_changes"][1:] == [_change(5, 24, 2, 1, 6, 6)]
    # the stream restarted at step 5 (nothing drawn again of the 2-process stream of step 4) and at step 6's periodic
    # checkpoint: 6 images a step
    assert drawn == [(6, 6), (6, 6)]


@pytest.mark.e2e
def test_two_to_one_to_two_goes_on_with_finite_losses_and_counts_every_image(chain):
    run_dir, outs, drawn = chain
    assert "was written by 1 process(es), resuming with 2; global batch 6 kept: 3 per device x 2 process(es)" \
        in outs[3], outs[3][-3000:]
    meta = _meta(run_dir, 9)
    assert meta["nimg"] == 2 * 3 + 3 * 6 + 2 * 6 + 2 * 6  # each stretch's steps x its global batch
    assert (meta["world_size"], meta["global_batch"]) == (2, 6)
    changes = meta["world_size_changes"]
    assert changes == [_change(2, 6, 1, 2, 3, 6), _change(5, 24, 2, 1, 6, 6), _change(7, 36, 1, 2, 6, 6)]
    assert changes[2]["nimg"] - changes[1]["nimg"] == sum(n for _, n in drawn)  # counted = drawn, at 1 process
    recs = _records(run_dir)
    assert [r["step"] for r in recs] == list(range(1, 10))
    assert [r["kimg"] for r in recs] == [n / 1000 for n in (3, 6, 12, 18, 24, 30, 36, 42, 48)]
    assert all(math.isfinite(r["loss"]) for r in recs) and recs[-1]["nonfinite_total"] == 0
    opt = ckpt.load_state(run_dir / "checkpoints" / "step-00000009" / "optim-unet.pt")
    assert all(int(s["step"]) == 9 for s in opt["state"].values())  # Adam went on counting its steps
    assert ("world size 1 -> 2 process(es) at step 2 (global batch 3 -> 6); 2 -> 1 process(es) at step 5 (global "
            "batch 6 kept); 1 -> 2 process(es) at step 7 (global batch 6 kept)") in screen(run_dir)


@pytest.fixture(scope="module")
def three(chain, tmp_path_factory):
    """The chain's last checkpoint (step 9, written by 2 processes, global batch 6) resumed with 3 processes to step
    11, under DDP and under FSDP2 (the checkpoint's files are the same for both engines), in one 3-process launch
    (global batch 6 kept: 2 per device)."""
    import shutil

    from matrix import launch_matrix

    run_dir, _, _ = chain
    root = tmp_path_factory.mktemp("three")
    spec = []
    for engine in ("ddp", "fsdp2"):
        shutil.copytree(run_dir, root / engine, ignore=shutil.ignore_patterns("step-0000000[2-8]"))
        cfg = yaml.safe_load((run_dir.parent / "c.yaml").read_text())
        cfg["run"]["dir"] = str(root / engine)
        (root / f"{engine}.yaml").write_text(yaml.safe_dump(cfg))
        spec.append({"name": engine, "calls": [{"config": str(root / f"{engine}.yaml"), "overrides": [
            "train.max_steps=11"], "env": {"ACCELERATE_USE_FSDP": "true" if engine == "fsdp2" else "false"}}]})
    return root, launch_matrix(spec, root, 3, "configs/accelerate/fsdp2.yaml", timeout=600)


@pytest.mark.e2e
@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_two_processes_to_three_go_on_under_ddp_and_fsdp2(three, engine):
    root, results = three
    assert [c.get("rc") for c in results[engine]["calls"]] == [0], results[engine]
    run_dir = root / engine
    meta = _meta(run_dir, 11)
    assert (meta["world_size"], meta["global_batch"], meta["nimg"]) == (3, 6, 48 + 2 * 6)  # 6 = 2 per device x 3
    assert meta["world_size_changes"][-1] == _change(9, 48, 2, 3, 6, 6)
    recs = _records(run_dir)
    assert [r["step"] for r in recs][-2:] == [10, 11] and [r["kimg"] for r in recs][-2:] == [0.054, 0.06]
    assert all(math.isfinite(r["loss"]) for r in recs) and recs[-1]["nonfinite_total"] == 0
    opt = ckpt.load_state(run_dir / "checkpoints" / "step-00000011" / "optim-unet.pt")
    assert all(int(s["step"]) == 11 for s in opt["state"].values())  # Adam's states went on, sharded 3 ways or not


@pytest.mark.e2e
@pytest.mark.deepspeed
def test_deepspeed_at_another_process_count_is_refused_by_name_with_the_converter(chain, tmp_path, env):
    """Refused at start-up, before anything is read: without the check, DeepSpeed's own error (ZeRORuntimeException:
    another DP world size) made every such checkpoint 'not load', as if damaged. The checkpoint is the chain's last,
    written by 2 processes, given a DeepSpeed folder (only its meta.json is read before the refusal); one DeepSpeed
    process resumes it (a real DeepSpeed checkpoint of 1 process resumed with 2 was refused alike, by hand)."""
    import shutil

    run_dir, _, _ = chain
    shutil.copytree(run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("step-0000000[2-8]"))
    cp = tmp_path / "run" / "checkpoints" / "step-00000009"
    (cp / "deepspeed" / "unet" / "state").mkdir(parents=True)
    (cp / "deepspeed" / "unet" / "state" / "mp_rank_00_model_states.pt").write_bytes(b"")
    cfg = yaml.safe_load((run_dir.parent / "c.yaml").read_text())
    cfg["run"]["dir"] = str(tmp_path / "run")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    r = _train(1, tmp_path / "c.yaml", 10, env, "configs/accelerate/zero2.yaml", check=False)
    assert r.returncode != 0
    assert (f"distgen: error: {cp}: written by 2 DeepSpeed process(es), resumed with 1: ZeRO partitions the "
            f"optimizer states per process") in r.stderr, r.stdout[-2000:] + r.stderr[-3000:]
    assert (f"Resume with --num_processes 2; DeepSpeed's converter to its universal checkpoint is `python -m "
            f"deepspeed.checkpoint.ds_to_universal --input_folder {cp}/deepspeed/unet/state --output_folder "
            f"{cp}/deepspeed/unet/universal`") in r.stderr
    assert [p.name for p in cp.parent.iterdir() if p.name.startswith("step-")] == [cp.name]  # nothing set aside


# --------------------------------------------------------------------------- the rule and the record, in process
def _meta_of(world: int, batch: int, accum: int = 1, global_batch=None) -> dict:
    m = {"world_size": world, "config": {"train": {"batch_size": batch, "grad_accum": accum}}}
    return m if global_batch is None else {**m, "global_batch": global_batch}


def _tc(batch: int, accum: int = 1):
    return SimpleNamespace(batch_size=batch, grad_accum=accum)


@pytest.mark.parametrize("tc,world,meta,per_device,accum,kept", [
    (_tc(4), 2, None, 4, 1, True),  # a fresh run: the config's
    (_tc(4), 1, _meta_of(2, 4), 8, 1, True),  # 2 -> 1: per device doubled
    (_tc(4, 2), 4, _meta_of(2, 4, 2), 2, 2, True),  # 2 -> 4 with accumulation 2: 16 = 2 x 4 x 2
    (_tc(4), 1, _meta_of(1, 4, global_batch=8), 8, 1, True),  # again at 1 after 2 -> 1: the checkpoint's batch
    (_tc(3), 2, _meta_of(1, 3), 3, 1, False),  # 3 does not divide by 2: per device kept, global 6
    (_tc(4), 3, _meta_of(2, 4), 4, 1, False),  # 8 by 3: per device kept, global 12
    (_tc(6), 1, _meta_of(2, 4), 6, 1, False),  # the config's batch changed on purpose: used as given
])
def test_the_batch_rule(tc, world, meta, per_device, accum, kept):
    plan = plan_batch(tc, world, meta)
    assert (plan.per_device, plan.grad_accum, plan.world) == (per_device, accum, world)
    assert (meta is None or plan.global_batch == plan.was_global) == kept
    assert bool(plan.why) == (not kept)


def test_the_run_length_follows_the_samples_left():
    assert run_length(1, None, 0, 0, 8) == (125, 125)
    assert run_length(0.32, None, 20, 160, 8) == (40, 40)  # one batch all along: the straight run's count
    assert run_length(1, 4, 2, 6, 6) == (168, 4)  # 994 samples left at 6 a step
    assert run_length(0.01, None, 3, 24, 4) == (3, 3)  # already past train.total_kimg


@pytest.mark.parametrize("field,value,said", [
    ("global_batch", 0, "global_batch"),
    ("global_batch", "8", "global_batch"),
    ("world_size_changes", {"step": 1}, "world_size_changes"),
    ("world_size_changes", [_change(3, 24, 2, 0, 8, 8)], "world_size_changes[0].to_world"),
    ("world_size_changes", [_change(3, 24, 2, 1, 8, -1)], "world_size_changes[0].to_global_batch"),
    ("world_size_changes", [{**_change(3, 24, 2, 1, 8, 8), "step": 1.5}], "world_size_changes[0].step"),
    ("world_size_changes", [{k: v for k, v in _change(3, 24, 2, 1, 8, 8).items() if k != "nimg"}], "nimg"),
])
def test_a_malformed_world_size_record_is_named(tmp_path, field, value, said):
    ckpt.write_meta(tmp_path, {"step": 4, "nimg": 32, "world_size": 1, "global_batch": 8,
                               "world_size_changes": [_change(3, 24, 2, 1, 8, 8)]})
    assert ckpt.read_meta(tmp_path)["world_size_changes"] == [_change(3, 24, 2, 1, 8, 8)]
    meta = json.loads((tmp_path / "meta.json").read_text())
    (tmp_path / "meta.json").write_text(json.dumps({**meta, field: value}))
    with pytest.raises(CheckpointError, match=re.escape(said)) as e:
        ckpt.read_meta(tmp_path)
    assert str(e.value).startswith(str(tmp_path / "meta.json"))

"""The trainer, run as users run it: `distgen train` and `accelerate launch` with real processes."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO
from distgen import checkpoint as ckpt
from distgen.ema import HalfLifeEMA
from distgen.dist import free_port
from matrix import launch_matrix

pytestmark = pytest.mark.e2e  # every test trains or launches (make test-fast leaves these out)

ACCEL = [sys.executable, "-m", "accelerate.commands.launch"]


def tiny_config(tmp_path: Path, manifest: Path, **over) -> Path:
    cfg = {
        "run": {"name": "tiny", "dir": str(tmp_path / "run"), "seed": 1},
        "data": {"train": [str(manifest)], "resolution": 28, "channels": 1, "workers": 1, "shuffle_buffer": 100},
        "model": {"family": "diffusion", "preset": "tiny", "sample_steps": 4},
        "train": {"batch_size": 8, "total_kimg": 0.32, "log_every": 5, "checkpoint_every": 10, "sample_every": 0,
                  "sample_num": 4, "keep_checkpoints": 2},
        "ema": {"halflife_kimg": [0.1, 0.5], "rampup": None},
    }
    for k, v in over.items():
        cfg[k].update(v)
    tmp_path.mkdir(parents=True, exist_ok=True)
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def family_config(tmp_path: Path, manifest: Path, sections: dict, over: dict) -> Path:
    """:func:`tiny_config` with ``sections`` (each updated by ``over``'s), whose model section replaces the
    diffusion defaults rather than being merged with them."""
    for k, v in over.items():
        sections.setdefault(k, {}).update(v)
    path = tiny_config(tmp_path, manifest, **sections)
    cfg = yaml.safe_load(path.read_text())
    cfg["model"] = sections["model"]
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(cmd, env, timeout=600, check=True, fresh=False):
    """``cmd`` run as a user would, from the repository: a one-process ``python -m distgen ...`` in this process
    (the CLI's own main, its output captured; no 7 s of imports per call), anything else, or with ``fresh``, as a
    subprocess."""
    if not fresh and list(cmd[:3]) == [sys.executable, "-m", "distgen"]:
        r = in_process([str(c) for c in cmd[3:]], env)
    else:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if check:
        assert r.returncode == 0, f"{' '.join(map(str, cmd))}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


def in_process(argv: list[str], env: dict) -> subprocess.CompletedProcess:
    """`distgen ARGV` through distgen.cli.main in this process, as the subprocess would run it: ``env``'s variables
    set (and its OMP_NUM_THREADS as torch's thread count), the repository as working folder, stdout and stderr
    captured, an uncaught exception a traceback on stderr and exit code 1; signal handlers, warning filters and
    thread count restored afterwards."""
    import contextlib
    import io
    import traceback
    import warnings

    from distgen.cli import main as cli_main

    out, err = io.StringIO(), io.StringIO()
    saved_env, cwd, threads = dict(os.environ), os.getcwd(), torch.get_num_threads()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)}
    os.environ.clear()
    os.environ.update(env)
    if env.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    os.chdir(REPO)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli_main(argv)
            except SystemExit as e:  # argparse
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        torch.set_num_threads(threads)
        for s, h in handlers.items():
            signal.signal(s, h)
    return subprocess.CompletedProcess(["distgen", *argv], code, out.getvalue(), err.getvalue())


def launch(nproc: int, config_file: str = "configs/accelerate/ddp.yaml"):
    if nproc == 1 and config_file.endswith("ddp.yaml"):  # a DeepSpeed config still goes through accelerate
        return [sys.executable, "-m", "distgen"]
    return ACCEL + ["--config_file", config_file, "--num_processes", str(nproc), "--main_process_port",
                    str(free_port()), "-m", "distgen"]


def losses(run_dir: Path) -> list[float]:
    return [json.loads(l)["loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(cp: Path, name: str = "unet.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(cp / name))


def test_one_process_run_folder_export_and_sampling(tmp_path, fm_test_shards, env_with_repo):
    cfg = tiny_config(tmp_path, fm_test_shards, train={"sample_every": 20})
    r = run(launch(1) + ["train", str(cfg)], env_with_repo)
    run_dir = tmp_path / "run"
    assert "global batch 8 = 8 per device x 1 process(es) x 1 accumulation; 40 steps" in r.stdout
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["batch_size"] == 8
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert recs[-1]["kimg"] == pytest.approx(0.32) and all(np.isfinite(r["loss"]) for r in recs)
    assert recs[-1]["loss"] < recs[0]["loss"]  # it learns
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "samples" / "step-00000020.png").is_file() and (run_dir / "samples" / "step-00000040.png").is_file()
    cps = ckpt.complete_checkpoints(run_dir / "checkpoints")
    assert [p.name for p in cps] == ["step-00000030", "step-00000040"]  # keep_checkpoints=2
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-00000040"
    meta = ckpt.read_meta(cps[-1])
    assert meta["step"] == 40 and meta["nimg"] == 320 and meta["world_size"] == 1
    assert sorted(p.name for p in cps[-1].iterdir()) == [
        "ema0-unet.safetensors", "ema1-unet.safetensors", "meta.json", "optim-unet.pt",
        "rng-0.json", "rng-0.safetensors", "unet.safetensors"]
    # two EMA lengths differ from each other and from the raw weights
    raw, e0, e1 = weights(cps[-1]), weights(cps[-1], "ema0-unet.safetensors"), weights(cps[-1], "ema1-unet.safetensors")
    k = "conv_in.weight"
    assert not torch.equal(raw[k], e0[k]) and not torch.equal(e0[k], e1[k])

    # export: a diffusers pipeline that runs without distgen
    out = tmp_path / "export"
    run(launch(1) + ["export", str(run_dir), str(out)], env_with_repo)
    assert torch.equal(load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))[k], e0[k])
    script = (
        "import sys; sys.modules['distgen'] = None\n"  # any import of distgen fails
        "import torch, diffusers\n"
        f"pipe = diffusers.DiffusionPipeline.from_pretrained({str(out)!r})\n"
        "img = pipe(batch_size=2, num_inference_steps=3, output_type='np', generator=torch.manual_seed(0)).images\n"
        "print(type(pipe).__name__, img.shape)\n"
    )
    r = run([sys.executable, "-c", script], {**env_with_repo, "HF_HUB_OFFLINE": "1"})
    assert "DDPMPipeline (2, 28, 28, 1)" in r.stdout

    # sampling: grid, folder, npz; the run folder and the export give the same images
    # (the grid and the folder in this process: the command's own function, without a launch's start-up)
    from distgen.sample import sample_command

    for where in ("g.png", "pngs"):
        assert sample_command(str(out), 5, str(tmp_path / where), options={"steps": 3}) == 0
    assert sample_command(str(run_dir), 5, str(tmp_path / "a.npz"), options={"steps": 3, "sampler": "dpmsolver"}) == 0
    run(launch(1) + ["sample", str(out), "--num", "5", "--steps", "3", "--sampler", "dpmsolver",
                     "--out", str(tmp_path / "b.npz")], env_with_repo)
    from PIL import Image

    assert Image.open(tmp_path / "g.png").size == (92, 62)  # 3 columns x 2 rows of 28px + 2px padding
    assert sorted(p.name for p in (tmp_path / "pngs").iterdir()) == [f"{i:06d}.png" for i in range(5)]
    a, b = np.load(tmp_path / "a.npz")["x"], np.load(tmp_path / "b.npz")["x"]
    assert a.shape == (5, 28, 28, 1) and a.dtype == np.uint8 and np.array_equal(a, b)


def test_sampling_with_two_processes_writes_the_same_files(tmp_path, fm_test_shards, env_with_repo):
    cfg = tiny_config(tmp_path, fm_test_shards, train={"total_kimg": 0.08})
    run(launch(1) + ["train", str(cfg)], env_with_repo)
    from distgen.sample import sample_command

    args = ["sample", str(tmp_path / "run"), "--num", "37", "--steps", "3", "--sampler", "ddpm", "--seed", "5"]
    # one process: the command's own function in this process (its launch is tested above)
    assert sample_command(str(tmp_path / "run"), 37, str(tmp_path / "one.npz"), seed=5,
                          options={"steps": 3, "sampler": "ddpm"}) == 0
    run(launch(2) + args + ["--out", str(tmp_path / "two.npz")], env_with_repo)
    one, two = np.load(tmp_path / "one.npz")["x"], np.load(tmp_path / "two.npz")["x"]
    assert one.shape == (37, 28, 28, 1) and np.array_equal(one, two)
    assert len({one[i].tobytes() for i in range(37)}) == 37  # every image its own seed


def test_bf16_and_gradient_accumulation(tmp_path, fm_test_shards, env_with_repo):
    cfg = tiny_config(tmp_path, fm_test_shards, train={"mixed_precision": "bf16", "grad_accum": 2, "total_kimg": 0.08},
                      model={"prediction": "v_prediction", "beta_schedule": "cosine"})
    r = run(launch(1) + ["train", str(cfg)], env_with_repo)
    assert "mixed precision bf16" in r.stdout
    assert "global batch 16 = 8 per device x 1 process(es) x 2 accumulation; 5 steps" in r.stdout
    meta = ckpt.read_meta(tmp_path / "run" / "checkpoints" / "step-00000005")
    assert meta["nimg"] == 80 and all(np.isfinite(losses(tmp_path / "run")))


def test_zero3_ema_matches_ddp(tmp_path, fm_test_shards, env_with_repo):
    """Under ZeRO-3 parameters are partitioned, and so are the EMAs (each rank keeps its partition of every EMA,
    gathered whole to sample and save); they must still follow the parameters, as DDP's whole EMAs do."""
    ddp = tiny_config(tmp_path / "ddp", fm_test_shards, train={"total_kimg": 0.08, "checkpoint_every": 4})
    z3 = tiny_config(tmp_path / "z3", fm_test_shards, train={"total_kimg": 0.08, "checkpoint_every": 4})
    # both in one 2-process launch of the ZeRO-3 config, the first with DeepSpeed off (DDP; first: once a ZeRO-3
    # engine exists, DeepSpeed keeps F.linear replaced by its own for the process)
    spec = [{"name": n, "calls": [{"config": str(c), "env": {"ACCELERATE_USE_DEEPSPEED": ds}}]}
            for n, c, ds in (("ddp", ddp, "false"), ("z3", z3, "true"))]
    results = launch_matrix(spec, tmp_path, 2, "configs/accelerate/zero3.yaml")
    assert [c.get("rc") for n in ("ddp", "z3") for c in results[n]["calls"]] == [0, 0], results
    assert not (tmp_path / "ddp" / "run" / "checkpoints" / "step-00000005" / "deepspeed").exists()
    out = (tmp_path / "launch.out").read_text()
    assert "ZeRO-3" in out
    a = weights(tmp_path / "ddp" / "run" / "checkpoints" / "step-00000005", "ema1-unet.safetensors")
    b = weights(tmp_path / "z3" / "run" / "checkpoints" / "step-00000005", "ema1-unet.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    # Rank 0 holds its partition of both EMAs: half of every parameter, rounded up (DeepSpeed pads each to an even
    # count), not a whole copy
    shards = re.search(r"EMAs kept as shards.*: unet (\d+) of (\d+) values on rank 0", out)
    assert shards, out[-3000:]
    held, whole = map(int, shards.groups())
    params = [k for k in a if a[k].is_floating_point()]
    assert whole == 2 * sum(a[k].numel() for k in params), (whole, params)
    assert whole / 2 <= held <= whole / 2 + 2 * len(params), (held, whole)
    # The partitions' update is the whole EMAs' update, bit for bit: step 5's EMAs from step 4's and step 5's
    # weights of this run (DeepSpeed's float32 master, consolidated from its partitions), updated whole as the EMAs
    # were before ZeRO-3's EMAs were partitioned
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    z3cp = tmp_path / "z3" / "run" / "checkpoints"
    raw = get_fp32_state_dict_from_zero_checkpoint(str(z3cp / "step-00000005" / "deepspeed" / "unet"), tag="state")
    for i, halflife in enumerate((100, 500)):
        start = weights(z3cp / "step-00000004", f"ema{i}-unet.safetensors")
        e = HalfLifeEMA([start[k] for k in params], halflife, None)
        e.cur_nimg, e.batch = 80, 16
        e.step([raw[k] for k in params], keep=torch.tensor(True), trainable=[True] * len(params))
        got = weights(z3cp / "step-00000005", f"ema{i}-unet.safetensors")
        assert all(torch.equal(got[k], s) for k, s in zip(params, e.shadow_params)), i
    # Step 5 moved the EMA from its step-4 value by EDM's half-life update: ema_5 = beta ema_4 + (1 - beta) raw_5,
    # beta = 0.5 ** (16 / 500) (global batch 2 x 8, ema.halflife_kimg 0.5, no ramp-up); a frozen EMA, or another
    # beta, fails. float32 (s -= (1 - beta) (s - p)): four roundings of relative 2^-24, each of a value at most
    # |ema_4| + |raw_5|, so within 2^-22 (|ema_4| + |raw_5|).
    start = weights(tmp_path / "ddp" / "run" / "checkpoints" / "step-00000004", "ema1-unet.safetensors")
    raw = weights(tmp_path / "ddp" / "run" / "checkpoints" / "step-00000005")
    beta = 0.5 ** (16 / 500)
    for k in a:
        s, r = start[k].double(), raw[k].double()
        assert ((a[k].double() - (beta * s + (1 - beta) * r)).abs() <= 2 ** -22 * (s.abs() + r.abs())).all(), k


def test_sigterm_checkpoints_and_exits_for_requeue(tmp_path, fm_test_shards, env_with_repo):
    cfg = tiny_config(tmp_path, fm_test_shards, train={"total_kimg": 100, "log_every": 1, "checkpoint_every": 1000})
    # Its own process group, signalled whole as SLURM does: DataLoader workers get SIGTERM too.
    proc = subprocess.Popen(launch(1) + ["train", str(cfg)], env=env_with_repo, cwd=REPO, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    cps = ckpt.complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert len(cps) == 1
    meta = ckpt.read_meta(cps[0])
    assert meta["reason"] == "preempted" and meta["step"] >= 3
    assert f"checkpoint {cps[0]} written at step {meta['step']}; exiting with 75" in out
    # The requeued job continues from there.
    r = run(launch(1) + ["train", str(cfg), f"train.max_steps={meta['step'] + 2}"], env_with_repo)
    assert f"(step {meta['step']}," in r.stdout and f"done at step {meta['step'] + 2}" in r.stdout


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path, fm_test_shards, env_with_repo):
    # lr=1e30 without clipping: the first update blows the weights up and every later loss is inf/nan.
    cfg = tiny_config(tmp_path, fm_test_shards, train={"lr": 1e30, "grad_clip": 0.0, "checkpoint_every": 1,
                                                        "max_nonfinite": 3, "log_every": 1})
    r = run(launch(1) + ["train", str(cfg)], env_with_repo, check=False)
    assert r.returncode == 2
    good = tmp_path / "run" / "checkpoints" / "step-00000001"
    assert f"3 non-finite steps in a row (step 4); stopping without saving: the last good checkpoint is {good}" in r.stderr
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-00000001"]
    assert all(torch.isfinite(t).all() for t in weights(good).values())
    rec = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rec[-1]["step"] == 4 and rec[-1]["nonfinite_total"] == 3 and rec[-1]["loss"] is None


def test_impossible_combination_fails_at_start(tmp_path, fm_test_shards, env_with_repo):
    cfg = tiny_config(tmp_path, fm_test_shards, train={"mixed_precision": "fp16"})
    r = run(launch(1) + ["train", str(cfg)], env_with_repo, check=False)
    assert r.returncode == 2 and "train.mixed_precision=fp16 needs a GPU" in r.stderr
    cfg = tiny_config(tmp_path, fm_test_shards, model={"class_conditional": True})
    bad = tmp_path / "nolabels.json"
    m = json.loads(fm_test_shards.read_text())
    m.update(num_classes=0, class_names=[])
    for s in m["shards"]:  # a manifest names its shards relative to itself, inside its folder: copies beside it
        shutil.copyfile(fm_test_shards.parent / s["name"], tmp_path / s["name"])
    bad.write_text(json.dumps(m))
    r = run(launch(1) + ["train", str(cfg), f"data.train=[{bad}]"], env_with_repo, check=False)
    assert r.returncode == 2 and "model.class_conditional needs labelled data" in r.stderr


def test_class_conditional_training_guidance_and_export(tmp_path, fm_test_shards, env_with_repo):
    cfg = tiny_config(tmp_path, fm_test_shards, model={"class_conditional": True, "label_dropout": 0.2},
                      data={"labels": True}, train={"total_kimg": 0.08})
    run(launch(1) + ["train", str(cfg)], env_with_repo)
    base = ["sample", str(tmp_path / "run"), "--num", "12", "--steps", "3"]
    run(launch(1) + base + ["--guidance", "3", "--out", str(tmp_path / "g3.npz")], env_with_repo)
    g3 = np.load(tmp_path / "g3.npz")
    assert list(g3["y"]) == [i % 10 for i in range(12)]  # labels cycle over the classes
    from distgen.export.native import export
    from distgen.sample import generate, load_ema

    g1 = generate(*load_ema(tmp_path / "run")[:2], 12, options={"steps": 3})  # guidance 1, in this process
    assert not np.array_equal(np.stack([g1[i][0] for i in range(12)]), g3["x"])  # guidance changes the images
    out = export(tmp_path / "run", tmp_path / "export")
    script = (
        "import sys; sys.modules['distgen'] = None\n"
        "import torch, diffusers\n"
        f"pipe = diffusers.DiffusionPipeline.from_pretrained({str(out)!r}, trust_remote_code=True)\n"
        "img = pipe(class_labels=[1, 7], guidance_scale=2.0, num_inference_steps=3, output_type='np',\n"
        "           generator=torch.manual_seed(0)).images\n"
        "print(type(pipe).__name__, img.shape)\n"
    )
    r = run([sys.executable, "-c", script], {**env_with_repo, "HF_HUB_OFFLINE": "1"})
    assert "ClassConditionalDDPMPipeline (2, 28, 28, 1)" in r.stdout
    run(launch(1) + ["sample", str(out), "--num", "12", "--steps", "3", "--guidance", "3",
                     "--out", str(tmp_path / "e3.npz")], env_with_repo)
    assert np.array_equal(np.load(tmp_path / "e3.npz")["x"], g3["x"])

"""Peak memory per rank and samples/s of `distgen train` under each engine, with and without activation
checkpointing, at 1 and 2 processes (issue 41's benchmark). One table:

    python benchmarks/memory.py                                   # a GPU box: ddpm-cifar10 U-Net and StyleGAN2
    python benchmarks/memory.py --models unet --unet-preset tiny --gan-preset tiny --batch 4 --steps 4   # CPU smoke

Each cell is a real `accelerate launch ... -m distgen train` (the engine from configs/accelerate/<engine>.yaml),
read back from the run's metrics.jsonl: ``peak_mem_gib`` (the fullest rank's: CUDA's max allocated, on CPU the
process's peak resident set; each record's since the one before), ``state_gib`` (the model state the fullest rank
holds, counted from the tensors: parameters, gradients, optimizer states) and ``samples_per_s``, after the warm-up
record.
Every cell runs at two batch sizes, B and 2B per device, to split the peak into what does not grow with the batch
(parameters, gradients, optimizer states, EMAs; on CPU also the process's libraries) and what does (activations):

    activation(B) = peak(2B) - peak(B)        static = peak(B) - activation(B)

On CPU the static part holds the interpreter and its libraries (several hundred MB, more with DeepSpeed):
``--baseline`` subtracts the same launch's static part with the model at its ``tiny`` preset, which leaves the
model's own state. The goals printed beside the table (issue 41, 2 processes): FSDP2's static state <= 0.55x
DDP's, activation checkpointing's activations <= 0.5x without, at >= 0.75x DDP's speed.
An engine a family cannot run (a GAN under ZeRO-3) shows the refusal's first words, not a number.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

ENGINES = ("ddp", "zero2", "zero3", "fsdp2")


def model_section(model: str, a) -> dict:
    if model == "unet":
        return {"family": "diffusion", "preset": a.unet_preset}
    return {"family": "gan", "arch": "stylegan2", "preset": a.gan_preset, "r1_gamma": 0.0, "pl_weight": 0.0}


def run_cell(a, tmp: Path, manifest: Path, model: str, engine: str, nproc: int, ckpt: bool, batch: int,
             preset: Optional[str] = None) -> dict:
    """One launch: {"peak": GiB, "ips": samples/s} or {"error": first line of the refusal}."""
    from distgen.dist import free_port

    name = f"{model}-{engine}-{nproc}p-{'ac' if ckpt else 'noac'}-b{batch}-{preset or 'model'}"
    section = model_section(model, a)
    if preset:
        section["preset"] = preset
    cfg = {"run": {"name": name, "dir": str(tmp / name), "seed": 0},
           "data": {"train": [str(manifest)], "resolution": a.resolution, "channels": a.channels,
                    "workers": a.workers, "shuffle_buffer": 256},
           "model": section,
           "train": {"batch_size": batch, "total_kimg": 1e6, "max_steps": a.warmup + a.steps, "lr": 1e-4,
                     "mixed_precision": a.precision, "log_every": a.warmup, "checkpoint_every": 10 ** 9,
                     "sample_every": 0, "sample_num": 1, "activation_checkpointing": ckpt}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    accel = REPO / "configs" / "accelerate" / f"{engine}.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accel), "--num_processes",
           str(nproc), "--main_process_port", str(free_port())]
    # no --cpu on a CPU machine: with it accelerate launch starts one process whatever --num_processes says, and
    # drops the FSDP request (gloo runs every engine here without it)
    cmd += ["-m", "distgen", "train", str(path)]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=a.timeout)
    if r.returncode != 0:
        line = next((ln for ln in r.stderr.splitlines() if ln.startswith("distgen: error:")), None)
        return {"error": (line or r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"rc {r.returncode}")}
    recs = [json.loads(ln) for ln in (tmp / name / "metrics.jsonl").read_text().splitlines()]
    timed = [x for x in recs if x["step"] > a.warmup] or recs[-1:]
    # each record's peak is its interval's (distgen.telemetry): after the warm-up, the steady state, not the
    # start-up's whole network before sharding
    from distgen import checkpoint as ckpt

    world = ckpt.read_meta(ckpt.complete_checkpoints(tmp / name / "checkpoints")[-1])["world_size"]
    if world != nproc:  # the cell would not be what its row says
        return {"error": f"ran {world} process(es), not {nproc}"}
    return {"peak": max(x["peak_mem_gib"] for x in timed), "ips": timed[-1]["samples_per_s"],
            "state": timed[-1].get("state_gib")}


def cell(a, tmp, manifest, model, engine, nproc, ckpt) -> dict:
    """Both batch sizes of one configuration, and the split into static and activation memory."""
    one = run_cell(a, tmp, manifest, model, engine, nproc, ckpt, a.batch)
    if "error" in one:
        return one
    two = run_cell(a, tmp, manifest, model, engine, nproc, ckpt, 2 * a.batch)
    if "error" in two:
        return two
    act = two["peak"] - one["peak"]
    out = {"peak": one["peak"], "ips": one["ips"], "act": act, "static": one["peak"] - act, "state": one["state"]}
    if a.baseline:  # the launch's own static part (libraries, interpreter) with the model at its smallest
        base = run_cell(a, tmp, manifest, model, engine, nproc, False, a.batch, preset="tiny")
        if "error" not in base:
            out["static"] -= base["peak"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="unet,stylegan2", help="comma-separated: unet (diffusion), stylegan2")
    ap.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated of {', '.join(ENGINES)}")
    ap.add_argument("--nproc", default="1,2", help="process counts")
    ap.add_argument("--unet-preset", default="ddpm-cifar10")
    ap.add_argument("--gan-preset", default="small")
    ap.add_argument("--batch", type=int, default=32, help="per device; every cell also runs at twice this")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--channels", type=int, default=3, choices=(1, 3))
    ap.add_argument("--steps", type=int, default=10, help="steps after --warmup")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--precision", choices=("no", "bf16", "fp16"), default=None, help="default: bf16")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--baseline", action="store_true", help="subtract the launch's static part at the tiny preset")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per launch")
    a = ap.parse_args()
    import torch

    from gpu_throughput import random_shards

    a.cpu = not torch.cuda.is_available()
    a.precision = a.precision or "bf16"
    engines = [e for e in a.engines.split(",") if e]
    missing = [e for e in engines if not (REPO / "configs" / "accelerate" / f"{e}.yaml").is_file()]
    if missing:
        sys.exit(f"--engines: no configs/accelerate/{missing[0]}.yaml")
    device = torch.cuda.get_device_name() if not a.cpu else "CPU (peak resident set per process)"
    print(f"device {device}; {a.precision}; batch {a.batch} and {2 * a.batch} per device; "
          f"{a.channels}x{a.resolution}x{a.resolution}; {a.steps} steps after {a.warmup}")
    rows = []
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        shards = argparse.Namespace(batch=2 * a.batch * 2, steps=a.steps, warmup=a.warmup, resolution=a.resolution,
                                    channels=a.channels)
        manifest = random_shards(tmp, shards)
        for model in a.models.split(","):
            for nproc in (int(n) for n in a.nproc.split(",")):
                for engine in engines:
                    for ckpt in (False, True):
                        r = cell(a, tmp, manifest, model, engine, nproc, ckpt)
                        rows.append((model, nproc, engine, ckpt, r))
                        print(f"  {model} {nproc}p {engine} ac={ckpt}: {r}", flush=True)
    print()
    print("| model | procs | engine | act. ckpt | peak GiB/rank | static GiB | activations GiB | state GiB/rank | "
          "samples/s | static / DDP's | state / DDP's | activations / without | speed / plain DDP's |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    ref = {(m, n, c): r for m, n, e, c, r in rows if e == "ddp" and "error" not in r}
    plain = {(m, n, e): r for m, n, e, c, r in rows if not c and "error" not in r}
    for model, nproc, engine, ckpt, r in rows:
        head = f"| {model} | {nproc} | {engine} | {'on' if ckpt else 'off'} |"
        if "error" in r:
            why = r["error"].removeprefix("distgen: error: ")
            why = why if len(why) <= 100 else why[:100].rsplit(" ", 1)[0] + " ..."  # a table cell, cut at a word
            print(f"{head} {why} |||||||||")
            continue
        # speed against DDP without checkpointing: the recomputation's cost shows in the checkpointed rows
        d, p, base = ref.get((model, nproc, ckpt)), plain.get((model, nproc, engine)), ref.get((model, nproc, False))
        ratio = (lambda x, y: f"{x / y:.2f}" if y and y > 0 else "-")
        print(f"{head} {r['peak']:.3f} | {r['static']:.3f} | {r['act']:.3f} | {r['state']:.4f} | {r['ips']:.1f} | "
              f"{ratio(r['static'], d and d['static'])} | {ratio(r['state'], d and d['state'])} | "
              f"{ratio(r['act'], p and p['act']) if ckpt else '-'} | {ratio(r['ips'], base and base['ips'])} |")
    print("\ngoals (2 processes): FSDP2 static / DDP's <= 0.55 (state / DDP's: the same counted from the tensors, "
          "without what the allocator adds); activations with checkpointing / without <= 0.5; "
          "speed / plain DDP's >= 0.75")


if __name__ == "__main__":
    main()

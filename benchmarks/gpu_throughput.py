"""`distgen train`'s step against a plain and a tuned PyTorch loop, on one device (issue 21's benchmark).

    python benchmarks/gpu_throughput.py --preset ddpm-cifar10 --batch 128            # a GPU, bf16
    python benchmarks/gpu_throughput.py --preset small --batch 256 --resolution 28 --channels 1 \\
        --manifest data/fashion-mnist/train.manifest.json                             # the demo's U-Net
    python benchmarks/gpu_throughput.py --preset tiny --batch 8 --steps 4 --warmup 2 --no-compile  # a CPU smoke run

The three loops train the same diffusion U-Net (diffusers' UNet2DModel, distgen's preset) with the same
batch, precision and DDPM loss:

- plain: in the style of diffusers' train_unconditional.py: autocast, AdamW, an EMA step, data already
  on the device;
- tuned: the plain loop + torch.compile + channels_last + fused AdamW + TF32 (PyTorch's standard tools);
- distgen: `distgen train` with its defaults (speed switches "auto"), real shards through its loader,
  one process; its samples/s from metrics.jsonl after the warm-up record.

Prints img/s of each, the ratios distgen/tuned and distgen/plain, and the model FLOP utilisation of each
(matmul/conv FLOPs of one training step counted with torch.utils.flop_counter, against --peak-tflops,
by default the bf16 dense peak of a known GPU). Without --manifest, random images are sharded to a
temporary folder.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets (SXM parts).
PEAK_BF16 = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def unet(preset: str, res: int, ch: int):
    from diffusers import UNet2DModel

    from distgen.config.backbones import UNET_PRESETS as PRESETS

    return UNet2DModel(sample_size=res, in_channels=ch, out_channels=ch, **PRESETS[preset])


def loop(a, device: torch.device, tuned: bool) -> tuple[float, float]:
    """(img/s, FLOPs per step) of a hand-written loop."""
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    net = unet(a.preset, a.resolution, a.channels).to(device)
    sched = DDPMScheduler(num_train_timesteps=1000)
    alphas = sched.alphas_cumprod.to(device)
    if tuned and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    fmt = torch.channels_last if tuned else torch.contiguous_format
    net = net.to(memory_format=fmt)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, **({"fused": True} if tuned else {}))
    ema = [p.detach().clone() for p in net.parameters()]
    step_net = torch.compile(net) if tuned and a.compile else net
    x0 = (torch.rand(a.batch, a.channels, a.resolution, a.resolution, device=device) * 2 - 1).to(memory_format=fmt)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(a.precision)

    def step():
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (a.batch,), device=device)
        s = alphas[t].view(-1, 1, 1, 1)
        xt = s.sqrt() * x0 + (1 - s).sqrt() * noise
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            pred = step_net(xt, t).sample
        loss = F.mse_loss(pred.float(), noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(ema, list(net.parameters()), 1e-3)

    for _ in range(a.warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    sync(device)
    ips = a.steps * a.batch / (time.perf_counter() - t0)
    return ips, step_flops(net, x0, dtype)


def step_flops(net, x0, dtype) -> float:
    """Matmul/conv FLOPs of one forward and backward at this batch (PyTorch's FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    t = torch.zeros(x0.shape[0], dtype=torch.long, device=x0.device)
    with FlopCounterMode(display=False) as fc:
        with torch.autocast(x0.device.type, dtype=dtype, enabled=dtype is not None):
            out = net(x0, t).sample
        out.float().square().mean().backward()
    net.zero_grad(set_to_none=True)
    return float(fc.get_total_flops())


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_shards(folder: Path, a) -> Path:
    from distgen.data import write_shards
    from distgen.data.sources import open_source

    n = max(a.batch * (a.steps + a.warmup + 2), 512)
    shape = (n, a.resolution, a.resolution) + ((3,) if a.channels == 3 else ())
    np.savez(folder / "random.npz", x=np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8))
    write_shards(open_source(f"npz:{folder / 'random.npz'}", "train"), folder / "shards", "train",
                 samples_per_shard=max(n // 4, 1))
    return folder / "shards" / "train.manifest.json"


def distgen_train(a, tmp: Path) -> float:
    manifest = a.manifest or str(random_shards(tmp, a))
    cfg = {"run": {"name": "bench", "dir": str(tmp / "run")},
           "data": {"train": [manifest], "resolution": a.resolution, "channels": a.channels, "workers": a.workers,
                    "shuffle_buffer": 1000},
           "model": {"family": "diffusion", "preset": a.preset},
           "train": {"batch_size": a.batch, "total_kimg": 1e6, "max_steps": a.warmup + a.steps, "lr": 1e-4,
                     "mixed_precision": a.precision, "log_every": a.warmup, "checkpoint_every": 10 ** 9,
                     "sample_every": 0, "sample_num": 1}}
    (tmp / "bench.yaml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "distgen", "train", str(tmp / "bench.yaml")], capture_output=True,
                       text=True, cwd=REPO)
    if r.returncode != 0:
        sys.exit(f"distgen train failed:\n{r.stderr[-3000:]}")
    speed_line = next((ln for ln in r.stdout.splitlines() if ln.startswith("distgen: speed:")), "")
    print(f"  {speed_line}")
    recs = [json.loads(ln) for ln in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    timed = [x for x in recs if x["step"] > a.warmup]  # the records after the warm-up interval
    secs = sum((x["step"] - p["step"]) * a.batch / x["samples_per_s"] for p, x in zip(recs, recs[1:]) if x in timed)
    return sum(x["step"] - p["step"] for p, x in zip(recs, recs[1:]) if x in timed) * a.batch / secs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="ddpm-cifar10")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--channels", type=int, default=3, choices=(1, 3))
    ap.add_argument("--steps", type=int, default=100, help="timed steps, after --warmup")
    ap.add_argument("--warmup", type=int, default=20, help="steps before timing (compilation happens here)")
    ap.add_argument("--precision", choices=("no", "bf16", "fp16"), default=None, help="default: bf16 on CUDA, no on CPU")
    ap.add_argument("--manifest", help="shards for distgen train (default: random images sharded to a temp folder)")
    ap.add_argument("--workers", type=int, default=6, help="distgen's loader workers")
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="the tuned loop without torch.compile (a CPU smoke run: inductor's C++ build takes minutes)")
    ap.add_argument("--peak-tflops", type=float, help="the device's peak for the precision (default: known GPUs' bf16)")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    a.precision = a.precision or ("bf16" if device.type == "cuda" else "no")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    peak = a.peak_tflops or next((v for k, v in PEAK_BF16.items() if k in name), None)
    print(f"device {name}, preset {a.preset}, batch {a.batch}, {a.channels}x{a.resolution}x{a.resolution}, "
          f"precision {a.precision}, {a.steps} timed steps after {a.warmup}"
          + ("" if a.compile else "; tuned loop without torch.compile (--no-compile)"))
    plain, flops = loop(a, device, tuned=False)
    tuned, _ = loop(a, device, tuned=True)
    with tempfile.TemporaryDirectory() as tmp:
        ours = distgen_train(a, Path(tmp))

    def row(label, ips):
        tflops = ips / a.batch * flops / 1e12
        mfu = f"{100 * tflops / peak:5.1f}% of {peak:g}" if peak else "n/a (no --peak-tflops)"
        print(f"{label:14s} {ips:10.1f} img/s   {tflops:8.3f} TFLOP/s   MFU {mfu}")

    print(f"FLOP count: {flops / 1e9:.2f} GFLOP per training step (matmul/conv, forward + backward)")
    row("plain loop", plain)
    row("tuned loop", tuned)
    row("distgen train", ours)
    print(f"distgen / tuned {ours / tuned:.3f}   distgen / plain {ours / plain:.3f}   tuned / plain {tuned / plain:.3f}")


if __name__ == "__main__":
    main()

"""`distgen train` step throughput against a bare PyTorch loop (bare_loop.py).

Same U-Net preset, batch, data (Fashion-MNIST shards) and process count.
Prints samples/s of both and their ratio (goal: >= 0.95).

    python benchmarks/train_throughput.py [--nproc 2] [--preset small] [--batch 32] [--steps 60]

Needs Fashion-MNIST shards: `make demo` writes them to data/fashion-mnist/.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=32, help="per process")
    ap.add_argument("--steps", type=int, default=60, help="timed steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--manifest", default=str(REPO / "data/fashion-mnist/train.manifest.json"))
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs of each; best is kept")
    a = ap.parse_args()
    if not Path(a.manifest).is_file():
        sys.exit(f"{a.manifest}: missing; run `make demo` or `distgen data shard fashion-mnist data/fashion-mnist`")
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={a.nproc}"]
    bare, ours = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            out = subprocess.run(torchrun + [str(REPO / "benchmarks/bare_loop.py"), a.manifest, a.preset,
                                             str(a.batch), str(a.steps), str(a.warmup)],
                                 capture_output=True, text=True, check=True).stdout
            bare.append(float(re.search(r"bare: ([\d.]+)", out).group(1)))
            run_dir = Path(tmp) / f"run{r}"
            cfg = {"run": {"name": "bench", "dir": str(run_dir)},
                   "data": {"train": [a.manifest], "resolution": 28, "channels": 1, "workers": 1, "shuffle_buffer": 500},
                   "model": {"family": "diffusion", "preset": a.preset},
                   "train": {"batch_size": a.batch, "total_kimg": 1e6, "max_steps": a.warmup + a.steps, "lr": 1e-4,
                             "log_every": a.warmup, "checkpoint_every": 10 ** 9, "sample_every": 0, "sample_num": 1}}
            (Path(tmp) / "bench.yaml").write_text(yaml.safe_dump(cfg))
            subprocess.run(torchrun + ["-m", "distgen", "train", str(Path(tmp) / "bench.yaml")],
                           capture_output=True, text=True, check=True)
            recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
            # Intervals after the warm-up one, weighted by their steps.
            steps = [x["step"] - p["step"] for p, x in zip(recs, recs[1:])]
            secs = sum(s * a.batch * a.nproc / x["samples_per_s"] for s, x in zip(steps, recs[1:]))
            ours.append(sum(steps) * a.batch * a.nproc / secs)
    b, o = max(bare), max(ours)
    print(f"{a.nproc} process(es), preset {a.preset}, batch {a.batch}/process, {a.steps} timed steps, best of {a.repeats}:")
    print(f"  bare PyTorch loop: {b:8.2f} samples/s   (runs: {', '.join(f'{x:.1f}' for x in bare)})")
    print(f"  distgen train:     {o:8.2f} samples/s   (runs: {', '.join(f'{x:.1f}' for x in ours)})")
    print(f"  ratio:             {o / b:8.3f}   (goal >= 0.95)")


if __name__ == "__main__":
    main()

"""Feature-extraction throughput of distributed evaluation against torch-fidelity alone.

    python benchmarks/eval_features.py [--images M] [--threads T] [--weights PATH]

Times InceptionV3 feature extraction of M Fashion-MNIST images (decoded from
webdataset shards, features gathered to rank 0 in input order, as
``distgen eval`` does for reference statistics) with 1 and with 2 processes,
and torch-fidelity's own single-process extraction loop
(``get_featuresdict_from_dataset``) on the same images held in memory.
Prints images/s and the ratios. Goals: 2 processes >= 1.7x one, and one
process >= 1.0x torch-fidelity.

Each process gets T CPU threads (default 1): a process stands for one
device, as each would own one GPU on a cluster; without the limit one CPU
process would already use every core. Without real InceptionV3 weights
(no internet here) randomly initialised ones are used: the arithmetic is
the same, which is all a timing needs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, os, sys, time, torch
torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
from accelerate import PartialState
from distgen import dist
from distgen.config import DataConfig
from distgen.evaluate import EvalSpec, Evaluator
state = PartialState(cpu=True)
spec = EvalSpec(metrics=("fid", "kid"), ref=[sys.argv[1]], batch_size=32, inception_weights=sys.argv[2],
                cache_dir=sys.argv[3])
ev = Evaluator(spec, "cpu", log=lambda s: None)
cfg = DataConfig(resolution=28, channels=1, workers=1)
dist.barrier()
t0 = time.perf_counter()
ref = ev.reference(cfg)
dist.barrier()
dt = time.perf_counter() - t0
if dist.is_main():
    print(json.dumps({"images": ref.num, "seconds": dt, "cache": ref.cache}))
"""


def distgen_rate(nproc: int, manifest: Path, weights: Path, threads: int, tmp: Path) -> float:
    from distgen.dist import free_port

    script = tmp / "worker.py"
    script.write_text(WORKER)
    cache = tmp / f"cache-{nproc}-{time.time_ns()}"  # a fresh cache: every run extracts
    env = {**os.environ, "BENCH_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if nproc == 1:
        cmd = [sys.executable, str(script)]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs/accelerate/ddp.yaml"), "--num_processes", str(nproc),
               "--main_process_port", str(free_port()), str(script)]
    out = subprocess.run(cmd + [str(manifest), str(weights), str(cache)], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"benchmark worker failed:\n{out.stderr[-3000:]}")
    res = json.loads([l for l in out.stdout.splitlines() if l.startswith("{")][-1])
    return res["images"] / res["seconds"]


def fidelity_rate(images, weights: Path, threads: int) -> float:
    import torch
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    torch.set_num_threads(threads)

    class Images(torch.utils.data.Dataset):
        def __init__(self, x):
            self.x = torch.from_numpy(x)[:, None].expand(-1, 3, -1, -1).contiguous()

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i]

    fe = create_feature_extractor("inception-v3-compat", ["2048"], cuda=False,
                                  feature_extractor_weights_path=str(weights), verbose=False)
    t0 = time.perf_counter()
    feats = get_featuresdict_from_dataset(Images(images), fe, batch_size=32, cuda=False, save_cpu_ram=True,
                                          verbose=False)
    dt = time.perf_counter() - t0
    assert len(feats["2048"]) == len(images)
    return len(images) / dt


def main() -> None:
    import itertools

    import numpy as np
    import torch

    from distgen.data import write_shards
    from distgen.data.sources import open_source
    from distgen.evaluate.extractors import write_random_inception

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=128, help="images to extract features from (M)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    p.add_argument("--weights", default=None, help="InceptionV3 weights (default: random ones)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        items = list(itertools.islice(open_source("fashion-mnist", "test").items(), a.images))
        x = np.stack([i[0] for i in items])
        np.savez(tmp / "m.npz", x=x)
        write_shards(f"npz:{tmp / 'm.npz'}", tmp / "shards", "test", samples_per_shard=64)
        weights = Path(a.weights) if a.weights else write_random_inception(
            tmp / "inception.pth", images=torch.from_numpy(x[:24])[:, None].expand(-1, 3, -1, -1).contiguous())
        manifest = tmp / "shards" / "test.manifest.json"
        tf = fidelity_rate(x, weights, a.threads)
        one = distgen_rate(1, manifest, weights, a.threads, tmp)
        two = distgen_rate(2, manifest, weights, a.threads, tmp)
    print(f"InceptionV3 features of {a.images} 28x28 images, {a.threads} CPU thread(s) per process:")
    print(f"  torch-fidelity alone (1 process):   {tf:8.2f} images/s")
    print(f"  distgen, 1 process:                 {one:8.2f} images/s   {one / tf:.2f}x torch-fidelity")
    print(f"  distgen, 2 processes:               {two:8.2f} images/s   {two / one:.2f}x one process")


if __name__ == "__main__":
    main()

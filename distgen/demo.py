"""``make demo``: the main job on the bundled default data set (Fashion-MNIST from Debian)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from distgen.assets import asset
from distgen.config import DataConfig
from distgen.data import make_loader, manifest_path, write_shards
from distgen.data.bench import run_bench
from distgen.data.manifest import read_manifest

DATA_DIR = Path("data/fashion-mnist")


def ensure_shards(out: Path = DATA_DIR) -> dict[str, Path]:
    """Shard Fashion-MNIST's train and test splits once; later calls reuse them."""
    paths = {}
    for split in ("train", "test"):
        mp = manifest_path(out, split)
        if mp.is_file() and all((out / s["name"]).is_file() for s in read_manifest(mp)["shards"]):
            print(f"shards: reusing {mp}")
        else:
            t0 = time.time()
            m = write_shards("fashion-mnist", out, split, samples_per_shard=5000)
            print(f"shards: {m['total']} {split} images in {len(m['shards'])} shards ({time.time() - t0:.0f}s) -> {mp}")
        paths[split] = mp
    return paths


# Packaged copies of configs/fashion_mnist_diffusion.yaml and configs/accelerate/ddp.yaml: `distgen demo` runs
# from any folder, without the source tree (its data/ and runs/ go in the current folder).
CONFIG = str(asset("demo", "fashion_mnist_diffusion.yaml"))
DDP_CONFIG = str(asset("accelerate", "ddp.yaml"))
RUN_DIR = Path("runs/demo")
EXPORT_DIR = Path("runs/demo-export")
GRID = Path("runs/demo-samples.png")
FEATURES = "fashion-mnist"  # the bundled domain extractor (distgen/assets), see docs/evaluation.md
EVAL_OUT = Path("runs/demo-eval.json")


def _step(title: str, cmd: list[str]) -> None:
    print(f"\n== {title}\n$ {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True)


def demo() -> int:
    """Shard Fashion-MNIST, train the small pixel-diffusion model (flow matching on the small U-Net) with 2 CPU
    processes, export, sample, evaluate. Sampling and evaluation use the model's own sampler and steps (Euler, 25
    network evaluations an image)."""
    t0 = time.time()
    paths = ensure_shards()
    cfg = DataConfig(resolution=28, channels=1, workers=2)
    loader = make_loader(str(paths["test"]), cfg, batch_size=500, mode="eval")
    keys = [k for b in loader for k in b["key"]]
    print(f"evaluation pass over {paths['test']}: {loader.count} samples, {len(set(keys))} distinct keys")
    print("loader throughput (decoded images/s):")
    run_bench([str(paths["train"])], workers=(1, 2), batch_size=256, seconds=2.0, repeats=1)

    exe = [sys.executable, "-m", "distgen"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", DDP_CONFIG,
              "--num_processes", "2", "-m", "distgen"]
    # A finished run folder says so and stops at once: re-running is cheap. The export replaces its own earlier one.
    _step("train (2 CPU processes, DDP over gloo)", launch + ["train", CONFIG, f"run.dir={RUN_DIR}"])
    _step("export the EMA weights (a diffusers pipeline + distgen config)",
          exe + ["export", str(RUN_DIR), str(EXPORT_DIR), "--force"])
    _step("sample 64 images with 2 processes (the model's sampler: Euler, 25 steps)",
          launch + ["sample", str(EXPORT_DIR), "--num", "64", "--out", str(GRID)])
    # InceptionV3's weights cannot be downloaded offline: the demo scores samples in the feature space of
    # the Fashion-MNIST classifier that ships with distgen (domain FD / KID / PR; it prints its accuracy and
    # calibration beside the figures).
    _step("evaluate 1000 samples against the test split (domain FD, KID, precision/recall), 2 processes",
          launch + ["eval", str(EXPORT_DIR), "--metrics", "fid,kid,prc", "--num-samples", "1000",
                    "--ref", str(paths["test"]), "--feature-extractor", FEATURES, "--out", str(EVAL_OUT)])
    print(f"\ndemo done in {(time.time() - t0) / 60:.1f} min")
    print(f"  shards:        {paths['train'].parent}/")
    print(f"  run folder:    {RUN_DIR}/ (config.yaml, metrics.jsonl, tensorboard/, samples/, checkpoints/)")
    print(f"  export:        {EXPORT_DIR}/ (diffusers.DiffusionPipeline.from_pretrained(..., trust_remote_code=True) "
          f"loads it: its FlowMatchingPipeline ships in the folder)")
    print(f"  sample grid:   {GRID}")
    print(f"  evaluation:    {EVAL_OUT} (domain features: the bundled {FEATURES} extractor)")
    return 0

"""``make demo``: the main job on the bundled default data set (Fashion-MNIST from Debian)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from distgen.config import DataConfig
from distgen.data import make_loader, manifest_path, write_shards
from distgen.data.bench import run_bench

DATA_DIR = Path("data/fashion-mnist")


def ensure_shards(out: Path = DATA_DIR) -> dict[str, Path]:
    """Shard Fashion-MNIST's train and test splits once; later calls reuse them."""
    paths = {}
    for split in ("train", "test"):
        mp = manifest_path(out, split)
        if mp.is_file() and all((out / s["name"]).is_file() for s in json.loads(mp.read_text())["shards"]):
            print(f"shards: reusing {mp}")
        else:
            t0 = time.time()
            m = write_shards("fashion-mnist", out, split, samples_per_shard=5000)
            print(f"shards: {m['total']} {split} images in {len(m['shards'])} shards ({time.time() - t0:.0f}s) -> {mp}")
        paths[split] = mp
    return paths


def demo() -> int:
    paths = ensure_shards()
    cfg = DataConfig(resolution=28, channels=1, workers=2)
    loader = make_loader(str(paths["test"]), cfg, batch_size=500, mode="eval")
    keys = [k for b in loader for k in b["key"]]
    print(f"evaluation pass over {paths['test']}: {loader.count} samples, {len(set(keys))} distinct keys")
    print("loader throughput (decoded images/s):")
    run_bench([str(paths["train"])], workers=(1, 2), batch_size=256, seconds=3.0, repeats=2)
    return 0

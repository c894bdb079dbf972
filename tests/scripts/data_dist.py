"""Run by tests/test_distributed_data.py under torchrun with 2 processes (gloo).

Each rank reads the evaluation pass and a few training batches with 2
DataLoader workers; rank 0 writes what every rank saw to OUT (json).
"""

import json
import sys

from distgen import dist
from distgen.config import DataConfig
from distgen.data import make_loader

manifest, out = sys.argv[1], sys.argv[2]
dist.init_from_env("gloo")
rank, world = dist.rank(), dist.world_size()
cfg = DataConfig(resolution=28, channels=1, workers=2)

loader = make_loader(manifest, cfg, batch_size=256, mode="eval", rank=rank, world=world)
eval_keys = [k for b in loader for k in b["key"]]
total = dist.all_reduce_sum(loader.count)

train = make_loader(manifest, cfg, batch_size=128, mode="train", rank=rank, world=world, seed=7)
it = iter(train)
train_keys = [k for _ in range(4) for k in next(it)["key"]]
del it

gathered = dist.all_gather_object({"rank": rank, "eval": eval_keys, "count": loader.count, "train": train_keys})
if dist.is_main():
    with open(out, "w") as f:
        json.dump({"world": world, "total": total, "ranks": gathered}, f)
dist.barrier()

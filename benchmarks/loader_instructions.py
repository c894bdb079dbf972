"""Instructions per image of the raw baseline and of the loader's worker, counted by valgrind.

``distgen data bench`` measures wall-clock rates, which on a shared VM drift
by tens of percent from one second to the next. Instruction counts move by
about 1% between runs: this script counts them with valgrind (cachegrind) for the raw baseline
of ``distgen data bench`` (same tar reader and decoder) and for the training
loader with one DataLoader worker, whose process does all the data work.
Each figure is the difference of two runs that differ only in the number of
images, so start-up (imports, the shuffle buffer's fill) cancels out.

    python benchmarks/loader_instructions.py SHARDS [--batch-size 256] [--batches 2,10]

Needs valgrind on PATH (Debian: ``apt-get install valgrind``). Takes a few
minutes: valgrind runs Python about 50x slower.
"""

import argparse
import itertools
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch


class FirstBatches(torch.utils.data.IterableDataset):
    """The first ``n`` batches of a dataset, so the worker's work is exactly known."""

    def __init__(self, dataset, n):
        self.dataset, self.n = dataset, n

    def __iter__(self):
        return itertools.islice(iter(self.dataset), self.n)


def child(kind: str, n: int, shards: list, batch_size: int) -> None:
    from distgen.data.bench import bench_inputs, bench_loader, raw_images
    from distgen.data.loader import Loader

    urls, res, chans = bench_inputs(shards)
    if kind == "raw":
        for _ in itertools.islice(raw_images(urls), n * batch_size):
            pass
        return
    stream = bench_loader(shards, 1, batch_size, res, chans).dataset
    got = sum(b["image"].shape[0] for b in Loader(FirstBatches(stream, n), workers=1))
    assert got == n * batch_size, got


def count(kind: str, n: int, shards: list, batch_size: int, logdir: Path) -> dict:
    """Instructions of each process of one valgrind run: {"main": Ir, "worker": Ir}."""
    d = logdir / f"{kind}-{n}"
    d.mkdir()
    cmd = ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
           f"--log-file={d}/%p.log", sys.executable, __file__, "--child", kind, "--batches", str(n),
           "--batch-size", str(batch_size), *shards]
    p = subprocess.Popen(cmd)
    if p.wait() != 0:
        raise SystemExit(f"valgrind run {kind} {n} failed (exit {p.returncode}); see {d}")
    out = {}
    for log in d.glob("*.log"):
        m = re.search(r"I\s+refs:\s+([\d,]+)", log.read_text())
        if m:
            out["main" if log.stem == str(p.pid) else "worker"] = int(m.group(1).replace(",", ""))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shards", nargs="+")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--batches", default="2,10", help="the two run lengths, in batches")
    ap.add_argument("--child", choices=["raw", "loader"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, int(a.batches), a.shards, a.batch_size)
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("loader_instructions: valgrind is not installed (Debian: apt-get install valgrind)")
    n1, n2 = (int(x) for x in a.batches.split(","))
    images = (n2 - n1) * a.batch_size
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(2) as pool:
        runs = {(k, n): pool.submit(count, k, n, a.shards, a.batch_size, Path(tmp))
                for k in ("raw", "loader") for n in (n1, n2)}
        ir = {key: f.result() for key, f in runs.items()}

    def per_image(kind, proc):
        return (ir[kind, n2][proc] - ir[kind, n1][proc]) / images

    raw, worker, main_proc = per_image("raw", "main"), per_image("loader", "worker"), per_image("loader", "main")
    print(f"instructions per image, from runs of {n1} and {n2} batches of {a.batch_size}:")
    print(f"  raw baseline (1 process: read tar members + decode): {raw:9.0f}")
    print(f"  distgen loader, its 1 worker:                        {worker:9.0f}   {raw / worker:.3f}x raw's rate")
    print(f"  distgen loader, the main process (unpickle, float):  {main_proc:9.0f}")


if __name__ == "__main__":
    main()

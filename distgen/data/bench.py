"""``distgen data bench``: loader throughput against a raw single-process baseline.

The baseline reads the tar members and decodes the images, nothing else.
The loader runs the full training pipeline (resampling, shuffle buffer,
decode, collate, float conversion in the main process).
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from distgen.config import DataConfig
from distgen.data.pipeline import IMAGE_EXTS, make_loader, open_image, resolve_shards
from distgen.data.tario import iter_members


def raw_baseline(urls: Sequence[str], seconds: float) -> tuple[int, float]:
    """Decoded images per second reading the tars in this process (cycling over them)."""
    n = 0
    t0 = time.perf_counter()
    while True:
        for url in urls:
            # The same tar reader and decoder as the loader: the ratio measures the pipeline's cost.
            with open(url, "rb") as f:
                for name, data in iter_members(f):
                    ext = name.rsplit(".", 1)[-1].lower()
                    if ext not in IMAGE_EXTS:
                        continue
                    np.asarray(open_image(data, ext))
                    n += 1
                    if n % 256 == 0 and time.perf_counter() - t0 >= seconds:
                        return n, time.perf_counter() - t0


def loader_rate(inputs: Sequence[str], workers: int, batch_size: int, seconds: float, resolution: int,
                channels: int) -> tuple[int, float]:
    """Decoded images per second through :func:`make_loader`, after the first batch (start-up) arrives."""
    cfg = DataConfig(resolution=resolution, channels=channels, workers=workers)
    loader = make_loader(list(inputs), cfg, batch_size=batch_size, mode="train")
    it = iter(loader)
    next(it)
    n = 0
    t0 = time.perf_counter()
    for batch in it:
        n += batch["image"].shape[0]
        if time.perf_counter() - t0 >= seconds:
            break
    dt = time.perf_counter() - t0
    del it
    return n, dt


def run_bench(inputs: Sequence[str], workers: Sequence[int] = (1, 2), batch_size: int = 256, seconds: float = 5.0,
              repeats: int = 3, out=print) -> dict:
    """Print images/s of the raw baseline and the loader; each figure is the best of ``repeats`` runs.

    Best-of-N because a shared 2-core machine only ever slows a run down.
    """
    shards = resolve_shards(list(inputs))
    local = [u for u in shards.urls if not u.startswith("pipe:")]
    if not local:
        raise SystemExit("data bench: the raw baseline needs local tar files")
    meta = shards.meta
    size = meta.get("image_size") or [32, 32]
    res, chans = int(size[0]), int(meta.get("channels") or 1)
    rates: dict[str, float] = {}
    for _ in range(repeats):  # interleaved, so a slow spell hits every figure alike
        n, dt = raw_baseline(local, seconds)
        rates["raw"] = max(rates.get("raw", 0.0), n / dt)
        for w in workers:
            n, dt = loader_rate(inputs, w, batch_size, seconds, res, chans)
            rates[f"loader_{w}"] = max(rates.get(f"loader_{w}", 0.0), n / dt)
    raw = rates["raw"]
    out(f"best of {repeats} runs of {seconds:g}s, batch {batch_size}, {res}x{res}x{chans} images:")
    out(f"  raw baseline (1 process: read tar members + decode): {raw:9.0f} images/s")
    for w in workers:
        r = rates[f"loader_{w}"]
        out(f"  distgen loader, {w} worker(s):                       {r:9.0f} images/s   {r / raw:.2f}x raw")
    return rates

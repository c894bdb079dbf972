"""``distgen data bench``: loader throughput against a raw single-process baseline.

The baseline reads the tar members and decodes the images, nothing else.
The loader runs the full training pipeline (resampling, shuffle buffer,
decode, collate, float conversion in the main process).
"""

from __future__ import annotations

import statistics
import time
from typing import Iterator, Sequence

import numpy as np

from distgen.config import DataConfig
from distgen.data.decode import IMAGE_EXTS, open_image
from distgen.data.loader import make_loader
from distgen.data.manifest import resolve_shards
from distgen.data.tario import iter_members


def raw_images(urls: Sequence[str]) -> Iterator[np.ndarray]:
    """Decoded images of the tars, read in this process and cycled over without end."""
    while True:
        for url in urls:
            # The same tar reader and decoder as the loader: the ratio measures the pipeline's cost.
            with open(url, "rb") as f:
                for name, data in iter_members(f):
                    ext = name.rsplit(".", 1)[-1].lower()
                    if ext in IMAGE_EXTS:
                        yield np.asarray(open_image(data, ext))


def raw_baseline(urls: Sequence[str], seconds: float) -> tuple[int, float]:
    """Decoded images and seconds of :func:`raw_images` run for ``seconds``."""
    n = 0
    t0 = time.perf_counter()
    for _ in raw_images(urls):
        n += 1
        if n % 256 == 0 and time.perf_counter() - t0 >= seconds:
            return n, time.perf_counter() - t0
    raise AssertionError("unreachable: raw_images is endless")


def bench_inputs(inputs: Sequence[str]) -> tuple[list[str], int, int]:
    """The local tar files of ``inputs`` (the raw baseline reads files), and their images' resolution and channels."""
    shards = resolve_shards(list(inputs))
    local = [u for u in shards.urls if not u.startswith("pipe:")]
    if not local:
        raise SystemExit("data bench: the raw baseline needs local tar files")
    meta = shards.meta
    size = meta.get("image_size") or [32, 32]
    return local, int(size[0]), int(meta.get("channels") or 1)


def bench_loader(inputs: Sequence[str], workers: int, batch_size: int, resolution: int, channels: int):
    """The training loader that is benchmarked: default data settings, ``workers`` DataLoader workers."""
    cfg = DataConfig(resolution=resolution, channels=channels, workers=workers)
    return make_loader(list(inputs), cfg, batch_size=batch_size, mode="train")


def loader_rate(inputs: Sequence[str], workers: int, batch_size: int, seconds: float, resolution: int,
                channels: int) -> tuple[int, float]:
    """Decoded images per second through :func:`bench_loader`, after the first batch (start-up) arrives."""
    it = iter(bench_loader(inputs, workers, batch_size, resolution, channels))
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


def run_bench(inputs: Sequence[str], workers: Sequence[int] = (1, 2), batch_size: int = 256, seconds: float = 3.0,
              repeats: int = 5, out=print) -> dict:
    """Print images/s of the raw baseline and the loader over ``repeats`` interleaved rounds.

    A shared machine's speed drifts by tens of percent within seconds, so
    each round's loader figures are divided by the mean of the raw runs
    just before and after them, and the median over rounds is reported,
    with the range, rather than the best run of each (which compares lucky
    moments).
    """
    local, res, chans = bench_inputs(inputs)

    def raw_rate() -> float:
        n, dt = raw_baseline(local, seconds)
        return n / dt

    raw = [raw_rate()]
    loader: dict[int, list[float]] = {w: [] for w in workers}
    for _ in range(repeats):
        for w in workers:
            n, dt = loader_rate(inputs, w, batch_size, seconds, res, chans)
            loader[w].append(n / dt)
        raw.append(raw_rate())
    # Round i's loader runs sit between raw runs i and i + 1.
    around = [(a + b) / 2 for a, b in zip(raw, raw[1:])]
    ratios = {w: [r / a for r, a in zip(loader[w], around)] for w in workers}
    rates = {"raw": statistics.median(raw)}
    rates.update({f"loader_{w}": statistics.median(loader[w]) for w in workers})
    rates.update({f"ratio_{w}": statistics.median(ratios[w]) for w in workers})
    out(f"median of {repeats} interleaved round(s) of {seconds:g}s, batch {batch_size}, {res}x{res}x{chans} images:")
    out(f"  raw baseline (1 process: read tar members + decode): {rates['raw']:9.0f} images/s")
    for w in workers:
        lo, hi = min(ratios[w]), max(ratios[w])
        spread = f" (rounds {lo:.2f}-{hi:.2f}x)" if repeats > 1 else ""
        out(f"  distgen loader, {w} worker(s):                       {rates[f'loader_{w}']:9.0f} images/s   "
            f"{rates[f'ratio_{w}']:.2f}x raw{spread}")
    return rates

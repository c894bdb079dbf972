"""Rank 0's progress through an autoregressive sampler's pixels (PixelCNN++, PixelRNN): one forward per pixel
takes minutes on a CPU, so the user sees where it stands."""

from __future__ import annotations

import sys
import time

from distgen import dist


class PixelProgress:
    """Rank 0's progress through the pixels: a bar on a terminal, a line every 30 s in batch logs."""

    def __init__(self, desc: str, total: int):
        self.desc, self.total, self.done = desc, total, 0
        self.on = dist.is_main()
        self.bar = None
        if self.on and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="px", leave=False)
        self.t0 = self.last = time.time()

    def update(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.on and time.time() - self.last >= 30:
            self.last = time.time()
            print(f"{self.desc}: {self.done}/{self.total} pixels, {self.last - self.t0:.0f}s", file=sys.stderr,
                  flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

"""The sample grids a run writes as it trains (``run_dir/samples/<tag>.png``), from its EMA weights: images from
fixed seeds, or for a translator rows of the same inputs (:func:`preview_batch`) and their translations.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch

from distgen.config import Config
from distgen.data import make_loader
from distgen.loop_state import Run


def ema_view(run: Run) -> dict:
    """The networks as sampling sees them: primary EMAs, and the frozen ones (an autoencoder) as they are."""
    return {**run.nets, **{n: e.materialize(0) for n, e in run.emas.items()}}


def sample_grid(run: Run, tag: str) -> Optional[Path]:
    """Rank 0: a grid of ``train.sample_num`` images from the EMA weights, image i from seed i."""
    if not run.eng.main:
        return None
    from distgen.sample import save_grid

    if run.preview is not None:  # a translator: rows of inputs, translations (and targets)
        with torch.no_grad():
            images, nrow = run.family.preview(ema_view(run), run.preview)
        return save_grid(images, run.dir / "samples" / f"{tag}.png", nrow=nrow)
    gens = [torch.Generator(device=run.eng.device).manual_seed(i) for i in range(run.cfg.train.sample_num)]
    with torch.no_grad():
        images = run.family.sample(ema_view(run), gens)
    return save_grid(images, run.dir / "samples" / f"{tag}.png")


def preview_batch(cfg: Config, num: int, device) -> dict:
    """A translator's grid inputs: the first ``num`` (at most 16) samples of data.eval (else data.train) in
    shard order, ``a`` and ``b`` (a pair's two sides, or the first images of each domain)."""
    n = min(num, 16)
    data = dataclasses.replace(cfg.data, workers=0, flip=False)

    def first(inputs) -> dict:
        return next(iter(make_loader(list(inputs), data, batch_size=n, mode="eval")))

    if cfg.data.train_b:  # unpaired: each domain's own shards
        a = first(cfg.data.eval or cfg.data.train)["image"]
        b = first(cfg.data.eval_b or cfg.data.train_b)["image"]
        k = min(len(a), len(b))
        return {"a": a[:k].to(device), "b": b[:k].to(device)}
    batch = first(cfg.data.eval or cfg.data.train)
    return {"a": batch["a"].to(device), "b": batch["b"].to(device)}

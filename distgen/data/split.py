"""Splitting: which samples each rank and DataLoader worker reads (:class:`Slice` s of shards).

Evaluation is one exact pass: with per-shard counts (from a manifest) the global sample range is cut into
contiguous pieces, one per rank x worker, so every sample is seen exactly once whatever the shard count;
without counts whole shards are dealt out round-robin (still exact, less balanced). Training deals out
shards and resamples them endlessly (:func:`deal_shards`, :func:`resample`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

from distgen.data.errors import DataError


@dataclass(frozen=True)
class Slice:
    """Samples ``[start, stop)`` of one shard (``stop=None``: to the end)."""

    url: str
    start: int = 0
    stop: Optional[int] = None
    shard: int = 0  # position of the shard in the input list: (shard, sample) orders a whole pass
    count: Optional[int] = None  # the shard's sample count in its manifest: a slice that ends there checks it


def partition(slices: Sequence[Slice], part: int, nparts: int) -> list[Slice]:
    """Part ``part`` of ``nparts`` of the samples in ``slices``, each sample in exactly one part.

    With known lengths the concatenated sample range is cut into ``nparts``
    contiguous pieces whose sizes differ by at most one. With unknown lengths
    whole slices are dealt round-robin.
    """
    if any(s.stop is None for s in slices):
        return list(slices[part::nparts])
    total = sum(s.stop - s.start for s in slices)
    lo, hi = total * part // nparts, total * (part + 1) // nparts
    out, pos = [], 0
    for s in slices:
        n = s.stop - s.start
        a, b = max(lo, pos), min(hi, pos + n)
        if a < b:
            out.append(Slice(s.url, s.start + a - pos, s.start + b - pos, s.shard, s.count))
        pos += n
    return out


def split_by_node(slices: Sequence[Slice], rank: int, world: int) -> list[Slice]:
    """Stage: this rank's share of the data (evaluation: exact partition)."""
    return partition(slices, rank, world)


def split_by_worker(slices: Sequence[Slice], worker: int, workers: int) -> list[Slice]:
    """Stage: this DataLoader worker's share of its rank's data."""
    return partition(slices, worker, workers)


def deal_shards(shards: Sequence, part: int, nparts: int) -> list:
    """Training split: disjoint shard subsets when there are enough shards, else all of them.

    With fewer shards than parts, every part resamples all shards; their
    different seeds still give each rank and worker a different stream.
    """
    return list(shards[part::nparts]) if len(shards) >= nparts else list(shards)


def resample(shards: Sequence[tuple[str, Optional[int]]], rng: random.Random) -> Iterator[Slice]:
    """Stage: an endless stream of ``(url, count)`` shards drawn with replacement.

    A shard with a known count is read circularly from a random sample
    onwards, so a stream with another seed (another rank, or a resumed run)
    does not start by replaying the first samples of the same shard.
    Shards a manifest counts empty are left out; none left is a DataError.
    """
    shards = [(url, count) for url, count in shards if count != 0]
    if not shards:
        raise DataError("every shard of this stream holds no samples (manifest counts of 0): nothing to train on")
    while True:
        url, count = rng.choice(shards)
        off = rng.randrange(count) if count else 0
        yield Slice(url, off, count, count=count)
        if off:
            yield Slice(url, 0, off, count=count)

"""Streaming webdataset shards for training and evaluation: the stages composed into a DataLoader.

The loader is a composition of small generator stages, each in its own module:

    training:   shards -> deal_shards (node) -> deal_shards (worker) -> resample -> read_tar
                -> shuffle -> decode -> random_flip -> batched
    evaluation: slices -> split_by_node -> split_by_worker -> read_tar -> decode -> batched

(:mod:`~distgen.data.split`, :mod:`~distgen.data.reading`, :mod:`~distgen.data.decode`,
:mod:`~distgen.data.batch`; inputs from :mod:`~distgen.data.manifest`, bad ones handled by
:mod:`~distgen.data.policy`.) Shards of image-to-image translation (see :mod:`distgen.data.sources` for the
layouts): paired shards decode to ``a`` and ``b`` (flipped together); unpaired training reads two independent
streams, data.train (domain A) and data.train_b (domain B), in :func:`distgen.data.unpaired.make_train_loader`.

Training is infinite and resampled; every (seed, rank, worker, start step)
gives its own random stream, so a resumed run does not replay what it saw.
Evaluation is one exact pass (:func:`distgen.data.split.partition`).

Ranks are passed in (see :mod:`distgen.dist`); nothing here touches
torch.distributed. The workers' lifecycle (dying with their parent, outliving a scheduler's signals) is
:mod:`distgen.workers`.
"""

from __future__ import annotations

import functools
import gc
import os
import random
from typing import Iterator, Optional, Sequence

import torch

from distgen.data.batch import batched, to_float
from distgen.data.decode import IMAGE_KEYS, DecodeSpec, decode, random_flip
from distgen.data.errors import DataError
from distgen.data.manifest import ShardSet, first_input, resolve_shards
from distgen.data.policy import ErrorPolicy
from distgen.data.reading import read_tar, shuffle
from distgen.data.sources.base import LAYOUTS
from distgen.data.split import Slice, deal_shards, resample, split_by_node, split_by_worker
from distgen.dist import derive_seed
from distgen.workers import signals_blocked, worker_init


def stream_seed(seed: int, rank: int, worker: int, step: int, stream: Optional[int] = None) -> int:
    """Seed for one rank's worker, from (seed, rank, worker, start step); ``stream`` tells apart the streams of
    one such worker (unpaired training's domains A and B: :data:`distgen.data.unpaired.STREAM_A` and ``STREAM_B``)."""
    return derive_seed(seed, rank, worker, step) if stream is None else derive_seed(seed, rank, worker, step, stream)


class ShardStream(torch.utils.data.IterableDataset):
    """The pipeline above as an IterableDataset of batches (use with ``batch_size=None``)."""

    def __init__(
        self,
        shards: ShardSet,
        *,
        mode: str,
        batch_size: int,
        decode_spec: DecodeSpec,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        start_step: int = 0,
        shuffle_buffer: int = 2000,
        flip: bool = False,
        on_error: str = "raise",
        stream: Optional[int] = None,
    ):
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be train or eval, got {mode!r}")
        self.shards, self.mode, self.batch_size, self.spec = shards, mode, batch_size, decode_spec
        self.rank, self.world, self.seed, self.start_step = rank, world, seed, start_step
        self.shuffle_buffer, self.flip, self.on_error = shuffle_buffer, flip, on_error
        self.stream = stream  # see stream_seed

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if info is not None:
            # Objects inherited from the parent (torch, diffusers, ...) need no
            # scanning by this worker's garbage collector.
            gc.freeze()
        policy = ErrorPolicy(self.on_error)
        if self.mode == "eval":
            slices = [Slice(u, 0, c, i, c) for i, (u, c) in enumerate(zip(self.shards.urls, self.shards.counts))]
            slices = split_by_node(slices, self.rank, self.world)
            slices = split_by_worker(slices, worker, workers)
            samples = read_tar(slices, policy)
        else:
            rng = random.Random(stream_seed(self.seed, self.rank, worker, self.start_step, self.stream))
            shards = list(zip(self.shards.urls, self.shards.counts))
            shards = deal_shards(shards, self.rank, self.world)
            shards = deal_shards(shards, worker, workers)
            samples = read_tar(resample(shards, rng), policy, endless=True)
            samples = shuffle(samples, self.shuffle_buffer, rng)
        samples = decode(samples, self.spec, policy)
        if self.flip and self.mode == "train":
            samples = random_flip(samples, rng)
        try:
            yield from batched(samples, self.batch_size, policy)
        except DataError as e:
            if info is None:
                raise
            # In a DataLoader worker: hand the message to the main process as data. Raised here, torch would
            # re-raise it there wrapped in "Caught DataError in DataLoader worker process 0" and a traceback.
            yield {"error": str(e)}


class Loader:
    """Iterates a :class:`ShardStream` through a DataLoader and finishes batches in the main process.

    Images (``image``, or a pair's ``a`` and ``b``) become float tensors in [-1, 1], NCHW. ``count`` is the number of
    samples delivered on this rank, ``skipped`` the bad inputs skipped by all
    of this rank's workers.
    """

    def __init__(self, dataset: ShardStream, workers: int = 2, pin_memory: bool = False, as_float: bool = True):
        self.dataset = dataset
        self.workers = workers
        self.as_float = as_float  # False: uint8 tensors, as metrics' feature extractors take them
        self.loader = torch.utils.data.DataLoader(
            # Batches are already made; identity collate keeps numpy as numpy.
            dataset, batch_size=None, collate_fn=_identity, num_workers=workers, pin_memory=pin_memory,
            worker_init_fn=functools.partial(worker_init, parent=os.getpid()) if workers > 0 else None,
            # Workers stay alive across passes in training; eval makes one pass.
            persistent_workers=False,
            prefetch_factor=4 if workers > 0 else None,
        )
        self.count = 0
        self.skipped = 0

    def _start(self):
        """The DataLoader's iterator: its workers start here, with a scheduler's signals blocked
        (:func:`distgen.workers.signals_blocked` says why)."""
        if not self.workers:
            return iter(self.loader)
        with signals_blocked():
            return iter(self.loader)

    def __iter__(self) -> Iterator[dict]:
        for batch in self._start():
            if "error" in batch:  # a worker's DataError, raised here with its own message
                raise DataError(batch["error"])
            self.skipped += batch.pop("skipped", 0)
            if "key" not in batch:  # only a skip count
                continue
            if "latent" in batch:
                batch["latent"] = torch.from_numpy(batch["latent"])
            for k in IMAGE_KEYS:
                if k in batch:
                    batch[k] = to_float(batch[k]) if self.as_float else torch.from_numpy(batch[k])
            if "label" in batch:
                batch["label"] = torch.from_numpy(batch["label"])
            self.count += len(batch["key"])
            yield batch


def _identity(x):
    return x


def make_loader(
    inputs: str | Sequence[str],
    cfg,  # DataConfig
    *,
    batch_size: int,
    mode: str,
    rank: int = 0,
    world: int = 1,
    seed: int = 0,
    start_step: int = 0,
    pin_memory: bool = False,
    as_float: bool = True,
    stream: Optional[int] = None,
) -> Loader:
    """Build a :class:`Loader` over ``inputs`` from a :class:`~distgen.config.DataConfig`.

    Batches hold ``image`` (layouts images and domain), ``a`` and ``b`` (paired) or ``latent``, with
    ``key``, ``index`` and ``label`` when the shards are labelled.
    """
    shards = resolve_shards(inputs)
    meta = shards.meta
    size = tuple(meta["image_size"]) if meta.get("image_size") else None
    if cfg.labels and meta and meta.get("num_classes") == 0:
        raise DataError(f"data.labels is true but the manifest of {shards.urls[0]} lists no classes")
    labels = "required" if cfg.labels else ("optional" if meta.get("num_classes") else "none")
    kind = meta.get("kind", "images")
    if meta.get("layout", "images") not in LAYOUTS:
        raise DataError(f"{first_input(inputs)}: unknown layout {meta['layout']!r} (one of {', '.join(LAYOUTS)})")
    if meta.get("layout") == "paired":
        kind = "paired"
    if kind == "latents" and cfg.flip:
        raise DataError(f"data.flip: {shards.urls[0]} holds latents, which cannot be flipped like images")
    latent_shape = tuple(meta["latent_shape"]) if meta.get("latent_shape") else None
    spec = DecodeSpec(cfg.resolution, cfg.channels, cfg.resize, labels, size, meta.get("channels"), kind,
                      meta.get("num_classes") or None, latent_shape)
    if meta.get("channels") and meta["channels"] != cfg.channels:
        raise DataError(f"data.channels is {cfg.channels} but the shards hold {meta['channels']}-channel images "
                        f"({first_input(inputs)})")
    ds = ShardStream(
        shards, mode=mode, batch_size=batch_size, decode_spec=spec, rank=rank, world=world, seed=seed,
        start_step=start_step, shuffle_buffer=cfg.shuffle_buffer, flip=cfg.flip, on_error=cfg.on_error,
        stream=stream,
    )
    return Loader(ds, workers=cfg.workers, pin_memory=pin_memory, as_float=as_float)

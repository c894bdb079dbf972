"""Unpaired training (domains A and B, data.train and data.train_b): the two shard lists checked against each
other, their streams iterated side by side, and :func:`make_train_loader`, the training stream of a config."""

from __future__ import annotations

from typing import Iterator, Sequence

from distgen.data.errors import DataError
from distgen.data.loader import Loader, make_loader
from distgen.data.manifest import first_input, read_layout

STREAM_A, STREAM_B = 1, 2  # the extra seed part of unpaired training's two streams (make_train_loader)


def check_domains(inputs_a: Sequence[str], inputs_b: Sequence[str], cfg,
                  names: tuple[str, str] = ("data.train", "data.train_b")) -> tuple[dict, dict]:
    """Refuse two shard lists that cannot be domains A and B of one unpaired task; returns their
    :func:`read_layout` metadata. ``names``: the config keys they came from, for the messages.

    Either may be plain image shards (a folder sharded without ``--domain``); what a manifest says must fit:
    no paired shards (those train pix2pix, with no second list), no domain B as A or A as B, the
    configured channel count, no latents.
    """
    metas = []
    for inputs, name, want in ((inputs_a, names[0], "A"), (inputs_b, names[1], "B")):
        meta, where = read_layout(list(inputs)), first_input(list(inputs))
        if meta["layout"] == "paired":
            raise DataError(f"{where}: {name} holds paired shards (a and b per sample), but {names[1]} is set for "
                            f"unpaired training: domain A goes in {names[0]}, domain B in {names[1]} (paired "
                            f"shards alone need no {names[1]})")
        if meta.get("kind") == "latents":
            raise DataError(f"{where}: {name} holds latents; unpaired training takes images")
        if meta["layout"] == "domain" and meta["domain"] != want:
            raise DataError(f"{where}: {name} should hold domain {want}, but its manifest says domain "
                            f"{meta['domain']}")
        if meta.get("channels") and meta["channels"] != cfg.channels:
            raise DataError(f"{where}: {name} holds {meta['channels']}-channel images but data.channels is "
                            f"{cfg.channels}")
        metas.append(meta)
    return metas[0], metas[1]


class UnpairedLoader:
    """Two training loaders, domain A and domain B, iterated side by side.

    Batches: ``a`` and ``b`` (float BxCxHxW in [-1, 1]), ``key_a``/``key_b``, ``index_a``/``index_b`` and
    ``label_a``/``label_b`` when labelled. The two streams are independent (their own shards, shuffles,
    flips and seeds), each as deterministic as a :class:`Loader`, so the pair is too. ``count``: the A/B
    pairs of images delivered; ``skipped``: bad samples both streams skipped.
    """

    def __init__(self, a: Loader, b: Loader):
        self.a, self.b = a, b
        self.count = 0

    @property
    def skipped(self) -> int:
        return self.a.skipped + self.b.skipped

    def __iter__(self) -> Iterator[dict]:
        for ba, bb in zip(self.a, self.b):
            n = len(ba["key"])
            if len(bb["key"]) != n:  # training streams are endless: every batch is full
                raise DataError(f"unpaired batches of {n} (domain A) and {len(bb['key'])} (domain B) images")
            out = {"a": ba["image"], "b": bb["image"], "key_a": ba["key"], "key_b": bb["key"],
                   "index_a": ba["index"], "index_b": bb["index"]}
            for side, batch in (("a", ba), ("b", bb)):
                if "label" in batch:
                    out[f"label_{side}"] = batch["label"]
            self.count += n
            yield out


def make_train_loader(
    cfg,  # DataConfig
    *,
    batch_size: int,
    rank: int = 0,
    world: int = 1,
    seed: int = 0,
    start_step: int = 0,
    pin_memory: bool = False,
) -> Loader | UnpairedLoader:
    """The training stream of a :class:`~distgen.config.DataConfig`.

    Without ``data.train_b``: ``make_loader(data.train, mode="train")``, as every family has it (batches of
    ``image``, or ``a`` and ``b`` from paired shards). With it: an :class:`UnpairedLoader` over data.train
    (domain A) and data.train_b (domain B), each split across ranks and workers like any training stream
    (data.workers workers each) and seeded from (seed, rank, worker, start step) plus its own stream index,
    so A and B never share random numbers and a restart at a step gives the same batches again.
    """
    kw = dict(batch_size=batch_size, mode="train", rank=rank, world=world, seed=seed, start_step=start_step,
              pin_memory=pin_memory)
    if not cfg.train_b:
        return make_loader(list(cfg.train), cfg, **kw)
    check_domains(cfg.train, cfg.train_b, cfg)
    return UnpairedLoader(make_loader(list(cfg.train), cfg, stream=STREAM_A, **kw),
                          make_loader(list(cfg.train_b), cfg, stream=STREAM_B, **kw))

"""Sources: readers for the raw data sets that ``distgen data shard`` turns into shards.

Each reader returns a :class:`Source`: image metadata plus an iterator of
``(image uint8 HxW or HxWxC, label or None)`` in a fixed order, so sharding is
deterministic. A paired source (image-to-image translation: pix2pix's data sets,
Fashion-MNIST edges) yields ``((a, b), label)``: input and target, one size and
channel count. :func:`shard_jobs` turns a SOURCE argument into the splits it
writes: one, or two for an unpaired task (domains A and B, as CycleGAN's
trainA/trainB).

Shard layouts (the manifest's ``layout``):

- ``images``: one image per key (member ``png``, optional ``cls``);
- ``paired``: two per key, ``a.png`` (input domain) and ``b.png`` (target domain), optional ``cls``;
- ``domain``: images of one domain of an unpaired task; the manifest adds ``domain`` ("A" or "B")
  and ``task`` (and for Fashion-MNIST's class task ``source_class``: ``{"index", "name"}``).

The readers, by what they read: :mod:`~distgen.data.sources.fashion_mnist` (Fashion-MNIST's idx files and the
tasks made from them), :mod:`~distgen.data.sources.arrays` (CIFAR-10's pickled batches, ``.npz`` arrays) and
:mod:`~distgen.data.sources.folders` (folders of image files: ``folder:``, ``pix2pix:``, ``cyclegan:``); the
:class:`Source` they return is in :mod:`~distgen.data.sources.base`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from distgen.data.errors import DataError
from distgen.data.sources.arrays import cifar10, npz
from distgen.data.sources.base import DOMAINS, Source
from distgen.data.sources.fashion_mnist import (
    fashion_mnist, fashion_mnist_classes, fashion_mnist_edges, fashion_mnist_task,
)
from distgen.data.sources.folders import cyclegan, folder, pix2pix


def open_source(spec: str, split: str) -> Source:
    """Parse a SOURCE argument that writes one split (``fashion-mnist[:DIR][:edges]``, ``cifar10:PATH``,
    ``folder:DIR``, ``npz:FILE``, ``pix2pix:DIR``)."""
    kind, _, arg = spec.partition(":")
    if kind == "fashion-mnist":
        directory, task = fashion_mnist_task(arg)
        if task is None:
            return fashion_mnist(directory, split, spec)
        if task == "edges":
            return fashion_mnist_edges(directory, split, spec)
        raise DataError(f"{spec}: writes two splits ({split}A and {split}B); shard it with `distgen data shard` "
                        f"or distgen.data.shard_source")
    if kind == "cifar10":
        if not arg:
            raise DataError("cifar10 needs a path: cifar10:PATH (the cifar-10-batches-py folder or its .tar.gz)")
        return cifar10(Path(arg), split, spec)
    if kind == "folder":
        if not arg:
            raise DataError("folder needs a directory: folder:DIR")
        return folder(Path(arg), spec)
    if kind == "npz":
        if not arg:
            raise DataError("npz needs a file: npz:FILE")
        return npz(Path(arg), spec)
    if kind == "pix2pix":
        if not arg:
            raise DataError("pix2pix needs a directory: pix2pix:DIR (pix2pix's DIR/train, DIR/val, DIR/test)")
        return pix2pix(Path(arg), split, spec)
    if kind == "cyclegan":
        raise DataError(f"{spec}: writes two splits ({split}A and {split}B); shard it with `distgen data shard` "
                        f"or distgen.data.shard_source")
    raise DataError(f"{spec}: unknown source; use fashion-mnist[:DIR][:edges|:classes=A/B], cifar10:PATH, "
                    f"folder:DIR, npz:FILE, pix2pix:DIR or cyclegan:DIR")


def shard_jobs(spec: str, split: str, domain: Optional[str] = None) -> list[tuple[str, Source]]:
    """What ``distgen data shard SOURCE OUT_DIR --split SPLIT [--domain A|B]`` writes: ``(split name, source)``
    pairs, each to become ``OUT_DIR/<split name>-NNNNNN.tar`` and ``OUT_DIR/<split name>.manifest.json``.

    - ``cyclegan:DIR``: DIR/<split>A and DIR/<split>B as splits ``<split>A``, ``<split>B`` (layout domain);
    - ``fashion-mnist[:DIR]:classes=NAME_A/NAME_B``: the images of two classes, likewise;
    - any other source with ``domain``: the source as split ``<split><domain>`` (layout domain);
    - else the source as split ``split`` (``pix2pix:DIR`` and ``fashion-mnist[:DIR]:edges`` are paired).

    Every source is opened (and its files checked) before anything is written, so a missing domain B
    folder stops the command before domain A's shards replace earlier ones.
    """
    kind, _, arg = spec.partition(":")
    if domain is not None and domain not in DOMAINS:
        raise DataError(f"--domain must be A or B, got {domain!r}")
    task = fashion_mnist_task(arg)[1] if kind == "fashion-mnist" else None
    if kind == "cyclegan" or task not in (None, "edges"):
        if domain is not None:
            raise DataError(f"{spec}: --domain is for a source of one image set; this one makes both domains")
        if kind == "cyclegan":
            if not arg:
                raise DataError("cyclegan needs a directory: cyclegan:DIR (CycleGAN's DIR/trainA, trainB, testA, testB)")
            return cyclegan(Path(arg), split, spec)
        return fashion_mnist_classes(fashion_mnist_task(arg)[0], split, spec, task)
    source = open_source(spec, split)
    if domain is None:
        return [(split, source)]
    if source.layout == "paired":
        raise DataError(f"{spec}: --domain is for a source of one image set; this one is paired (A and B per sample)")
    # A plain source knows nothing of the task it is a domain of.
    source.layout, source.extra = "domain", {"task": None, "domain": domain}
    return [(f"{split}{domain}", source)]

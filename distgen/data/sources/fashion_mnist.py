"""Fashion-MNIST (Debian's idx files): the plain labelled images, and the two translation tasks made from them,
edges -> images (paired, :func:`edge_map`) and one class <-> another (unpaired, ``classes=A/B``)."""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path
from typing import Optional

import numpy as np

from distgen.data.errors import DataError
from distgen.data.sources.base import DOMAINS, Source

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


def _read_idx(path: Path, kind: str) -> np.ndarray:
    """Read an idx file (optionally gzipped): the MNIST family's format."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
        magic, = struct.unpack(">I", raw[:4])
        ndim = magic & 0xFF
        if magic >> 8 != 0x08:  # 0x08: unsigned byte data
            raise ValueError(f"bad magic number {magic:#x}")
        shape = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
        data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
        if data.size != math.prod(shape):  # Python integers: np.prod of four 2^32 sides would overflow
            raise ValueError(f"expected {math.prod(shape)} values, found {data.size}")
        return data.reshape(shape)
    except (OSError, ValueError, struct.error, EOFError) as e:
        raise DataError(f"{path}: not a valid idx {kind} file ({e})") from None


def fashion_mnist_task(arg: str) -> tuple[str, Optional[str]]:
    """``[DIR][:edges|:classes=...]`` -> (DIR or the default, the task or None)."""
    head, _, last = arg.rpartition(":")
    if last == "edges" or last.startswith("classes="):
        return head or FASHION_MNIST_DIR, last
    return arg or FASHION_MNIST_DIR, None


def _fashion_mnist_arrays(directory: str, split: str, spec: str) -> tuple[np.ndarray, np.ndarray]:
    d = Path(directory)
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise DataError(f"{spec}: split must be train or test, got {split!r}")
    paths = []
    for part in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        cands = [d / f"{prefix}-{part}.gz", d / f"{prefix}-{part}"]
        found = next((p for p in cands if p.is_file()), None)
        if found is None:
            raise DataError(f"{cands[0]}: not found (install Debian's dataset-fashion-mnist, or pass fashion-mnist:DIR)")
        paths.append(found)
    images = _read_idx(paths[0], "image")
    labels = _read_idx(paths[1], "label")
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{paths[0]}: {images.shape} images do not match {labels.shape} labels in {paths[1]}")
    if len(labels) and labels.max() >= len(FASHION_MNIST_CLASSES):
        i = int(np.argmax(labels >= len(FASHION_MNIST_CLASSES)))
        raise DataError(f"{paths[1]}: label {labels[i]} at index {i}; Fashion-MNIST has {len(FASHION_MNIST_CLASSES)} "
                        f"classes (0-9)")
    return images, labels


def fashion_mnist(directory: str, split: str, spec: str) -> Source:
    images, labels = _fashion_mnist_arrays(directory, split, spec)

    def items():
        for img, lab in zip(images, labels):
            yield img, int(lab)

    return Source(spec, len(images), FASHION_MNIST_CLASSES, items, tuple(images.shape[1:3]), 1)


def fashion_mnist_edges(directory: str, split: str, spec: str) -> Source:
    """The built-in paired task: A = :func:`edge_map` of each image, B = the image, cls = its label."""
    images, labels = _fashion_mnist_arrays(directory, split, spec)

    def items():
        for lo in range(0, len(images), 1000):  # edges in chunks: vectorised, yet never all at once
            edges = edge_map(images[lo:lo + 1000])
            for j, e in enumerate(edges):
                yield (e, images[lo + j]), int(labels[lo + j])

    return Source(spec, len(images), FASHION_MNIST_CLASSES, items, tuple(images.shape[1:3]), 1, layout="paired",
                  extra={"task": "Fashion-MNIST edges -> images"})


def fashion_mnist_class(name: str, spec: str = "fashion-mnist") -> int:
    """A Fashion-MNIST class index from its name (any case) or its index 0-9; else a DataError listing the names."""
    name = name.strip()
    if name.isdigit() and int(name) < len(FASHION_MNIST_CLASSES):
        return int(name)
    for i, c in enumerate(FASHION_MNIST_CLASSES):
        if c.lower() == name.lower():
            return i
    raise DataError(f"{spec}: unknown Fashion-MNIST class {name!r}; the classes are "
                    + ", ".join(f"{i} {c!r}" for i, c in enumerate(FASHION_MNIST_CLASSES)))


def _class_pair(value: str, spec: str) -> tuple[int, int]:
    """``NAME_A/NAME_B`` -> two class indices. "T-shirt/top" holds a slash itself, so the tokens between
    slashes are re-joined greedily: the longest run of them that names a class is one name."""
    tokens, names, i = value.split("/"), [], 0
    known = {c.lower() for c in FASHION_MNIST_CLASSES}
    while i < len(tokens):
        j = next((j for j in range(len(tokens), i, -1) if "/".join(tokens[i:j]).strip().lower() in known), i + 1)
        names.append("/".join(tokens[i:j]))
        i = j
    if len(names) != 2:
        raise DataError(f"{spec}: classes= takes two Fashion-MNIST classes NAME_A/NAME_B (e.g. "
                        f"classes=Sneaker/Ankle boot), got {len(names)}: {names}")
    a, b = (fashion_mnist_class(n, spec) for n in names)
    if a == b:
        raise DataError(f"{spec}: domains A and B are both class {FASHION_MNIST_CLASSES[a]!r}; name two classes")
    return a, b


def fashion_mnist_classes(directory: str, split: str, spec: str, task: str) -> list[tuple[str, Source]]:
    """The built-in unpaired task: domain A = the images of one class, domain B = those of another."""
    a, b = _class_pair(task[len("classes="):], spec)
    images, labels = _fashion_mnist_arrays(directory, split, spec)
    jobs = []
    for domain, c in zip(DOMAINS, (a, b)):
        chosen = np.flatnonzero(labels == c)

        def items(chosen=chosen, c=c):
            for j in chosen:
                yield images[j], c

        # cls keeps the Fashion-MNIST label (with all ten class names), so labels mean what they always do.
        jobs.append((f"{split}{domain}", Source(
            spec, len(chosen), FASHION_MNIST_CLASSES, items, tuple(images.shape[1:3]), 1, layout="domain",
            extra={"task": f"Fashion-MNIST {FASHION_MNIST_CLASSES[a]} <-> {FASHION_MNIST_CLASSES[b]}",
                   "domain": domain, "source_class": {"index": c, "name": FASHION_MNIST_CLASSES[c]}})))
    return jobs


def edge_map(images: np.ndarray, low: float = 0.32, high: float = 0.8) -> np.ndarray:
    """Line drawings of grey images (N x H x W uint8): dark one-pixel lines (0) on white (255), like the
    edges of pix2pix's edges2shoes / edges2handbags.

    Canny's steps: a 5x5 binomial blur, Sobel gradients, thinning to the gradient's local maxima across
    the edge, and hysteresis (edges above ``high`` plus the ones above ``low`` connected to them), with
    thresholds on the gradient of the image scaled to [0, 1] (Sobel's largest is 4). All in integers, so
    the drawings (and the shards' hashes) are the same bit for bit on every machine: float transcendental
    functions differ in the last bit between numpy's SIMD paths.
    """
    x = images.astype(np.int64)
    n, h, w = x.shape
    k = (1, 4, 6, 4, 1)
    p = np.pad(x, ((0, 0), (2, 2), (2, 2)), mode="edge")
    rows = sum(k[i] * p[:, :, i:i + w] for i in range(5))
    blur = sum(k[i] * rows[:, i:i + h, :] for i in range(5))  # scale 256: 0..65280

    def shifts(a, pad_mode):
        q = np.pad(a, ((0, 0), (1, 1), (1, 1)), mode=pad_mode)
        return lambda dy, dx: q[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

    s = shifts(blur, "edge")
    gx = (s(-1, 1) + 2 * s(0, 1) + s(1, 1)) - (s(-1, -1) + 2 * s(0, -1) + s(1, -1))
    gy = (s(1, -1) + 2 * s(1, 0) + s(1, 1)) - (s(-1, -1) + 2 * s(-1, 0) + s(-1, 1))
    mag = gx * gx + gy * gy  # squared: exact in integers
    ax, ay = np.abs(gx), np.abs(gy)
    # The gradient's direction in 4 bins, by tan(22.5 deg) ~ 0.414 ~ 29/70: across-edge neighbours to beat.
    horizontal, vertical = 70 * ay <= 29 * ax, 70 * ax <= 29 * ay
    same_sign = gx * gy > 0
    m = shifts(mag, "constant")
    n1 = np.select([horizontal, vertical, same_sign], [m(0, 1), m(1, 0), m(1, 1)], m(1, -1))
    n2 = np.select([horizontal, vertical, same_sign], [m(0, -1), m(-1, 0), m(-1, -1)], m(-1, 1))
    thin = np.where((mag >= n1) & (mag >= n2), mag, 0)
    unit = 255 * 256  # the blurred image's 1.0
    weak = thin >= int((low * unit) ** 2)
    edge = thin >= int((high * unit) ** 2)
    padded = np.zeros((n, h + 2, w + 2), bool)
    while True:  # grow the strong edges along weak ones (8-connected) until nothing changes
        padded[:, 1:-1, 1:-1] = edge
        rows = padded[:, :, :-2] | padded[:, :, 1:-1] | padded[:, :, 2:]
        grown = weak & (rows[:, :-2] | rows[:, 1:-1] | rows[:, 2:]) | edge
        if (grown == edge).all():
            break
        edge = grown
    return np.where(edge, 0, 255).astype(np.uint8)

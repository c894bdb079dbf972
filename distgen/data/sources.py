"""Readers for the raw data sets that ``distgen data shard`` turns into shards.

Each reader returns a :class:`Source`: image metadata plus an iterator of
``(image uint8 HxW or HxWxC, label or None)`` in a fixed order, so sharding is
deterministic.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
from PIL import Image

from distgen.data.errors import DataError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class Source:
    name: str  # the SOURCE argument, for the manifest
    count: int
    class_names: tuple[str, ...]  # empty when unlabelled
    items: Callable[[], Iterator[tuple[np.ndarray, Optional[int]]]]
    image_size: Optional[tuple[int, int]] = None  # (H, W) when every image shares it
    channels: Optional[int] = None
    labelled: bool = field(default=True)


def open_source(spec: str, split: str) -> Source:
    """Parse a SOURCE argument (``fashion-mnist[:DIR]``, ``cifar10:PATH``, ``folder:DIR``, ``npz:FILE``)."""
    kind, _, arg = spec.partition(":")
    if kind == "fashion-mnist":
        return _fashion_mnist(arg or FASHION_MNIST_DIR, split, spec)
    if kind == "cifar10":
        if not arg:
            raise DataError("cifar10 needs a path: cifar10:PATH (the cifar-10-batches-py folder or its .tar.gz)")
        return _cifar10(Path(arg), split, spec)
    if kind == "folder":
        if not arg:
            raise DataError("folder needs a directory: folder:DIR")
        return _folder(Path(arg), spec)
    if kind == "npz":
        if not arg:
            raise DataError("npz needs a file: npz:FILE")
        return _npz(Path(arg), spec)
    raise DataError(f"{spec}: unknown source; use fashion-mnist[:DIR], cifar10:PATH, folder:DIR or npz:FILE")


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
        if data.size != int(np.prod(shape)):
            raise ValueError(f"expected {int(np.prod(shape))} values, found {data.size}")
        return data.reshape(shape)
    except (OSError, ValueError, struct.error, EOFError) as e:
        raise DataError(f"{path}: not a valid idx {kind} file ({e})") from None


def _fashion_mnist(directory: str, split: str, spec: str) -> Source:
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

    def items():
        for img, lab in zip(images, labels):
            yield img, int(lab)

    return Source(spec, len(images), FASHION_MNIST_CLASSES, items, tuple(images.shape[1:3]), 1)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles CIFAR's numpy batches and refuses anything that could run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _cifar10(path: Path, split: str, spec: str) -> Source:
    names = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}.get(split)
    if names is None:
        raise DataError(f"{spec}: split must be train or test, got {split!r}")
    blobs: dict[str, bytes] = {}
    if path.is_dir():
        for n in names + ["batches.meta"]:
            if (path / n).is_file():
                blobs[n] = (path / n).read_bytes()
    elif path.is_file():
        try:
            with tarfile.open(path, "r:*") as tf:
                for m in tf.getmembers():
                    base = m.name.rsplit("/", 1)[-1]
                    if m.isfile() and base in names + ["batches.meta"]:
                        blobs[base] = tf.extractfile(m).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"{path}: not a readable CIFAR-10 archive ({e})") from None
    else:
        raise DataError(f"{path}: not found")
    xs, ys = [], []
    for n in names:
        if n not in blobs:
            raise DataError(f"{path}: CIFAR-10 batch '{n}' is missing")
        try:
            batch = _ArrayUnpickler(io.BytesIO(blobs[n]), encoding="bytes").load()
            x = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            y = np.asarray(batch[b"labels"], dtype=np.int64)
        except Exception as e:  # any malformed pickle content
            raise DataError(f"{path}/{n}: not a CIFAR-10 python batch ({e})") from None
        xs.append(x)
        ys.append(y)
    x = np.concatenate(xs)
    y = np.concatenate(ys)
    classes = CIFAR10_CLASSES
    if "batches.meta" in blobs:
        try:
            meta = _ArrayUnpickler(io.BytesIO(blobs["batches.meta"]), encoding="bytes").load()
            classes = tuple(c.decode() for c in meta[b"label_names"])
        except Exception as e:
            raise DataError(f"{path}/batches.meta: unreadable ({e})") from None

    def items():
        for img, lab in zip(x, y):
            yield img, int(lab)

    return Source(spec, len(x), classes, items, (32, 32), 3)


def _load_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("L", "RGB"):
                pass
            elif im.mode in ("1", "I;16", "I", "F", "LA"):
                im = im.convert("L")
            else:
                im = im.convert("RGB")
            return np.asarray(im)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: not a readable image ({e})") from None


def _folder(root: Path, spec: str) -> Source:
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    files: list[tuple[Path, Optional[int]]] = []
    if subdirs:
        classes = tuple(p.name for p in subdirs)
        for i, sd in enumerate(subdirs):
            files += [(p, i) for p in sorted(sd.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
        stray = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        if stray:
            raise DataError(f"{stray[0]}: image outside the class subfolders of {root}")
    else:
        classes = ()
        files = [(p, None) for p in sorted(root.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DataError(f"{root}: no images found")
    # Look at every image once up front: sizes and channels go into the manifest.
    sizes, chans = set(), set()
    for p, _ in files:
        a = _load_image(p)
        sizes.add(a.shape[:2])
        chans.add(1 if a.ndim == 2 else a.shape[2])
    if len(chans) > 1:
        raise DataError(f"{root}: images mix grey and colour; convert them to one kind first")

    def items():
        for p, lab in files:
            yield _load_image(p), lab

    size = next(iter(sizes)) if len(sizes) == 1 else None
    return Source(spec, len(files), classes, items, size, chans.pop(), labelled=bool(classes))


def _npz(path: Path, spec: str) -> Source:
    if not path.is_file():
        raise DataError(f"{path}: not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z:
                raise DataError(f"{path}: missing array 'x' (uint8 NHWC or NHW)")
            x = z["x"]
            y = z["y"] if "y" in z else None
    except DataError:
        raise
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable npz ({e})") from None
    if x.dtype != np.uint8 or x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[3] not in (1, 3)):
        raise DataError(f"{path}: 'x' must be uint8 NHW or NHWC with C in (1, 3), got {x.dtype} {x.shape}")
    if x.ndim == 4 and x.shape[3] == 1:
        x = x[..., 0]
    if y is not None:
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
            raise DataError(f"{path}: 'y' must be {len(x)} non-negative integers, got {y.dtype} {y.shape}")
    classes = tuple(str(i) for i in range(int(y.max()) + 1)) if y is not None and len(y) else ()

    def items():
        for i in range(len(x)):
            yield x[i], (int(y[i]) if y is not None else None)

    return Source(spec, len(x), classes, items, tuple(x.shape[1:3]), 1 if x.ndim == 3 else 3, labelled=y is not None)

"""Readers for the raw data sets that ``distgen data shard`` turns into shards.

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
"""

from __future__ import annotations

import gzip
import io
import math
import pickle
import struct
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
from PIL import Image

from distgen.data.errors import DataError
from distgen.data.pixels import channels as pixel_channels
from distgen.data.pixels import to_8bit
from distgen.readback import MAX_CLASSES, read_bytes

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
CIFAR_MAX_BYTES = 1 << 30  # a CIFAR-10 python batch holds 30 MB
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class Source:
    name: str  # the SOURCE argument, for the manifest
    count: int
    class_names: tuple[str, ...]  # empty when unlabelled
    items: Callable[[], Iterator[tuple[np.ndarray, Optional[int]]]]
    image_size: Optional[tuple[int, int]] = None  # (H, W) when every image shares it (paired: each side's)
    channels: Optional[int] = None
    labelled: bool = field(default=True)
    layout: str = "images"  # "paired": items yield ((a, b), label); "domain": one domain of an unpaired task
    extra: dict = field(default_factory=dict)  # manifest keys of the layout: task, domain, source_class


LAYOUTS = ("images", "paired", "domain")
DOMAINS = ("A", "B")


def open_source(spec: str, split: str) -> Source:
    """Parse a SOURCE argument that writes one split (``fashion-mnist[:DIR][:edges]``, ``cifar10:PATH``,
    ``folder:DIR``, ``npz:FILE``, ``pix2pix:DIR``)."""
    kind, _, arg = spec.partition(":")
    if kind == "fashion-mnist":
        directory, task = _fashion_mnist_task(arg)
        if task is None:
            return _fashion_mnist(directory, split, spec)
        if task == "edges":
            return _fashion_mnist_edges(directory, split, spec)
        raise DataError(f"{spec}: writes two splits ({split}A and {split}B); shard it with `distgen data shard` "
                        f"or distgen.data.shard_source")
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
    if kind == "pix2pix":
        if not arg:
            raise DataError("pix2pix needs a directory: pix2pix:DIR (pix2pix's DIR/train, DIR/val, DIR/test)")
        return _pix2pix(Path(arg), split, spec)
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
    task = _fashion_mnist_task(arg)[1] if kind == "fashion-mnist" else None
    if kind == "cyclegan" or task not in (None, "edges"):
        if domain is not None:
            raise DataError(f"{spec}: --domain is for a source of one image set; this one makes both domains")
        if kind == "cyclegan":
            if not arg:
                raise DataError("cyclegan needs a directory: cyclegan:DIR (CycleGAN's DIR/trainA, trainB, testA, testB)")
            return _cyclegan(Path(arg), split, spec)
        return _fashion_mnist_classes(_fashion_mnist_task(arg)[0], split, spec, task)
    source = open_source(spec, split)
    if domain is None:
        return [(split, source)]
    if source.layout == "paired":
        raise DataError(f"{spec}: --domain is for a source of one image set; this one is paired (A and B per sample)")
    # A plain source knows nothing of the task it is a domain of.
    source.layout, source.extra = "domain", {"task": None, "domain": domain}
    return [(f"{split}{domain}", source)]


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


def _fashion_mnist_task(arg: str) -> tuple[str, Optional[str]]:
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


def _fashion_mnist(directory: str, split: str, spec: str) -> Source:
    images, labels = _fashion_mnist_arrays(directory, split, spec)

    def items():
        for img, lab in zip(images, labels):
            yield img, int(lab)

    return Source(spec, len(images), FASHION_MNIST_CLASSES, items, tuple(images.shape[1:3]), 1)


def _fashion_mnist_edges(directory: str, split: str, spec: str) -> Source:
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


def _fashion_mnist_classes(directory: str, split: str, spec: str, task: str) -> list[tuple[str, Source]]:
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
                blobs[n] = read_bytes(path / n, CIFAR_MAX_BYTES, DataError, "CIFAR-10 batch")
    elif path.is_file():
        try:
            with tarfile.open(path, "r:*") as tf:
                for m in tf.getmembers():
                    base = m.name.rsplit("/", 1)[-1]
                    if m.isfile() and base in names + ["batches.meta"]:
                        if m.size > CIFAR_MAX_BYTES:
                            raise DataError(f"{path}: {m.name}: {m.size} bytes, more than a CIFAR-10 batch "
                                            f"may hold ({CIFAR_MAX_BYTES})")
                        blobs[base] = tf.extractfile(m).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"{path}: not a readable CIFAR-10 archive ({e})") from None
    else:
        raise DataError(f"{path}: not found")
    classes = CIFAR10_CLASSES
    if "batches.meta" in blobs:
        try:
            meta = _ArrayUnpickler(io.BytesIO(blobs["batches.meta"]), encoding="bytes").load()
            classes = tuple(c.decode() for c in meta[b"label_names"])
        except Exception as e:
            raise DataError(f"{path}/batches.meta: unreadable ({e})") from None
        if not 0 < len(classes) <= MAX_CLASSES:
            raise DataError(f"{path}/batches.meta: {len(classes)} label names")
    xs, ys = [], []
    for n in names:
        if n not in blobs:
            raise DataError(f"{path}: CIFAR-10 batch '{n}' is missing")
        try:
            batch = _ArrayUnpickler(io.BytesIO(blobs[n]), encoding="bytes").load()
            data, labels = batch[b"data"], batch[b"labels"]
            y = np.asarray(labels)
        except Exception as e:  # any malformed pickle content
            raise DataError(f"{path}/{n}: not a CIFAR-10 python batch ({e})") from None
        # Checked, not cast: a cast would wrap other values into 0-255 and zip() would drop unmatched samples.
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
                and data.shape[1] == 3 * 32 * 32):
            raise DataError(f"{path}/{n}: 'data' must be uint8 N x 3072, got {type(data).__name__} "
                            f"{getattr(data, 'dtype', '')} {getattr(data, 'shape', '')}")
        if y.shape != (len(data),) or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{path}/{n}: 'labels' must be {len(data)} integers, got {y.dtype} {y.shape}")
        if len(y) and (y.min() < 0 or y.max() >= len(classes)):
            raise DataError(f"{path}/{n}: labels must lie in [0, {len(classes)}), found {y.min()} to {y.max()}")
        xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(y.astype(np.int64))
    x = np.concatenate(xs)
    y = np.concatenate(ys)

    def items():
        for img, lab in zip(x, y):
            yield img, int(lab)

    return Source(spec, len(x), classes, items, (32, 32), 3)


def _load_image(path: Path, channels: Optional[int] = None) -> np.ndarray:
    """An image file as uint8 HxW (grey) or HxWx3 (:func:`distgen.data.pixels.to_8bit`); ``channels=3`` turns
    grey into RGB."""
    try:
        with Image.open(path) as im:
            im.load()
            im = to_8bit(im, str(path))
            if channels == 3 and im.mode == "L":
                im = im.convert("RGB")
            return np.asarray(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: not a readable image ({e})") from None


def _peek_image(path: Path) -> tuple[int, int, int]:
    """(width, height, channels) of an image file from its header, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            return im.size[0], im.size[1], pixel_channels(im.mode)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: not a readable image ({e})") from None


def _flat_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


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
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: not a readable npz ({e})") from None
    except MemoryError:  # an array header that claims more than the machine has
        raise DataError(f"{path}: an array too large to load into memory") from None
    if x.dtype != np.uint8 or x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[3] not in (1, 3)):
        raise DataError(f"{path}: 'x' must be uint8 NHW or NHWC with C in (1, 3), got {x.dtype} {x.shape}")
    if x.ndim == 4 and x.shape[3] == 1:
        x = x[..., 0]
    if y is not None:
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
            raise DataError(f"{path}: 'y' must be {len(x)} non-negative integers, got {y.dtype} {y.shape}")
        if len(y) and y.max() >= MAX_CLASSES:  # the classes are 0..max(y): one name each
            raise DataError(f"{path}: 'y' holds label {y.max()}; distgen takes at most {MAX_CLASSES} classes")
    classes = tuple(str(i) for i in range(int(y.max()) + 1)) if y is not None and len(y) else ()

    def items():
        for i in range(len(x)):
            yield x[i], (int(y[i]) if y is not None else None)

    return Source(spec, len(x), classes, items, tuple(x.shape[1:3]), 1 if x.ndim == 3 else 3, labelled=y is not None)


def _pix2pix(root: Path, split: str, spec: str) -> Source:
    """pix2pix's data sets: DIR/<split>/*.jpg|png, each image A|B side by side (A the left half)."""
    d = root / split
    if not d.is_dir():
        raise DataError(f"{d}: not a directory (pix2pix:DIR reads DIR/{split}/*.jpg|png, each image A|B side by side)")
    files = _flat_images(d)
    if not files:
        raise DataError(f"{d}: no images found")
    # Headers only, up front: sizes and channels go into the manifest, and a bad file stops the command
    # before anything is written, at the cost of opening each file (not decoding it) once more.
    sizes, chans = set(), set()
    for p in files:
        w, h, c = _peek_image(p)
        if w % 2:
            raise DataError(f"{p}: {w} pixels wide, an odd width; a pix2pix image is A|B side by side, two halves "
                            f"of one width")
        sizes.add((h, w // 2))
        chans.add(c)
    if len(chans) > 1:
        raise DataError(f"{d}: images mix grey and colour; convert them to one kind first")

    def items():
        for p in files:
            img = _load_image(p)
            half = img.shape[1] // 2
            if img.shape[1] % 2:  # changed since the scan above
                raise DataError(f"{p}: {img.shape[1]} pixels wide, an odd width (A|B side by side)")
            yield (img[:, :half], img[:, half:]), None

    size = next(iter(sizes)) if len(sizes) == 1 else None
    return Source(spec, len(files), (), items, size, chans.pop(), labelled=False, layout="paired",
                  extra={"task": root.resolve().name})


def _cyclegan(root: Path, split: str, spec: str) -> list[tuple[str, Source]]:
    """CycleGAN's data sets: flat folders DIR/<split>A and DIR/<split>B of unlabelled images."""
    if not root.is_dir():
        raise DataError(f"{root}: not a directory (cyclegan:DIR reads DIR/trainA, trainB, testA, testB)")
    found = []
    for domain in DOMAINS:
        d = root / f"{split}{domain}"
        if not d.is_dir():
            raise DataError(f"{d}: domain {domain} folder not found (cyclegan:DIR with --split {split} reads "
                            f"DIR/{split}A and DIR/{split}B)")
        files = _flat_images(d)
        if not files:
            raise DataError(f"{d}: no images found (domain {domain} of {spec})")
        found.append((domain, files, [_peek_image(p) for p in files]))
    # CycleGAN's own sets hold a few grey photos among colour ones (horse2zebra's trainA does): like its
    # loader, read them as RGB rather than refuse the set. Both domains get the one channel count, as
    # data.channels is one number for both.
    channels = 3 if any(c == 3 for _, _, peeks in found for _, _, c in peeks) else 1
    jobs = []
    for domain, files, peeks in found:
        sizes = {(h, w) for w, h, _ in peeks}

        def items(files=files):
            for p in files:
                yield _load_image(p, channels), None

        jobs.append((f"{split}{domain}", Source(
            spec, len(files), (), items, next(iter(sizes)) if len(sizes) == 1 else None, channels, labelled=False,
            layout="domain", extra={"task": root.resolve().name, "domain": domain})))
    return jobs

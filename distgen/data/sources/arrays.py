"""Sources stored as arrays: CIFAR-10's pickled python batches (unpickled with numpy's classes only) and ``.npz``
files (``x``, optional ``y``)."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

from distgen.data.errors import DataError
from distgen.data.sources.base import Source
from distgen.readback import MAX_CLASSES, read_bytes

CIFAR_MAX_BYTES = 1 << 30  # a CIFAR-10 python batch holds 30 MB
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


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


def cifar10(path: Path, split: str, spec: str) -> Source:
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


def npz(path: Path, spec: str) -> Source:
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

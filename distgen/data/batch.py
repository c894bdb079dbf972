"""Batching: decoded samples -> numpy batches in a worker (:func:`batched`), images -> float tensors in the main
process (:func:`to_float`)."""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import torch

from distgen.data.decode import IMAGE_KEYS
from distgen.data.policy import ErrorPolicy


def batched(samples: Iterable[dict], batch_size: int, policy: ErrorPolicy, partial: bool = True) -> Iterator[dict]:
    """Stage: collate into ``{"image": uint8 BxCxHxW, "label", "key", "skipped"}`` (numpy arrays).

    ``skipped`` carries this worker's skip count since its last batch to the
    main process, which adds them up.
    """
    buf: list[dict] = []
    for s in samples:
        buf.append(s)
        if len(buf) == batch_size:
            yield _collate(buf, policy.take())
            buf = []
    if buf and partial:
        yield _collate(buf, policy.take())
    elif policy.skipped:
        yield {"skipped": policy.take()}


def _collate(buf: list[dict], skipped: int) -> dict:
    out = {
        # uint8 numpy crosses the process boundary as plain pickled bytes: 4x
        # smaller than float, and cheaper than a shared-memory segment per batch.
        **{k: np.stack([s[k] for s in buf]) for k in ("latent",) + IMAGE_KEYS if k in buf[0]},
        "key": [s["key"] for s in buf],
        # (shard << 32) | sample: sorting by it restores the input order of an evaluation pass
        "index": np.array([s["index"] for s in buf], dtype=np.int64),
        "skipped": skipped,
    }
    if "label" in buf[0]:
        out["label"] = np.array([s["label"] for s in buf], dtype=np.int64)
    return out


def to_float(images: np.ndarray) -> torch.Tensor:
    """uint8 BxCxHxW -> float BxCxHxW in [-1, 1].

    Done in numpy, which stays on one thread: torch would wake its intra-op
    threads here, and they spin on the cores the data workers need.
    """
    x = images.astype(np.float32)
    x *= 1 / 127.5
    x -= 1.0
    return torch.from_numpy(x)

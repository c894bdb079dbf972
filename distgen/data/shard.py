"""Writing: webdataset tar shards and their manifest (``distgen data shard``); reading a manifest back is
:mod:`distgen.data.manifest`, checking shards against it :mod:`distgen.data.verify`.

Shards are byte-for-byte deterministic: members are written in a fixed order
with fixed mtime, owner and mode, and PNG encoding is lossless and stable.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import webdataset as wds
from PIL import Image

from distgen.data.errors import DataError
from distgen.data.manifest import MANIFEST_FORMAT, manifest_path
from distgen.data.sources import open_source, shard_jobs
from distgen.data.sources.base import Source


def encode_png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_shards(
    source: Source | str,
    out_dir: str | Path,
    split: str = "train",
    samples_per_shard: int = 10000,
    log: Optional[Callable[[str], None]] = None,
) -> dict:
    """Shard ``source`` into ``out_dir/<split>-NNNNNN.tar`` and write the manifest (see :func:`write_samples`).

    A sample is ``png`` (``a.png`` and ``b.png`` for a paired source) and ``cls`` when labelled; the
    manifest records the source's layout and the keys that go with it (:mod:`distgen.data.sources`).
    """
    if isinstance(source, str):
        source = open_source(source, split)
    paired = source.layout == "paired"

    def samples():
        for index, (img, label) in enumerate(source.items()):
            sample = {"__key__": f"{split}_{index:07d}"}
            if paired:
                a, b = img
                if a.shape != b.shape:
                    raise DataError(f"{source.name}: sample {index}: 'a' is {_shape(a)} but 'b' is {_shape(b)}; "
                                    f"the two images of a pair need one size and channel count")
                sample["a.png"], sample["b.png"] = encode_png(a), encode_png(b)
            else:
                sample["png"] = encode_png(img)
            if label is not None:
                sample["cls"] = str(label).encode()
            yield sample

    return write_samples(samples(), out_dir, split, samples_per_shard, log, name=source.name, manifest={
        "source": source.name,
        "layout": source.layout,
        "image_size": list(source.image_size) if source.image_size else None,
        "channels": source.channels,
        "num_classes": len(source.class_names),
        "class_names": list(source.class_names),
        **source.extra,
    })


def _shape(img: np.ndarray) -> str:
    return f"{img.shape[0]}x{img.shape[1]}x{1 if img.ndim == 2 else img.shape[2]}"


def shard_source(
    spec: str,
    out_dir: str | Path,
    split: str = "train",
    samples_per_shard: int = 10000,
    domain: Optional[str] = None,
    log: Optional[Callable[[str], None]] = None,
) -> list[dict]:
    """``distgen data shard SPEC OUT_DIR --split SPLIT [--domain A|B]``: every split the source makes
    (:func:`~distgen.data.sources.shard_jobs`: one, or two for an unpaired task), each with
    :func:`write_shards`. Returns their manifests, in order (domain A first)."""
    return [write_shards(source, out_dir, name, samples_per_shard, log)
            for name, source in shard_jobs(spec, split, domain)]


def write_samples(
    samples: Iterable[dict],
    out_dir: str | Path,
    split: str,
    samples_per_shard: int,
    log: Optional[Callable[[str], None]],
    *,
    name: str,
    manifest: dict,
) -> dict:
    """Write webdataset samples (dicts of ``__key__`` and member bytes) into ``out_dir/<split>-NNNNNN.tar`` and
    the manifest (``manifest`` plus the format, split, total and shard list).

    Tars are written under temporary names and renamed only once the whole
    split is written, then the manifest is written atomically: a failure
    part-way leaves the previous shards and manifest as they were, and no
    manifest ever names a partial shard. Returns the manifest dict.
    """
    if samples_per_shard < 1:
        raise DataError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(f".{split}-*.tar.tmp"):
        stale.unlink()
    shards: list[dict] = []
    done: list[tuple[Path, Path]] = []  # (temporary, final) names
    writer = None
    tmp: Optional[Path] = None
    count_in_shard = 0
    index = 0

    def close_current():
        nonlocal writer, tmp
        if writer is None:
            return
        writer.close()
        final = out / f"{split}-{len(shards):06d}.tar"
        shards.append({"name": final.name, "count": count_in_shard, "size": tmp.stat().st_size,
                       "sha256": file_sha256(tmp)})
        done.append((tmp, final))
        if log:
            log(f"wrote {final} ({count_in_shard} samples)")
        writer, tmp = None, None

    def _write_one(sample):
        nonlocal writer, tmp, count_in_shard, index
        if writer is None:
            tmp = out / f".{split}-{len(shards):06d}.tar.tmp"
            # Fixed owner, mode and an integer mtime (a float one adds a PAX
            # header per member) make the tars reproducible.
            writer = wds.TarWriter(str(tmp), user="distgen", group="distgen", mode=0o444, mtime=0, encoder=False)
            count_in_shard = 0
        writer.write(sample)
        count_in_shard += 1
        index += 1
        if count_in_shard == samples_per_shard:
            close_current()

    try:
        for sample in samples:
            _write_one(sample)
    except BaseException:
        if writer is not None:
            writer.close()
        for t, _ in done + ([(tmp, None)] if tmp else []):
            t.unlink(missing_ok=True)
        raise
    close_current()
    if index == 0:
        raise DataError(f"{name}: no samples to shard")
    # Only now replace the old split: manifest first, so a crash in between
    # leaves no manifest rather than one naming shards that changed.
    mp = manifest_path(out, split)
    mp.unlink(missing_ok=True)
    # Old shards would otherwise be mistaken for new ones by a brace pattern.
    for old in out.glob(f"{split}-*.tar"):
        old.unlink()
    for t, final in done:
        os.replace(t, final)
    full = {"format": MANIFEST_FORMAT, "source": manifest.get("source", name), "split": split, "total": index,
            **{k: v for k, v in manifest.items() if k != "source"}, "shards": shards}
    tmpm = mp.with_suffix(".json.tmp")
    tmpm.write_text(json.dumps(full, indent=2) + "\n")
    os.replace(tmpm, mp)
    return full

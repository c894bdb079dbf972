"""Write webdataset tar shards and their manifest (``distgen data shard``).

Shards are byte-for-byte deterministic: members are written in a fixed order
with fixed mtime, owner and mode, and PNG encoding is lossless and stable.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import webdataset as wds
from PIL import Image

from distgen.data.errors import DataError
from distgen.data.sources import DOMAINS, LAYOUTS, Source, open_source, shard_jobs
from distgen.data.tario import count_samples
from distgen.readback import (
    MAX_BYTES, MAX_CLASSES, MAX_COUNT, Check, Int, List, MiB, Num, Obj, Opt, RelPath, Schema, Str, inside,
    read_json,
)

MANIFEST_FORMAT = "distgen-shards/1"


def encode_png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def manifest_path(out_dir: str | Path, split: str) -> Path:
    return Path(out_dir) / f"{split}.manifest.json"


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


# --------------------------------------------------------------------------- reading a manifest back
MAX_SIDE = 1 << 16  # a stored image's height or width: 4 gigapixels at most
MAX_SHARD_SAMPLES = (1 << 32) - 1  # a sample's number in its shard is the low 32 bits of the loader's "index"
MAX_SHARDS = 10_000_000
_SHA256 = Str(pattern=r"[0-9a-f]{64}")
_SHARD = Obj({"name": Str(), "count": Int(0, MAX_SHARD_SAMPLES), "size": Int(0, MAX_BYTES), "sha256": _SHA256},
             optional=("size", "sha256"))
# Every key a writer puts in a manifest (write_shards, a Source's extra, encode_shards), with its type and bounds.
MANIFEST = Obj({
    "format": Str(choices=(MANIFEST_FORMAT,)),
    "source": Str(),
    "split": Str(max_len=200),
    "total": Int(1, MAX_COUNT),
    "layout": Str(choices=LAYOUTS),
    "kind": Str(choices=("images", "latents")),
    "image_size": Opt(List(Int(1, MAX_SIDE), min_len=2, max_len=2)),
    "channels": Opt(Check(Int(1, 3), lambda c: None if c != 2 else "2 is not a channel count distgen stores (1 or 3)")),
    "num_classes": Int(0, MAX_CLASSES),
    "class_names": List(Str(max_len=1000), max_len=MAX_CLASSES),
    "task": Opt(Str()),
    "domain": Str(choices=DOMAINS),
    "source_class": Obj({"index": Int(0, MAX_CLASSES - 1), "name": Str(max_len=1000)}),
    "latent_shape": List(Int(1, MAX_SIDE), min_len=3, max_len=3),
    "autoencoder": Obj({"path": Str(), "weights_sha256": _SHA256, "scaling_factor": Num()}),
    "shards": List(_SHARD, min_len=1, max_len=MAX_SHARDS),
}, optional=("source", "split", "layout", "kind", "image_size", "channels", "num_classes", "class_names", "task",
             "domain", "source_class", "latent_shape", "autoencoder"))


class _Manifest(Schema):
    """The format first (another JSON file is named as such), then :data:`MANIFEST`, every shard name
    (:func:`manifest_shard_path`), and what the keys say against each other (:func:`_manifest_problem`)."""

    def check(self, value, where, error):
        if not isinstance(value, dict) or value.get("format") != MANIFEST_FORMAT:
            self.fail(where, error, f"not a distgen manifest (format {MANIFEST_FORMAT})")
        m = MANIFEST.check(value, where, error)
        for i, s in enumerate(m["shards"]):
            manifest_shard_path(Path(where.file), i, s["name"])
        problem = _manifest_problem(m)
        if problem:
            self.fail(where, error, problem)
        return m


def _manifest_problem(m: dict) -> Optional[str]:
    """What the keys of a manifest say against each other, or None."""
    counted = sum(s["count"] for s in m["shards"])
    if m["total"] != counted:
        return f"total {m['total']} is not the sum of the shards' counts ({counted})"
    n = m.get("num_classes")
    if n is not None and "class_names" in m and len(m["class_names"]) != n:
        return f"num_classes is {n} but class_names lists {len(m['class_names'])}"
    if n is not None and "source_class" in m and m["source_class"]["index"] >= n:
        return f"source_class.index {m['source_class']['index']} is not one of the {n} classes"
    if m.get("layout") == "domain" and "domain" not in m:
        return "layout domain needs a domain, A or B"
    if m.get("kind") == "latents" and "latent_shape" not in m:
        return "latent shards (kind latents) need their latent_shape"
    names = set()
    for i, s in enumerate(m["shards"]):
        if s["name"] in names:
            return f"shards[{i}].name {s['name']!r} is listed twice (its samples would count twice)"
        names.add(s["name"])
    return None


def manifest_shard_path(manifest: Path, i: int, name: Any) -> Path:
    """Where shard ``i`` named ``name`` in ``manifest`` lies, or a DataError.

    A manifest is data, often downloaded with the shards: it names files relative to its own folder and
    nothing else. No absolute path, no ``..``, no ``pipe:`` (a shell command), no URL scheme and no link
    that leads out of the folder: what runs or reaches out is only ever what the user typed.
    """
    where = f"{manifest}: shards[{i}].name"
    try:
        RelPath().check(name, where, DataError)
    except DataError:
        raise DataError(f"{where} {name!r}: a manifest names its shards as files relative to its own folder (no "
                        f"absolute path, '..', pipe: command or URL)") from None
    return inside(manifest.parent, name, where, DataError)


def read_manifest(path: Path) -> dict:
    """A manifest, read through :mod:`distgen.readback` and checked (:data:`MANIFEST`, total = the sum of the
    counts, class names, shard names inside its folder), or a DataError naming the file and the key."""
    return read_json(Path(path), _Manifest(), error=DataError, max_bytes=256 * MiB, what="manifest")


@dataclass
class Verified:
    """What ``distgen data verify`` checked and found as recorded."""

    shards: int
    bytes: int
    samples: int  # counted in the tar headers: equal to the manifest's total
    decoded: Optional[str] = None  # with decode: what decoding checked, in words


def verify_manifest(manifest: str | Path, decode: bool = False) -> Verified:
    """Check every shard of ``manifest`` against the manifest (``distgen data verify``): size, sha256 and
    sample count (from the tar headers) of each, and with ``decode`` every sample decoded as training decodes
    it (images against the recorded size and channels, labels against the classes, latents against their shape).

    The manifest itself is checked as every reader checks it (:func:`read_manifest`: total = the sum of the
    counts). Returns what was checked when all match; else a DataError whose first line names the manifest
    and whose next lines name every shard that is missing or differs, and the first bad sample of each.
    """
    from distgen.data.pipeline import check_shard, manifest_spec, sample_key

    path = Path(manifest)
    m = read_manifest(path)
    spec = manifest_spec(m) if decode else None
    problems, size_total, samples, failed = [], 0, 0, 0
    for i, s in enumerate(m["shards"]):
        shard = manifest_shard_path(path, i, s["name"])
        before = len(problems)
        if not shard.is_file():
            problems.append(f"{shard}: missing")
            failed += 1
            continue
        size = shard.stat().st_size
        size_total += size
        if "sha256" not in s:
            problems.append(f"{shard}: the manifest records no sha256 to check it against")
        elif "size" in s and s["size"] != size:
            problems.append(f"{shard}: {size} bytes, the manifest records {s['size']}")
        elif file_sha256(shard) != s["sha256"]:
            problems.append(f"{shard}: sha256 differs from the manifest's (the shard changed or is corrupt)")
        try:
            with open(shard, "rb") as f:
                n = count_samples(f, sample_key)
        except (OSError, ValueError) as e:  # TarFormatError, and a member name without an extension
            n = None
            problems.append(f"{shard}: not a readable tar ({e})")
        if n is not None:
            samples += n
            if n != s["count"]:
                problems.append(f"{shard}: holds {n} samples, the manifest records {s['count']}")
            elif decode:
                bad, first = check_shard(str(shard), s["count"], i, spec)
                if bad:
                    problems.append(f"{shard}: {bad} bad sample(s), the first: {first}")
        failed += len(problems) > before
    if problems:
        raise DataError(f"{path}: {failed} of {len(m['shards'])} shard(s) do not match the manifest:\n  "
                        + "\n  ".join(problems))
    return Verified(len(m["shards"]), size_total, samples, spec.describe() if decode else None)

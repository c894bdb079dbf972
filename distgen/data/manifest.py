"""Inputs: a manifest's format and its checked reading, and the resolution of a manifest, brace pattern or
``pipe:`` URLs into the shards (:class:`ShardSet`) a loader streams.

A manifest is what ``distgen data shard`` writes beside its tars (:mod:`distgen.data.shard`); it is data,
often downloaded with the shards, so every reader checks it here (:func:`read_manifest`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from braceexpand import braceexpand

from distgen.data.errors import DataError
from distgen.data.sources.base import DOMAINS, LAYOUTS
from distgen.readback import (
    MAX_BYTES, MAX_CLASSES, MAX_COUNT, Check, Int, List, MiB, Num, Obj, Opt, RelPath, Schema, Str, inside,
    read_json,
)

MANIFEST_FORMAT = "distgen-shards/1"


def manifest_path(out_dir: str | Path, split: str) -> Path:
    return Path(out_dir) / f"{split}.manifest.json"


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


@dataclass(frozen=True)
class ShardSet:
    """Resolved inputs: shard URLs, their sample counts when known, manifest metadata."""

    urls: tuple[str, ...]
    counts: tuple[Optional[int], ...]
    meta: dict = field(default_factory=dict)

    @property
    def total(self) -> Optional[int]:
        return None if any(c is None for c in self.counts) else sum(self.counts)


def _load_manifest(path: Path) -> ShardSet:
    m = read_manifest(path)  # checked: types, bounds, total, names inside its folder
    urls, counts = [], []
    for s in m["shards"]:
        shard = path.parent / s["name"]
        try:
            size = shard.stat().st_size if shard.is_file() else None
        except OSError:
            size = None
        if size is None:
            raise DataError(f"{path}: shard {shard} is missing")
        # Sizes on every start (one stat per shard); hashes and sample counts on demand: reading every byte
        # of a cluster-sized data set at each start would cost minutes (distgen data verify MANIFEST does it).
        if "size" in s and s["size"] != size:
            raise DataError(f"{path}: shard {shard} is {size} bytes, the manifest records {s['size']} (changed or "
                            f"truncated since it was written; `distgen data verify {path}` checks every shard)")
        urls.append(str(shard))
        counts.append(s["count"])
    return ShardSet(tuple(urls), tuple(counts), {k: v for k, v in m.items() if k != "shards"})


def resolve_shards(inputs: str | Sequence[str]) -> ShardSet:
    """Turn a manifest, brace patterns, paths or ``pipe:`` URLs into a :class:`ShardSet`."""
    items = [inputs] if isinstance(inputs, str) else list(inputs)
    urls: list[str] = []
    counts: list[Optional[int]] = []
    meta: dict = {}
    first = None
    for item in items:
        if item.endswith(".json") and not item.startswith("pipe:"):
            s = _load_manifest(Path(item))
            if first is not None and _layout_of(s.meta) != _layout_of(meta):
                # meta is the first manifest's: samples of another layout would decode wrongly, or into
                # the wrong domain
                raise DataError(f"{item}: {_layout_of(s.meta)} shards, but {first} holds {_layout_of(meta)} "
                                f"shards; one list of shards holds one layout")
            urls += s.urls
            counts += s.counts
            meta, first = meta or s.meta, first or item
            continue
        for url in braceexpand(item):
            if not url.startswith("pipe:") and not Path(url).is_file():
                raise DataError(f"{url}: shard not found")
            urls.append(url)
            counts.append(None)
    if not urls:
        raise DataError(f"no shards given ({inputs!r}): pass a manifest, a brace pattern or a list of tar files")
    return ShardSet(tuple(urls), tuple(counts), meta)


def _layout_of(meta: dict) -> str:
    """A manifest's layout in words: "images", "paired", "domain A", "latents"."""
    if meta.get("kind") == "latents":
        return "latents"
    layout = meta.get("layout", "images")
    return f"domain {meta.get('domain')}" if layout == "domain" else layout


def read_layout(inputs: str | Sequence[str]) -> dict:
    """The manifest metadata of ``inputs`` (:func:`resolve_shards`'s ``meta``) with ``layout`` always set:
    ``images`` (also for shards without a manifest), ``paired`` or ``domain`` (then with ``domain``, A or B).
    Translation families tell paired from unpaired data by it."""
    meta = dict(resolve_shards(inputs).meta)
    meta.setdefault("layout", "images")
    if meta["layout"] not in LAYOUTS:
        raise DataError(f"{first_input(inputs)}: unknown layout {meta['layout']!r} (one of {', '.join(LAYOUTS)})")
    if meta["layout"] == "domain" and meta.get("domain") not in ("A", "B"):
        raise DataError(f"{first_input(inputs)}: layout domain needs a domain A or B, got {meta.get('domain')!r}")
    return meta


def first_input(inputs: str | Sequence[str]) -> str:
    """The input an error names: the (first) manifest or pattern."""
    return inputs if isinstance(inputs, str) else (inputs[0] if inputs else "(no shards)")

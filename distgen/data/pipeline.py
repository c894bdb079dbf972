"""Streaming webdataset shards for training and evaluation.

The loader is a composition of small generator stages, each visible here:

    training:   shards -> deal_shards (node) -> deal_shards (worker) -> resample -> read_tar
                -> shuffle -> decode -> random_flip -> batched
    evaluation: slices -> split_by_node -> split_by_worker -> read_tar -> decode -> batched

Shards of image-to-image translation (see :mod:`distgen.data.sources` for the layouts): paired
shards decode to ``a`` and ``b`` (flipped together); unpaired training reads two independent
streams, data.train (domain A) and data.train_b (domain B), in :func:`make_train_loader`.

Training is infinite and resampled; every (seed, rank, worker, start step)
gives its own random stream, so a resumed run does not replay what it saw.
Evaluation is one exact pass: with per-shard counts (from a manifest) the
global sample range is cut into contiguous pieces, one per rank x worker, so
every sample is seen exactly once whatever the shard count; without counts
whole shards are dealt out round-robin (still exact, less balanced).

Ranks are passed in (see :mod:`distgen.dist`); nothing here touches
torch.distributed.
"""

from __future__ import annotations

import functools
import gc
import io
import logging
import os
import random
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from braceexpand import braceexpand
from PIL import Image

from distgen.data.errors import DataError
from distgen.data.pixels import channels as pixel_channels
from distgen.data.pixels import to_8bit
from distgen.data.shard import manifest_shard_path, read_manifest  # noqa: F401  (manifest_shard_path: re-exported)
from distgen.data.sources import LAYOUTS
from distgen.data.streams import PipeStream, open_shard
from distgen.data.tario import iter_entries, seek_sample
from distgen.dist import derive_seed
from distgen.readback import MAX_CLASSES

log = logging.getLogger("distgen.data")
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
PIL_FORMATS = {"png": ["PNG"], "jpg": ["JPEG"], "jpeg": ["JPEG"], "webp": ["WEBP"]}
IMAGE_KEYS = ("image", "a", "b")  # a sample's (and a batch's) images: one, or a pair
STREAM_A, STREAM_B = 1, 2  # the extra seed part of unpaired training's two streams (make_train_loader)


# --------------------------------------------------------------------------- inputs
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
        raise DataError(f"{_first(inputs)}: unknown layout {meta['layout']!r} (one of {', '.join(LAYOUTS)})")
    if meta["layout"] == "domain" and meta.get("domain") not in ("A", "B"):
        raise DataError(f"{_first(inputs)}: layout domain needs a domain A or B, got {meta.get('domain')!r}")
    return meta


def _first(inputs: str | Sequence[str]) -> str:
    """The input an error names: the (first) manifest or pattern."""
    return inputs if isinstance(inputs, str) else (inputs[0] if inputs else "(no shards)")


# --------------------------------------------------------------------------- errors
class ErrorPolicy:
    """``raise`` stops at the first bad input; ``skip`` counts the samples it costs, logs it and goes on."""

    def __init__(self, mode: str = "raise"):
        if mode not in ("raise", "skip"):
            raise ValueError(f"data.on_error must be raise or skip, got {mode!r}")
        self.mode = mode
        self.skipped = 0

    def __call__(self, err: DataError, lost: Optional[int] = 1) -> None:
        """``lost``: the samples this error costs (a broken shard tail: all the rest of it); None when
        unknown (a shard without a manifest count), counted as one."""
        if self.mode == "raise":
            raise err
        self.skipped += 1 if lost is None else lost
        what = "the rest of the shard (how many samples is unknown without a manifest count)" if lost is None \
            else f"{lost} sample(s)"
        log.warning("skipped bad input, %s lost (%d so far in this worker): %s", what, self.skipped, err)

    def take(self) -> int:
        n, self.skipped = self.skipped, 0
        return n


# --------------------------------------------------------------------------- splitting
@dataclass(frozen=True)
class Slice:
    """Samples ``[start, stop)`` of one shard (``stop=None``: to the end)."""

    url: str
    start: int = 0
    stop: Optional[int] = None
    shard: int = 0  # position of the shard in the input list: (shard, sample) orders a whole pass
    count: Optional[int] = None  # the shard's sample count in its manifest: a slice that ends there checks it


def partition(slices: Sequence[Slice], part: int, nparts: int) -> list[Slice]:
    """Part ``part`` of ``nparts`` of the samples in ``slices``, each sample in exactly one part.

    With known lengths the concatenated sample range is cut into ``nparts``
    contiguous pieces whose sizes differ by at most one. With unknown lengths
    whole slices are dealt round-robin.
    """
    if any(s.stop is None for s in slices):
        return list(slices[part::nparts])
    total = sum(s.stop - s.start for s in slices)
    lo, hi = total * part // nparts, total * (part + 1) // nparts
    out, pos = [], 0
    for s in slices:
        n = s.stop - s.start
        a, b = max(lo, pos), min(hi, pos + n)
        if a < b:
            out.append(Slice(s.url, s.start + a - pos, s.start + b - pos, s.shard, s.count))
        pos += n
    return out


def split_by_node(slices: Sequence[Slice], rank: int, world: int) -> list[Slice]:
    """Stage: this rank's share of the data (evaluation: exact partition)."""
    return partition(slices, rank, world)


def split_by_worker(slices: Sequence[Slice], worker: int, workers: int) -> list[Slice]:
    """Stage: this DataLoader worker's share of its rank's data."""
    return partition(slices, worker, workers)


def deal_shards(shards: Sequence, part: int, nparts: int) -> list:
    """Training split: disjoint shard subsets when there are enough shards, else all of them.

    With fewer shards than parts, every part resamples all shards; their
    different seeds still give each rank and worker a different stream.
    """
    return list(shards[part::nparts]) if len(shards) >= nparts else list(shards)


def resample(shards: Sequence[tuple[str, Optional[int]]], rng: random.Random) -> Iterator[Slice]:
    """Stage: an endless stream of ``(url, count)`` shards drawn with replacement.

    A shard with a known count is read circularly from a random sample
    onwards, so a stream with another seed (another rank, or a resumed run)
    does not start by replaying the first samples of the same shard.
    Shards a manifest counts empty are left out; none left is a DataError.
    """
    shards = [(url, count) for url, count in shards if count != 0]
    if not shards:
        raise DataError("every shard of this stream holds no samples (manifest counts of 0): nothing to train on")
    while True:
        url, count = rng.choice(shards)
        off = rng.randrange(count) if count else 0
        yield Slice(url, off, count, count=count)
        if off:
            yield Slice(url, 0, off, count=count)


# --------------------------------------------------------------------------- reading
def _split_name(fname: str) -> tuple[str, str]:
    prefix, _, base = fname.rpartition("/")
    key, dot, ext = base.partition(".")
    if not dot:
        raise ValueError(f"member {fname!r} has no extension")
    return (f"{prefix}/{key}" if prefix else key), ext.lower()


def sample_key(fname: str) -> str:
    """The sample a member belongs to: its name up to the first dot of its base name (webdataset's rule)."""
    return _split_name(fname)[0]


# Byte positions of samples in local shards, learnt while reading them, so a
# training stream can start a shard at a random sample with one seek. Keyed by
# (device, inode, size, mtime) so a rewritten shard is never read through stale positions.
_SAMPLE_POS: dict[tuple, "array[int]"] = {}


def _position_index(stream) -> Optional["array[int]"]:
    try:
        if not stream.seekable() or stream.tell() != 0:
            return None
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return None  # a pipe or another stream without a file behind it
    return _SAMPLE_POS.setdefault((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns), array("q"))


MAX_BARREN = 1000  # endless reading: this many shard reads in a row without a sample mean there are none


def read_tar(slices: Iterable[Slice], policy: ErrorPolicy, endless: bool = False) -> Iterator[dict]:
    """Stage: samples (``__key__``, ``__url__`` and one entry per member extension) from tar shards.

    Members are grouped by key; a shard that ends early, is corrupt or whose
    ``pipe:`` command fails raises a DataError naming the shard and the last
    good key (or, with ``skip``, counts the samples of the slice it loses and
    moves to the next shard). A slice that starts inside a local shard seeks
    to its first sample. Counts are checked, not trusted: a slice that ends at
    its shard's manifest count finds no sample after it, and a shard read whole
    holds one at least. ``endless`` (training): :data:`MAX_BARREN` slices in a
    row without a sample stop the stream, whatever the policy, rather than spin.
    """
    barren = 0  # slices in a row that gave no sample
    for sl in slices:
        if endless and barren >= MAX_BARREN:
            raise DataError(f"shard {sl.url}: the last {MAX_BARREN} shard reads of this stream gave no sample "
                            f"(every shard of it is bad or empty: see the errors logged above)")
        url = sl.url
        index = 0  # number of the sample being assembled
        last_key = None
        done = False
        stream = None
        barren += 1
        lost: Optional[int] = None  # what a DataError raised below costs
        try:
            stream = open_shard(url)
            positions = _position_index(stream)
            if sl.start and positions is not None:
                seek_sample(stream, sl.start, sample_key, positions)
                index = sl.start
            entries = iter_entries(stream, pos=stream.tell() if positions is not None else 0)
            current: Optional[dict] = None
            for fname, data, pos in entries:
                key, ext = _split_name(fname)
                if current is not None and key == current["__key__"]:
                    if ext in current:
                        raise ValueError(f"key {key} has two '{ext}' members")
                    current[ext] = data
                    continue
                if current is not None:
                    if index >= sl.start:
                        barren = 0
                        yield current
                    last_key = current["__key__"]
                    index += 1
                if sl.stop is not None and index >= sl.stop:  # sample `index` exists: it is past the slice
                    done = True
                    if sl.stop == sl.count:
                        raise DataError(f"shard {url}: holds more than the {sl.count} samples its manifest records "
                                        f"(key {key} follows them): the manifest is out of date or was edited "
                                        f"(`distgen data verify` counts every shard)")
                    break
                if positions is not None and index == len(positions):
                    positions.append(pos)
                if index < sl.start:  # skipping in a stream that cannot seek (a pipe): build nothing
                    current = {"__key__": key}  # a new key: members of the same key were handled above
                    continue
                current = {"__key__": key, "__url__": url, "__index__": (sl.shard << 32) | index, ext: data}
            if not done and current is not None:
                if index >= sl.start:
                    barren = 0
                    yield current
                last_key = current["__key__"]
                index += 1
            if sl.stop is not None and index < sl.stop:
                raise ValueError(f"ended after {index} samples, expected at least {sl.stop}"
                                 + (f" (its manifest records {sl.count})" if sl.count is not None else ""))
            if sl.stop is None and sl.start == 0 and index == 0:
                lost = 0
                raise DataError(f"shard {url}: holds no samples (an empty tar)")
        except DataError as e:
            policy(e, lost)
        except GeneratorExit:  # the consumer stopped early: not an error
            done = True
            raise
        except Exception as e:  # tar, pipe and OS errors all mean a bad shard
            # A failing pipe: command explains its own truncated output best.
            failed = stream.failure() if isinstance(stream, PipeStream) else None
            where = f"after key {last_key}" if last_key else (f"at sample {index}" if index else "before its first sample")
            lost = sl.stop - max(index, sl.start) if sl.stop is not None else None
            reason = failed or f"corrupt, truncated or unreadable tar {where}: {e}"
            stream, done = (None if failed else stream), True
            policy(DataError(f"shard {url}: {reason}" + (f"; the rest of the shard from after key {last_key} is "
                                                        f"lost" if last_key and failed else "")), lost)
        finally:
            if stream is not None:
                try:
                    stream.close()  # a pipe: whose data was whole may die of SIGPIPE here; harmless then
                except Exception as e:
                    if not done:
                        policy(DataError(f"shard {url}: {e}"))


def shuffle(samples: Iterable[Any], bufsize: int, rng: random.Random) -> Iterator[Any]:
    """Stage: shuffle through a buffer of ``bufsize`` samples."""
    buf: list = []
    for s in samples:
        if len(buf) < bufsize:
            buf.append(s)
            continue
        i = int(rng.random() * bufsize)  # randrange costs as much as the rest of this stage
        buf[i], s = s, buf[i]
        yield s
    rng.shuffle(buf)
    yield from buf


@dataclass(frozen=True)
class DecodeSpec:
    resolution: Optional[int]  # None: as stored (distgen data verify --decode)
    channels: int  # 0: as stored
    resize: str = "center_crop"  # or "stretch"
    labels: str = "optional"  # "required", "optional" (-1 when missing) or "none"
    expect_size: Optional[tuple[int, int]] = None  # (H, W) every stored image must have
    expect_channels: Optional[int] = None
    kind: str = "images"  # or "latents": shards of ``distgen data encode``, an autoencoder's posterior moments;
    # or "paired": images a.<ext> and b.<ext> per sample (manifest layout paired), each decoded as "images" does
    num_classes: Optional[int] = None  # labels lie in [0, num_classes) (the manifest's; else MAX_CLASSES)
    latent_shape: Optional[tuple[int, int, int]] = None  # (C, h, w): latent.npy holds (2C, h, w) float32 moments

    def describe(self) -> str:
        """What decoding checks, in words (for ``distgen data verify``)."""
        if self.kind == "latents":
            what = "latents " + ("x".join(map(str, self.moments_shape)) + " float32, finite" if self.latent_shape
                                 else "float32, finite")
        else:
            size = "x".join(map(str, self.expect_size)) if self.expect_size else "any size"
            chans = self.expect_channels or self.channels
            what = ("image pairs " if self.kind == "paired" else "images ") + size + (f"x{chans}" if chans else "")
        if self.labels != "none":
            what += f", labels in [0, {self.num_classes or MAX_CLASSES})"
        return what

    @property
    def moments_shape(self) -> Optional[tuple[int, int, int]]:
        if self.latent_shape is None:
            return None
        c, h, w = self.latent_shape
        return 2 * c, h, w


def _to_resolution(im: Image.Image, res: int, mode: str) -> Image.Image:
    """Centre square crop (ADM/EDM style) or stretch, then an antialiased resize to res x res."""
    w, h = im.size
    if (w, h) == (res, res):
        return im
    if mode == "center_crop":
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        im = im.crop((left, top, left + s, top + s))
    return im.resize((res, res), Image.BICUBIC if max(w, h) < res else Image.LANCZOS)


def open_image(data: bytes, ext: str, load: bool = True) -> Image.Image:
    """Decode image bytes with PIL (told the format, which skips probing every plugin); ``load=False`` reads
    the header alone (size and mode), decoding nothing yet."""
    im = Image.open(io.BytesIO(data), formats=PIL_FORMATS[ext])
    if load:
        im.load()
    return im


def _to_chw(im: Image.Image) -> np.ndarray:
    """An L or RGB image as uint8 CxHxW.

    Through tobytes(): np.asarray(im) goes through PIL's array interface,
    which costs as much per small image as reading its tar member.
    """
    w, h = im.size
    arr = np.frombuffer(im.tobytes(), np.uint8)
    return arr.reshape(1, h, w) if im.mode == "L" else arr.reshape(h, w, 3).transpose(2, 0, 1)


def fit_image(im: Image.Image, resolution: int, resize: str) -> np.ndarray:
    """An L or RGB image at the model's size, as training saw its data (``data.resize``): uint8 CxHxW."""
    return _to_chw(_to_resolution(im, resolution, resize))


def resize_batch(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 BxCxHxW (C = 1 or 3, square) at another size -> uint8 BxCxRxR through the same PIL resampling
    the pipeline reads stored images with (bicubic up, Lanczos down); fit-features' calibration measures
    with it what a round trip through another size costs."""
    if x.shape[-1] == resolution and x.shape[-2] == resolution:
        return x
    arr = x.cpu().numpy()
    out = [_to_chw(_to_resolution(Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)),
                                  resolution, "stretch")) for a in arr]
    return torch.from_numpy(np.stack(out)).to(x.device)


def _label(s: dict, out: dict, spec: DecodeSpec) -> None:
    if spec.labels == "none":
        return
    key, url = s["__key__"], s["__url__"]
    if "cls" in s:
        digits = s["cls"].strip()
        if not (digits.isdigit() and len(digits) <= 6):  # ASCII digits: no sign, no 1e9, no 10**100
            raise DataError(f"shard {url}, key {key}: 'cls' is not a class number: {s['cls'][:20]!r}")
        label, n = int(digits), spec.num_classes
        # A label of n would train as classifier-free guidance's null class, one above as an index error.
        if label >= (n or MAX_CLASSES):
            raise DataError(f"shard {url}, key {key}: 'cls' {label} is out of range: "
                            + (f"the manifest lists {n} classes (0 to {n - 1})" if n else
                               f"distgen takes at most {MAX_CLASSES} classes"))
        out["label"] = label
    elif spec.labels == "required":
        raise DataError(f"shard {url}, key {key}: missing 'cls' label (data.labels is true)")
    else:
        out["label"] = -1


def _latent(raw: bytes, spec: DecodeSpec, where: str) -> np.ndarray:
    """A stored ``latent.npy``: its header checked against the manifest before any array is made (np.load
    would allocate whatever shape a header claims), then its values (finite)."""
    f = io.BytesIO(raw)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"npy format version {version[0]}.{version[1]}; a float32 array is 1.0 or 2.0")
    except (ValueError, EOFError) as e:
        raise DataError(f"{where}: 'latent.npy' is not a numpy array ({e})") from None
    want = spec.moments_shape
    if dtype != np.float32 or (shape != want if want else len(shape) != 3):
        raise DataError(f"{where}: 'latent.npy' is {dtype} {list(shape)}, expected float32 "
                        + (f"{list(want)} (the manifest's latent_shape {list(spec.latent_shape)}: mean and "
                           f"log-variance)" if want else "of 3 dimensions"))
    count = int(np.prod(shape))
    if len(raw) - f.tell() != 4 * count:
        raise DataError(f"{where}: 'latent.npy' holds {len(raw) - f.tell()} bytes of values, its header says "
                        f"{4 * count} (truncated or corrupt)")
    lat = np.frombuffer(raw, np.float32, count, f.tell()).reshape(shape, order="F" if fortran else "C")
    if not np.isfinite(lat).all():
        raise DataError(f"{where}: 'latent.npy' holds {int((~np.isfinite(lat)).sum())} non-finite values")
    return lat


def decode_latents(samples: Iterable[dict], spec: DecodeSpec, policy: ErrorPolicy) -> Iterator[dict]:
    """Stage: stored bytes -> ``{"key", "latent": float32 array, "label"}`` (latent shards)."""
    for s in samples:
        key, url = s["__key__"], s["__url__"]
        where = f"shard {url}, key {key}"
        try:
            if "latent.npy" not in s:
                raise DataError(f"{where}: no 'latent.npy' member (the manifest says latent shards)")
            out = {"key": key, "index": s["__index__"], "latent": _latent(s["latent.npy"], spec, where)}
            _label(s, out, spec)
            yield out
        except DataError as e:
            policy(e)


def _image_ext(s: dict, prefix: str = "") -> Optional[str]:
    """The sample's image member: ``png`` first, else another of IMAGE_EXTS; ``prefix`` "a." or "b." for a pair."""
    return next((prefix + e for e in IMAGE_EXTS if prefix + e in s), None)


_UNDECODABLE = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def _open_member(s: dict, member: str, where: str) -> Image.Image:
    """A sample's image, its header read (size and mode), its pixels not decoded yet (:func:`_load_member`)."""
    try:
        return open_image(s[member], member.rpartition(".")[2], load=False)
    except _UNDECODABLE as e:
        raise DataError(f"{where}: '{member}' is not a decodable image ({e})") from None


def _load_member(im: Image.Image, member: str, spec: DecodeSpec, where: str, what: str) -> Image.Image:
    """``im`` decoded, once its size and channels match the manifest: an image of another size costs nothing
    to refuse, whatever size it claims."""
    expect_c = spec.expect_channels or spec.channels
    chans = pixel_channels(im.mode)  # alpha does not count
    if expect_c and chans != expect_c:
        raise DataError(f"{where}: {what} has {chans} channel(s), expected {expect_c}")
    if spec.expect_size is not None and im.size != (spec.expect_size[1], spec.expect_size[0]):
        raise DataError(f"{where}: {what} is {im.size[1]}x{im.size[0]}, expected "
                        f"{spec.expect_size[0]}x{spec.expect_size[1]} (from the manifest)")
    try:
        im.load()
    except _UNDECODABLE as e:
        raise DataError(f"{where}: '{member}' is not a decodable image ({e})") from None
    return im


def _image_array(im: Image.Image, spec: DecodeSpec, where: str, what: str) -> np.ndarray:
    """A stored image (checked by :func:`_load_member`) in 8 bits (:func:`distgen.data.pixels.to_8bit`), as uint8
    CxHxW at the resolution."""
    if im.mode not in ("L", "RGB") or "transparency" in im.info:
        im = to_8bit(im, f"{where}: {what}")
    if spec.channels and im.mode != ("L" if spec.channels == 1 else "RGB"):
        im = im.convert("L" if spec.channels == 1 else "RGB")
    return _to_chw(_to_resolution(im, spec.resolution, spec.resize) if spec.resolution else im)


def decode(samples: Iterable[dict], spec: DecodeSpec, policy: ErrorPolicy) -> Iterator[dict]:
    """Stage: stored bytes -> ``{"key", "image": uint8 CxHxW, "label"}`` at the configured resolution."""
    if spec.kind == "latents":
        yield from decode_latents(samples, spec, policy)
        return
    if spec.kind == "paired":
        yield from decode_paired(samples, spec, policy)
        return
    for s in samples:
        key, url = s["__key__"], s["__url__"]
        where = f"shard {url}, key {key}"
        try:
            ext = _image_ext(s)
            if ext is None:
                # Paired shards read without their manifest land here: say so.
                hint = "; it holds a paired sample (a and b images): pass the shards' manifest, which says " \
                       "layout paired" if _image_ext(s, "a.") else ""
                raise DataError(f"{where}: no image member (one of {', '.join(IMAGE_EXTS)}){hint}")
            im = _load_member(_open_member(s, ext, where), ext, spec, where, "image")
            out = {"key": key, "index": s["__index__"], "image": _image_array(im, spec, where, "image")}
            _label(s, out, spec)
            yield out
        except DataError as e:
            policy(e)


def decode_paired(samples: Iterable[dict], spec: DecodeSpec, policy: ErrorPolicy) -> Iterator[dict]:
    """Stage: a paired sample's bytes -> ``{"key", "a": uint8 CxHxW, "b": uint8 CxHxW, "label"}``.

    Each side is decoded, checked and resized as :func:`decode` does a single image; the two must have
    been stored at one size, so that a centre crop cuts the same part of both and they stay aligned.
    """
    for s in samples:
        key, url = s["__key__"], s["__url__"]
        where = f"shard {url}, key {key}"
        try:
            members = {}
            for side in ("a", "b"):
                members[side] = _image_ext(s, side + ".")
                if members[side] is None:
                    raise DataError(f"{where}: paired sample has no '{side}' image (one of "
                                    f"{', '.join(side + '.' + e for e in IMAGE_EXTS)})")
            ims = {side: _open_member(s, m, where) for side, m in members.items()}
            (wa, ha), (wb, hb) = ims["a"].size, ims["b"].size
            if (wa, ha) != (wb, hb):
                raise DataError(f"{where}: 'a' is {ha}x{wa} but 'b' is {hb}x{wb}; the two images of a pair must "
                                f"have one size")
            out = {"key": key, "index": s["__index__"]}
            for side, im in ims.items():
                what = f"'{side}' image"
                out[side] = _image_array(_load_member(im, members[side], spec, where, what), spec, where, what)
            _label(s, out, spec)
            yield out
        except DataError as e:
            policy(e)


def random_flip(samples: Iterable[dict], rng: random.Random) -> Iterator[dict]:
    """Stage: horizontal flip with probability 1/2; both images of a pair or neither, so they stay aligned."""
    for s in samples:
        if rng.random() < 0.5:
            for k in IMAGE_KEYS:
                if k in s:
                    s[k] = s[k][:, :, ::-1]
        yield s


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


# --------------------------------------------------------------------------- verifying
def manifest_spec(meta: dict) -> DecodeSpec:
    """How ``distgen data verify --decode`` decodes the shards of a manifest: as training does, at the stored
    size, every check the manifest allows (size, channels, labels required when it lists classes, latents'
    shape)."""
    kind = "paired" if meta.get("layout") == "paired" else meta.get("kind", "images")
    n = meta.get("num_classes") or None
    return DecodeSpec(None, meta.get("channels") or 0, labels="required" if n else "none",
                      expect_size=tuple(meta["image_size"]) if meta.get("image_size") else None,
                      expect_channels=meta.get("channels"), kind=kind, num_classes=n,
                      latent_shape=tuple(meta["latent_shape"]) if meta.get("latent_shape") else None)


class _Tally(ErrorPolicy):
    """A policy that keeps the first error and counts the samples lost, quietly."""

    def __init__(self):
        super().__init__("skip")
        self.first: Optional[str] = None

    def __call__(self, err: DataError, lost: Optional[int] = 1) -> None:
        self.first = self.first or str(err)
        self.skipped += 1 if lost is None else max(lost, 1)


def check_shard(url: str, count: Optional[int], shard: int, spec: DecodeSpec) -> tuple[int, Optional[str]]:
    """Decode every sample of one shard as training does: (bad samples, the first one's error or None)."""
    policy = _Tally()
    for _ in decode(read_tar([Slice(url, 0, count, shard, count)], policy), spec, policy):
        pass
    return policy.skipped, policy.first


# --------------------------------------------------------------------------- datasets
def stream_seed(seed: int, rank: int, worker: int, step: int, stream: Optional[int] = None) -> int:
    """Seed for one rank's worker, from (seed, rank, worker, start step); ``stream`` tells apart the streams of
    one such worker (unpaired training's domains A and B: :data:`STREAM_A`, :data:`STREAM_B`)."""
    return derive_seed(seed, rank, worker, step) if stream is None else derive_seed(seed, rank, worker, step, stream)


class ShardStream(torch.utils.data.IterableDataset):
    """The pipeline above as an IterableDataset of batches (use with ``batch_size=None``)."""

    def __init__(
        self,
        shards: ShardSet,
        *,
        mode: str,
        batch_size: int,
        decode_spec: DecodeSpec,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        start_step: int = 0,
        shuffle_buffer: int = 2000,
        flip: bool = False,
        on_error: str = "raise",
        stream: Optional[int] = None,
    ):
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be train or eval, got {mode!r}")
        self.shards, self.mode, self.batch_size, self.spec = shards, mode, batch_size, decode_spec
        self.rank, self.world, self.seed, self.start_step = rank, world, seed, start_step
        self.shuffle_buffer, self.flip, self.on_error = shuffle_buffer, flip, on_error
        self.stream = stream  # see stream_seed

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if info is not None:
            # Objects inherited from the parent (torch, diffusers, ...) need no
            # scanning by this worker's garbage collector.
            gc.freeze()
        policy = ErrorPolicy(self.on_error)
        if self.mode == "eval":
            slices = [Slice(u, 0, c, i, c) for i, (u, c) in enumerate(zip(self.shards.urls, self.shards.counts))]
            slices = split_by_node(slices, self.rank, self.world)
            slices = split_by_worker(slices, worker, workers)
            samples = read_tar(slices, policy)
        else:
            rng = random.Random(stream_seed(self.seed, self.rank, worker, self.start_step, self.stream))
            shards = list(zip(self.shards.urls, self.shards.counts))
            shards = deal_shards(shards, self.rank, self.world)
            shards = deal_shards(shards, worker, workers)
            samples = read_tar(resample(shards, rng), policy, endless=True)
            samples = shuffle(samples, self.shuffle_buffer, rng)
        samples = decode(samples, self.spec, policy)
        if self.flip and self.mode == "train":
            samples = random_flip(samples, rng)
        try:
            yield from batched(samples, self.batch_size, policy)
        except DataError as e:
            if info is None:
                raise
            # In a DataLoader worker: hand the message to the main process as data. Raised here, torch would
            # re-raise it there wrapped in "Caught DataError in DataLoader worker process 0" and a traceback.
            yield {"error": str(e)}


class Loader:
    """Iterates a :class:`ShardStream` through a DataLoader and finishes batches in the main process.

    Images (``image``, or a pair's ``a`` and ``b``) become float tensors in [-1, 1], NCHW. ``count`` is the number of
    samples delivered on this rank, ``skipped`` the bad inputs skipped by all
    of this rank's workers.
    """

    def __init__(self, dataset: ShardStream, workers: int = 2, pin_memory: bool = False, as_float: bool = True):
        self.dataset = dataset
        self.workers = workers
        self.as_float = as_float  # False: uint8 tensors, as metrics' feature extractors take them
        self.loader = torch.utils.data.DataLoader(
            # Batches are already made; identity collate keeps numpy as numpy.
            dataset, batch_size=None, collate_fn=_identity, num_workers=workers, pin_memory=pin_memory,
            worker_init_fn=functools.partial(_worker_init, parent=os.getpid()) if workers > 0 else None,
            # Workers stay alive across passes in training; eval makes one pass.
            persistent_workers=False,
            prefetch_factor=4 if workers > 0 else None,
        )
        self.count = 0
        self.skipped = 0

    def _start(self):
        """The DataLoader's iterator: its workers start here.

        A scheduler's SIGTERM / SIGUSR1 stays blocked while they start, so a worker is born with
        them blocked and only its watch thread (:func:`_worker_init`) ever takes them; torch's own
        worker handler would otherwise let a signal that lands before ``_worker_init`` runs kill
        the worker (and crash the run it should checkpoint). Here the signals arrive when the
        block ends.
        """
        if not self.workers:
            return iter(self.loader)
        import signal

        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGUSR1})
        try:
            return iter(self.loader)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def __iter__(self) -> Iterator[dict]:
        for batch in self._start():
            if "error" in batch:  # a worker's DataError, raised here with its own message
                raise DataError(batch["error"])
            self.skipped += batch.pop("skipped", 0)
            if "key" not in batch:  # only a skip count
                continue
            if "latent" in batch:
                batch["latent"] = torch.from_numpy(batch["latent"])
            for k in IMAGE_KEYS:
                if k in batch:
                    batch[k] = to_float(batch[k]) if self.as_float else torch.from_numpy(batch[k])
            if "label" in batch:
                batch["label"] = torch.from_numpy(batch["label"])
            self.count += len(batch["key"])
            yield batch


def _identity(x):
    return x


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent(parent: int) -> None:
    """Have the kernel kill this process (SIGKILL) when its parent dies, however the parent dies.

    A parent killed with SIGKILL runs no clean-up, and a worker blocked writing batches into a full
    queue (the loader ahead of training) would otherwise live on, holding its memory, for good. Linux
    only; elsewhere torch's own watchdog (a check every few seconds while idle) is what remains. The
    signal follows the parent *thread* that started the worker: loaders are iterated on the main thread.
    """
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the line above: nobody is left to read our batches
        os._exit(0)


def _worker_init(_worker_id: int, parent: int) -> None:
    """Let a worker outlive a scheduler's SIGTERM/SIGUSR1 but not its parent.

    SLURM signals every process of a job; the main process turns the signal
    into a checkpoint, and a worker that died first would crash it (the
    DataLoader raises on a worker killed by a signal). The parent's own
    terminate() at shutdown is also a SIGTERM, so a thread reads each signal
    with its sender and exits only when the sender is the parent. A parent
    that dies takes its workers with it (:func:`_die_with_parent`).
    """
    import signal
    import threading

    _die_with_parent(parent)
    sigs = {signal.SIGTERM, signal.SIGUSR1}
    signal.pthread_sigmask(signal.SIG_BLOCK, sigs)

    def watch():
        while True:
            info = signal.sigwaitinfo(sigs)
            if info.si_signo == signal.SIGTERM and info.si_pid == parent:
                os._exit(0)

    threading.Thread(target=watch, name="distgen-signals", daemon=True).start()


def to_float(images: np.ndarray) -> torch.Tensor:
    """uint8 BxCxHxW -> float BxCxHxW in [-1, 1].

    Done in numpy, which stays on one thread: torch would wake its intra-op
    threads here, and they spin on the cores the data workers need.
    """
    x = images.astype(np.float32)
    x *= 1 / 127.5
    x -= 1.0
    return torch.from_numpy(x)


def make_loader(
    inputs: str | Sequence[str],
    cfg,  # DataConfig
    *,
    batch_size: int,
    mode: str,
    rank: int = 0,
    world: int = 1,
    seed: int = 0,
    start_step: int = 0,
    pin_memory: bool = False,
    as_float: bool = True,
    stream: Optional[int] = None,
) -> Loader:
    """Build a :class:`Loader` over ``inputs`` from a :class:`~distgen.config.DataConfig`.

    Batches hold ``image`` (layouts images and domain), ``a`` and ``b`` (paired) or ``latent``, with
    ``key``, ``index`` and ``label`` when the shards are labelled.
    """
    shards = resolve_shards(inputs)
    meta = shards.meta
    size = tuple(meta["image_size"]) if meta.get("image_size") else None
    if cfg.labels and meta and meta.get("num_classes") == 0:
        raise DataError(f"data.labels is true but the manifest of {shards.urls[0]} lists no classes")
    labels = "required" if cfg.labels else ("optional" if meta.get("num_classes") else "none")
    kind = meta.get("kind", "images")
    if meta.get("layout", "images") not in LAYOUTS:
        raise DataError(f"{_first(inputs)}: unknown layout {meta['layout']!r} (one of {', '.join(LAYOUTS)})")
    if meta.get("layout") == "paired":
        kind = "paired"
    if kind == "latents" and cfg.flip:
        raise DataError(f"data.flip: {shards.urls[0]} holds latents, which cannot be flipped like images")
    latent_shape = tuple(meta["latent_shape"]) if meta.get("latent_shape") else None
    spec = DecodeSpec(cfg.resolution, cfg.channels, cfg.resize, labels, size, meta.get("channels"), kind,
                      meta.get("num_classes") or None, latent_shape)
    if meta.get("channels") and meta["channels"] != cfg.channels:
        raise DataError(f"data.channels is {cfg.channels} but the shards hold {meta['channels']}-channel images "
                        f"({_first(inputs)})")
    ds = ShardStream(
        shards, mode=mode, batch_size=batch_size, decode_spec=spec, rank=rank, world=world, seed=seed,
        start_step=start_step, shuffle_buffer=cfg.shuffle_buffer, flip=cfg.flip, on_error=cfg.on_error,
        stream=stream,
    )
    return Loader(ds, workers=cfg.workers, pin_memory=pin_memory, as_float=as_float)


# --------------------------------------------------------------------------- unpaired training
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
        meta, where = read_layout(list(inputs)), _first(list(inputs))
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

"""Decoding: a sample's stored bytes -> uint8 CxHxW images (one, or a pair's ``a`` and ``b``) or latents, with
its label, checked against the manifest (:class:`DecodeSpec`); and training's random flip."""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import numpy as np
import torch
from PIL import Image

from distgen.data.errors import DataError
from distgen.data.pixels import channels as pixel_channels
from distgen.data.pixels import to_8bit
from distgen.data.policy import ErrorPolicy
from distgen.readback import MAX_CLASSES

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
PIL_FORMATS = {"png": ["PNG"], "jpg": ["JPEG"], "jpeg": ["JPEG"], "webp": ["WEBP"]}
IMAGE_KEYS = ("image", "a", "b")  # a sample's (and a batch's) images: one, or a pair


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

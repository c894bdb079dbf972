"""Sources that are folders of image files: ``folder:`` (class subfolders or none), ``pix2pix:`` (A|B side by side)
and ``cyclegan:`` (one flat folder per domain)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from distgen.data.errors import DataError
from distgen.data.pixels import channels as pixel_channels
from distgen.data.pixels import to_8bit
from distgen.data.sources.base import DOMAINS, Source

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


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


def folder(root: Path, spec: str) -> Source:
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


def pix2pix(root: Path, split: str, spec: str) -> Source:
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


def cyclegan(root: Path, split: str, spec: str) -> list[tuple[str, Source]]:
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

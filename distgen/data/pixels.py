"""Every stored pixel format into the 8-bit grey (``L``) or colour (``RGB``) images distgen trains on.

One function, :func:`to_8bit`, used when sharding a folder (:mod:`distgen.data.sources`) and when decoding
shards (:mod:`distgen.data.decode`), so an image means the same thing on both paths. Pillow's own
``convert("L")`` clips 16-bit values (almost every pixel of a 16-bit photo becomes 255) and drops alpha,
leaving whatever colour transparent pixels happen to hold; here:

- 16-bit grey is scaled: ``round(x * 255 / 65535)``, exactly;
- transparency (an alpha channel, premultiplied or not, or a colour key) is composited on
  :data:`BACKGROUND`, white, with exact integer rounding;
- palettes become RGB (their alpha composited as above), bilevel images 0 and 255;
- 32-bit integer (``I``, but from a PNG, which holds 16 bits at most) and float (``F``) pixels have no
  known range and are refused by name.

docs/data.md has the table of every mode.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from distgen.data.errors import DataError

# White: transparent pixels show what a viewer or a web page shows behind them (and what web-scale
# pipelines such as img2dataset composite on); black would make cut-out objects indistinguishable from
# dark ones.
BACKGROUND = 255
GREY_MODES = frozenset(("1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"))


def channels(mode: str) -> int:
    """The channels an image of ``mode`` has once converted (alpha does not count): 1 or 3."""
    return 1 if mode in GREY_MODES else 3


def _from_array(a: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(a, dtype=np.uint8), "L" if a.ndim == 2 else "RGB")


def _composite(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Straight alpha on BACKGROUND: round((c * a + bg * (255 - a)) / 255), in integers (255 is odd: no ties)."""
    c, a = colour.astype(np.uint32), alpha.astype(np.uint32)
    if c.ndim == 3:
        a = a[..., None]
    return (c * a + BACKGROUND * (255 - a) + 127) // 255


def _composite_premultiplied(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Premultiplied alpha (La, RGBa) on BACKGROUND: c + bg * (255 - a) / 255."""
    c, a = colour.astype(np.int32), alpha.astype(np.int32)
    if c.ndim == 3:
        a = a[..., None]
    return np.clip(c + (BACKGROUND * (255 - a) + 127) // 255, 0, 255)


def _keyed(values: np.ndarray, key, grey: np.ndarray) -> np.ndarray:
    """``grey`` (or colour) with the pixels whose stored ``values`` equal the colour key made BACKGROUND."""
    hit = values == key if values.ndim == 2 else (values == np.asarray(key)).all(axis=-1)
    out = grey.copy()
    out[hit] = BACKGROUND
    return out


def to_8bit(im: Image.Image, where: str) -> Image.Image:
    """``im`` as an ``L`` or ``RGB`` image (see the module's docstring); a DataError starting with ``where``
    for pixels that have no 8-bit meaning."""
    mode, key = im.mode, im.info.get("transparency")
    if key is not None and mode not in ("1", "L", "RGB", "P", "I;16", "I;16L", "I;16B", "I;16N", "I"):
        key = None  # a key beside an alpha channel: the channel says it all
    if mode in ("L", "RGB") and key is None:
        return im
    if mode == "1":  # 0 and 255; Pillow states a key of such an image in the same terms
        im, mode = im.convert("L"), "L"
        if key is None:
            return im
    if mode.startswith("I;16") or (mode == "I" and im.format == "PNG"):  # older Pillow reads 16-bit PNGs as I
        raw = np.asarray(im)
        if mode == "I" and (raw.min(initial=0) < 0 or raw.max(initial=0) > 65535):
            raise DataError(f"{where}: a PNG of values outside 16 bits (corrupt)")
        grey = (raw.astype(np.uint32) + 128) // 257  # = round(x * 255 / 65535): 65535 / 255 = 257, odd
        return _from_array(grey if key is None else _keyed(raw, key, grey))
    if mode in ("I", "F"):
        kind = "32-bit integer" if mode == "I" else "floating-point"
        raise DataError(f"{where}: {kind} pixels (mode {mode}) have no range distgen can know; store 8- or "
                        f"16-bit images")
    if mode in ("L", "RGB"):  # with a colour key
        raw = np.asarray(im)
        if np.max(key) > 255:
            raise DataError(f"{where}: a 16-bit colour key on an image Pillow reads as 8 bits; store the "
                            f"transparency as an alpha channel")
        return _from_array(_keyed(raw, key, raw))
    if mode in ("P", "PA"):
        if mode == "P" and key is None and im.palette is not None and im.palette.mode == "RGB":
            return im.convert("RGB")
        im, mode = im.convert("RGBA"), "RGBA"  # a transparency key or an alpha in the palette or beside it
    if mode in ("LA", "RGBA", "La", "RGBa"):
        a = np.asarray(im)
        colour, alpha = (a[..., 0], a[..., 1]) if mode[0] == "L" else (a[..., :3], a[..., 3])
        blend = _composite if mode[-1] == "A" else _composite_premultiplied
        return _from_array(blend(colour, alpha))
    try:  # RGBX, CMYK, YCbCr, ...: colour models Pillow converts itself
        return im.convert("RGB")
    except ValueError as e:
        raise DataError(f"{where}: pixels of mode {mode} cannot be read as RGB ({e})") from None

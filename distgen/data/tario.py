"""A lean reader of tar members, for the loader's hot path.

Python's tarfile parses every header field of every member; for shards of
small images that parsing costs as much as decoding the image. This reader
takes only what a shard needs (name, size, type), verifies each header's
checksum and reads from any binary stream (local file or ``pipe:``).
"""

from __future__ import annotations

from array import array
from typing import BinaryIO, Callable, Iterator, Optional

BLOCK = 512


class TarFormatError(ValueError):
    """The stream is not a well-formed tar (truncated or corrupt)."""


def _octal(field: bytes) -> int:
    if field[:1] == b"\x80":  # GNU base-256 for large values
        return int.from_bytes(field[1:], "big")
    field = field.rstrip(b"\x00 ")
    return int(field, 8) if field else 0


def _read_exact(f: BinaryIO, n: int, what: str) -> bytes:
    data = f.read(n)
    while len(data) < n:
        more = f.read(n - len(data))
        if not more:
            raise TarFormatError(f"unexpected end of data in {what}")
        data += more
    return data


def _pax_records(data: bytes) -> dict[str, str]:
    out, pos = {}, 0
    while pos < len(data):
        sp = data.index(b" ", pos)
        length = int(data[pos:sp])
        kv = data[sp + 1:pos + length - 1].decode("utf-8")
        k, _, v = kv.partition("=")
        out[k] = v
        pos += length
    return out


def iter_entries(f: BinaryIO, read_data: bool = True, pos: int = 0) -> Iterator[tuple[str, Optional[bytes], int]]:
    """Yield ``(name, data, pos)`` for each regular file; ``pos`` is where its first header starts.

    Positions count from ``pos``, the stream's position on entry. With
    ``read_data=False`` the data of a seekable stream is seeked over, not
    read, and ``data`` is None.
    """
    long_name = None
    pax: dict[str, str] = {}
    here = pos
    while True:
        hdr = f.read(BLOCK)
        if len(hdr) < BLOCK:
            if len(hdr) == 0:
                raise TarFormatError("stream ended without the end-of-archive marker (truncated?)")
            hdr += _read_exact(f, BLOCK - len(hdr), "a member header")
        if hdr.count(0) == BLOCK:
            return  # end-of-archive
        chksum = _octal(hdr[148:156])
        if chksum != sum(hdr[:148]) + 256 + sum(hdr[156:]):
            raise TarFormatError("bad header checksum (corrupt data)")
        size = _octal(hdr[124:136])
        kind = hdr[156:157]
        name = hdr[0:100].split(b"\x00", 1)[0].decode("utf-8", "replace")
        prefix = hdr[345:500].split(b"\x00", 1)[0] if hdr[257:262] == b"ustar" else b""
        if prefix:
            name = prefix.decode("utf-8", "replace") + "/" + name
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        here += BLOCK + padded
        regular = kind in (b"0", b"\x00", b"7")
        if regular and not read_data:
            data = None
            f.seek(padded, 1)
        else:
            data = _read_exact(f, padded, f"member {name!r}")[:size] if padded else b""
        if kind in (b"x", b"g"):  # PAX extended header: applies to the next member
            if kind == b"x":
                pax = _pax_records(data)
            continue
        if kind == b"L":  # GNU long name
            long_name = data.rstrip(b"\x00").decode("utf-8", "replace")
            continue
        if regular:
            name = pax.get("path", long_name or name)
            if "size" in pax and int(pax["size"]) != size:
                raise TarFormatError(f"member {name!r}: PAX sizes over 8 GiB are not supported")
            yield name, data, pos
        long_name, pax = None, {}
        pos = here


def iter_members(f: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """Yield ``(name, data)`` for each regular file in the tar stream ``f``.

    Raises TarFormatError on a bad checksum, a truncated member or a stream
    that ends without the end-of-archive blocks.
    """
    for name, data, _ in iter_entries(f):
        yield name, data


def seek_sample(f: BinaryIO, n: int, key: Callable[[str], str], index: "array[int]") -> None:
    """Move the seekable stream ``f`` (a whole shard) to the first header of sample ``n`` (0-based).

    Samples are runs of members with the same ``key(name)``. ``index`` holds
    the known positions of samples 0, 1, ...; it is used, and extended by the
    headers read here. Member data is seeked over, so an unknown stretch costs
    one header read per member. Raises TarFormatError when the shard holds
    ``n`` samples or fewer.
    """
    if n < len(index):
        f.seek(index[n])
        return
    i = max(len(index) - 1, 0)
    f.seek(index[i] if index else 0)
    i, prev = i - 1, None
    for name, _, pos in iter_entries(f, read_data=False, pos=f.tell()):
        k = key(name)
        if k != prev:
            i, prev = i + 1, k
            if i == len(index):
                index.append(pos)
            if i == n:
                f.seek(pos)
                return
    raise TarFormatError(f"ended after {i + 1} samples, before sample {n}")

"""A lean reader of tar members, for the loader's hot path.

Python's tarfile parses every header field of every member; for shards of
small images that parsing costs as much as decoding the image. This reader
takes only what a shard needs (name, size, type), verifies each header's
checksum and reads from any binary stream (local file or ``pipe:``).
"""

from __future__ import annotations

from typing import BinaryIO, Iterator

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


def iter_members(f: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """Yield ``(name, data)`` for each regular file in the tar stream ``f``.

    Raises TarFormatError on a bad checksum, a truncated member or a stream
    that ends without the end-of-archive blocks.
    """
    long_name = None
    pax: dict[str, str] = {}
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
        data = _read_exact(f, padded, f"member {name!r}") if padded else b""
        data = data[:size]
        if kind in (b"x", b"g"):  # PAX extended header: applies to the next member
            if kind == b"x":
                pax = _pax_records(data)
            continue
        if kind == b"L":  # GNU long name
            long_name = data.rstrip(b"\x00").decode("utf-8", "replace")
            continue
        if kind in (b"0", b"\x00", b"7"):
            name = pax.get("path", long_name or name)
            if "size" in pax and int(pax["size"]) != size:
                raise TarFormatError(f"member {name!r}: PAX sizes over 8 GiB are not supported")
            yield name, data
        long_name, pax = None, {}

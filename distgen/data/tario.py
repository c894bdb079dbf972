"""A lean reader of tar members, for the loader's hot path.

Python's tarfile parses every header field of every member; for shards of
small images that parsing costs as much as decoding the image. This reader
takes only what a shard needs (name, size, type), verifies each header's
checksum and reads from any binary stream (local file or ``pipe:``).

A shard is untrusted input: every header is checked as strictly as tarfile
checks it (number fields, PAX records), sizes are bounded before anything is
allocated, and every loop over the data advances or fails, so a crafted tar
raises :class:`TarFormatError` instead of looping or exhausting memory.
"""

from __future__ import annotations

from array import array
from typing import BinaryIO, Callable, Iterator, Optional

BLOCK = 512
MAX_HEADER = 1 << 20  # a PAX or GNU long-name header: a path of 1 MiB is no path
MAX_MEMBER = 1 << 31  # one member of a shard (an image, a latent): 2 GiB
_CHUNK = 1 << 24  # reads larger than this grow with the data that arrives, not with the size a header claims
_OCTAL = b"01234567"
_REGULAR = (b"0", b"\x00", b"7")


class TarFormatError(ValueError):
    """The stream is not a well-formed tar (truncated or corrupt)."""


def _octal(field: bytes) -> int:
    """A number field as tarfile's ``nti`` reads it: octal digits up to a NUL (spaces around), or GNU base-256."""
    digits = field.rstrip(b"\x00 ")
    if digits.isdigit():  # the common case, fast; int() alone would also take "-7", "0o7", "7_7", " 7"
        try:
            return int(digits, 8)
        except ValueError:  # an 8 or a 9
            pass
    if field[:1] == b"\x80":  # GNU base-256 for large values
        return int.from_bytes(field[1:], "big")
    if field[:1] == b"\xff":  # base-256, negative: no size or checksum is
        raise TarFormatError("a negative number in a header field (corrupt data)")
    digits = field.split(b"\x00", 1)[0].strip(b" ")
    if digits.strip(_OCTAL):  # a negative size, say, would read the whole stream
        raise TarFormatError(f"invalid number field {field!r} in a header (corrupt data)")
    return int(digits, 8) if digits else 0


def _read_exact(f: BinaryIO, n: int, what: str) -> bytes:
    if n > _CHUNK:  # a size from a header: allocate as the data arrives
        parts, left = [], n
        while left:
            part = _read_exact(f, min(left, _CHUNK), what)
            parts.append(part)
            left -= len(part)
        return b"".join(parts)
    data = f.read(n)
    while len(data) < n:
        more = f.read(n - len(data))
        if not more:
            raise TarFormatError(f"unexpected end of data in {what}")
        data += more
    return data


def _skip(f: BinaryIO, n: int, seekable: bool, what: str) -> None:
    if seekable:
        f.seek(n, 1)
        return
    while n:  # a pipe: read and drop, a chunk at a time
        n -= len(_read_exact(f, min(n, _CHUNK), what))


def _pax_records(data: bytes) -> dict[str, str]:
    """The ``"%d %s=%s\\n"`` records of a PAX header, checked as tarfile (3.12+) checks them."""
    out, pos, end = {}, 0, len(data)
    while pos < end and data[pos] != 0:  # tarfile also stops at NUL padding
        sp = data.find(b" ", pos, pos + 21)
        digits = data[pos:sp]
        if sp < 0 or not digits.isdigit():
            raise TarFormatError("PAX header: a record without a decimal length (corrupt data)")
        length = int(digits)
        # Shortest record: "<digits> k=\n". A length below it (0 among them) would never advance.
        if length < len(digits) + 4 or pos + length > end:
            raise TarFormatError(f"PAX header: a record length of {length} at byte {pos} (corrupt data)")
        last = pos + length - 1
        k, eq, v = data[sp + 1:last].partition(b"=")
        if data[last] != 0x0A or not eq or not k:
            raise TarFormatError(f"PAX header: the record at byte {pos} is not 'key=value\\n' (corrupt data)")
        out[k.decode("utf-8", "replace")] = v.decode("utf-8", "replace")
        pos += length
    return out


def _stream_left(f: BinaryIO) -> Optional[int]:
    """Bytes left in a seekable stream, or None (a pipe)."""
    try:
        if not f.seekable():
            return None
        here = f.tell()
        end = f.seek(0, 2)
        f.seek(here)
        return end - here
    except (AttributeError, OSError, ValueError):
        return None


def iter_entries(f: BinaryIO, read_data: bool = True, pos: int = 0) -> Iterator[tuple[str, Optional[bytes], int]]:
    """Yield ``(name, data, pos)`` for each regular file; ``pos`` is where its first header starts.

    Positions count from ``pos``, the stream's position on entry. With
    ``read_data=False`` the data of a seekable stream is seeked over, not
    read, and ``data`` is None. Raises TarFormatError on a malformed header,
    a bad checksum, a member larger than what the stream holds (or than
    :data:`MAX_MEMBER`) and a stream that ends without the end-of-archive blocks.
    """
    left = _stream_left(f)
    seekable = left is not None
    end = pos + left if seekable else 1 << 62  # a pipe: the bound of one member is all there is to check
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
        # Before any read: a size the stream cannot hold, or no member of a shard has, is a corrupt header.
        if here > end or size > MAX_MEMBER:
            why = (f"more than a shard member may have ({MAX_MEMBER})" if size > MAX_MEMBER
                   else f"but only {end - here + padded} bytes follow its header (truncated?)")
            raise TarFormatError(f"member {name!r}: a size of {size} bytes, {why}")
        regular = kind in _REGULAR
        if regular:
            if read_data:
                data = _read_exact(f, padded, f"member {name!r}")[:size] if padded else b""
            else:
                data = None
                f.seek(padded, 1)
            name = pax.get("path", long_name or name)
            if "size" in pax:
                psize = pax["size"]
                if not (psize.isascii() and psize.isdigit()) or int(psize) != size:
                    raise TarFormatError(f"member {name!r}: PAX size {psize[:30]!r} is not the header's {size} "
                                         f"(PAX sizes over 8 GiB are not supported)")
            yield name, data, pos
        elif kind in (b"x", b"g", b"L", b"K"):  # metadata of the next member: small, read whole
            if size > MAX_HEADER:
                raise TarFormatError(f"a {kind.decode()!r} header of {size} bytes, more than {MAX_HEADER} "
                                     f"(corrupt data)")
            data = _read_exact(f, padded, "an extended header")[:size]
            if kind == b"x":  # PAX extended header: applies to the next member
                pax = _pax_records(data)
            elif kind == b"g":  # global: checked as tarfile does, but nothing in it applies to shards
                _pax_records(data)
            elif kind == b"L":  # GNU long name
                long_name = data.split(b"\x00", 1)[0].decode("utf-8", "replace")
            continue  # 'K', a GNU long link name, names nothing a shard reads
        else:  # a folder, link or device: no sample
            _skip(f, padded, seekable, f"member {name!r}")
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


def count_samples(f: BinaryIO, key: Callable[[str], str]) -> int:
    """The samples (runs of members with one ``key(name)``) in the tar stream ``f``, from its headers alone
    where ``f`` can seek (``distgen data verify``)."""
    n, prev = 0, None
    for name, _, _ in iter_entries(f, read_data=False if _stream_left(f) is not None else True):
        k = key(name)
        if k != prev:
            n, prev = n + 1, k
    return n

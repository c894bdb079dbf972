"""Reading: samples (a dict of member bytes per key) from the tar shards of :class:`~distgen.data.split.Slice` s,
and the shuffle buffer training passes them through."""

from __future__ import annotations

import os
import random
from array import array
from typing import Any, Iterable, Iterator, Optional

from distgen.data.errors import DataError
from distgen.data.policy import ErrorPolicy
from distgen.data.split import Slice
from distgen.data.streams import PipeStream, open_shard
from distgen.data.tario import iter_entries, seek_sample


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

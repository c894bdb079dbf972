"""One way to read back every file distgen (or anyone) left on disk: size-limited, parsed, checked.

A run folder, a manifest, an export or a statistics file may have been edited, truncated, copied from
elsewhere or crafted; distgen acts on what they say (which files to delete, how many samples to read, how
big a tensor to allocate). So each is read through here:

- a size limit before parsing (:func:`read_bytes`);
- JSON without duplicate keys, without nesting deeper than :data:`MAX_DEPTH`, without integers of more
  digits than Python parses (:func:`parse_json`);
- a schema of types and bounds (:class:`Int`, :class:`Num`, :class:`Str`, :class:`Name`, :class:`RelPath`,
  :class:`List`, :class:`Obj`, :class:`Map`, ...): counts and sizes bounded, numbers finite, names plain;
- names that stay inside their folder, links included (:func:`inside`).

A violation raises the caller's error type (``error=``) with the file and field first:
``runs/x/ema-snapshots/index.json: snapshots[1].file: '../../x' is not a plain file name``.

This module imports nothing from distgen and nothing heavy: launchers and ``--dry-run`` use it.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

MAX_DEPTH = 64  # JSON / YAML nesting: distgen's own files nest 6 deep at most (a config inside meta.json)
MiB = 1 << 20
# Bounds of what distgen's files count: generous for a cluster, small enough that nothing read from a file
# makes distgen allocate more than a machine has.
MAX_COUNT = 10 ** 12  # samples, images, steps (a trillion: 10^4 kimg-long runs at 10^5 images/s for years)
MAX_BYTES = 1 << 50  # a file size recorded in a manifest or index
MAX_CLASSES = 100_000  # class labels (ImageNet-21k has 21,841)
MAX_RESOLUTION = 8192
MAX_NAME = 255  # bytes in one file name (Linux's NAME_MAX)


class Where:
    """A file and a field inside it, for messages: ``FILE: field[2].sub``."""

    def __init__(self, file: Any, field: str = ""):
        self.file, self.field = file, field

    def __truediv__(self, key: Any) -> "Where":
        part = f"[{key}]" if isinstance(key, int) else (f".{key}" if self.field else str(key))
        return Where(self.file, self.field + part)

    def __str__(self) -> str:
        return f"{self.file}: {self.field}" if self.field else str(self.file)


class Schema:
    """A check of one value: :meth:`check` returns it (possibly normalised) or raises ``error``."""

    def check(self, value: Any, where: Where, error: type) -> Any:
        raise NotImplementedError

    @staticmethod
    def fail(where: Where, error: type, msg: str):
        raise error(f"{where}: {msg}")


def _show(value: Any) -> str:
    s = repr(value)
    return s if len(s) <= 80 else s[:77] + "..."


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


class Int(Schema):
    """An integer (not a boolean) in [lo, hi]."""

    def __init__(self, lo: int = 0, hi: int = MAX_COUNT):
        self.lo, self.hi = lo, hi

    def check(self, value, where, error):
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(where, error, f"expected an integer, got {_kind(value)} {_show(value)}")
        if not self.lo <= value <= self.hi:
            self.fail(where, error, f"{_show(value)} is out of range [{self.lo}, {self.hi}]")
        return value


class Num(Schema):
    """A finite number in [lo, hi] (integers accepted), returned as a float."""

    def __init__(self, lo: float = -math.inf, hi: float = math.inf):
        self.lo, self.hi = lo, hi

    def check(self, value, where, error):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(where, error, f"expected a number, got {_kind(value)} {_show(value)}")
        try:
            value = float(value)
        except OverflowError:
            self.fail(where, error, "is too large")
        if not math.isfinite(value):
            self.fail(where, error, f"must be finite, got {value}")
        if not self.lo <= value <= self.hi:
            self.fail(where, error, f"{value:g} is out of range [{self.lo:g}, {self.hi:g}]")
        return value


class Bool(Schema):
    def check(self, value, where, error):
        if not isinstance(value, bool):
            self.fail(where, error, f"expected true or false, got {_kind(value)} {_show(value)}")
        return value


class Str(Schema):
    """A string of at most ``max_len`` characters, one of ``choices`` or matching ``pattern`` when given."""

    def __init__(self, max_len: int = 4096, choices: Optional[Sequence[str]] = None, pattern: Optional[str] = None):
        self.max_len, self.choices = max_len, choices
        self.pattern = re.compile(pattern) if pattern else None

    def check(self, value, where, error):
        if not isinstance(value, str):
            self.fail(where, error, f"expected a string, got {_kind(value)} {_show(value)}")
        if len(value) > self.max_len:
            self.fail(where, error, f"a string of {len(value)} characters, more than {self.max_len}")
        if self.choices is not None and value not in self.choices:
            self.fail(where, error, f"{_show(value)} is not one of {', '.join(map(repr, self.choices))}")
        if self.pattern is not None and not self.pattern.fullmatch(value):
            self.fail(where, error, f"{_show(value)} does not have the expected form")
        return value


def name_problem(name: Any) -> Optional[str]:
    """Why ``name`` is not a plain file name (one component: no separator, no ``..``), or None."""
    if not isinstance(name, str):
        return f"expected a file name, got {_kind(name)} {_show(name)}"
    if name in ("", ".", ".."):
        return f"{name!r} is not a file name"
    if "/" in name or "\\" in name:
        return f"{_show(name)} is not a plain file name (it holds a path separator)"
    if any(ord(c) < 32 or c == "\x7f" for c in name):
        return f"{_show(name)} holds control characters"
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME:
        return f"a file name of more than {MAX_NAME} bytes"
    return None


class Name(Schema):
    """A plain file name inside the file's folder (see :func:`name_problem`), matching ``pattern`` if given."""

    def __init__(self, pattern: Optional[str] = None):
        self.pattern = re.compile(pattern) if pattern else None

    def check(self, value, where, error):
        problem = name_problem(value)
        if problem:
            self.fail(where, error, problem)
        if self.pattern is not None and not self.pattern.fullmatch(value):
            self.fail(where, error, f"{_show(value)} is not a name distgen writes here")
        return value


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


class RelPath(Schema):
    """A path relative to the file's folder, of plain names: no absolute path, no ``..``, no ``pipe:`` command or
    URL scheme (what runs or reaches out is only ever what the user typed)."""

    def check(self, value, where, error):
        if not isinstance(value, str) or not value:
            self.fail(where, error, f"expected a relative file path, got {_kind(value)} {_show(value)}")
        if _SCHEME.match(value) or value.startswith("/"):
            self.fail(where, error, f"{_show(value)}: only files relative to this file's folder are allowed (no "
                                    f"absolute path, pipe: command or URL)")
        for part in value.split("/"):
            problem = name_problem(part)
            if problem:
                self.fail(where, error, f"{_show(value)}: {problem} (a path relative to this file's folder)")
        return value


class Opt(Schema):
    """``inner`` or null."""

    def __init__(self, inner: Schema):
        self.inner = inner

    def check(self, value, where, error):
        return None if value is None else self.inner.check(value, where, error)


class List(Schema):
    def __init__(self, item: Schema, max_len: int = 1_000_000, min_len: int = 0):
        self.item, self.max_len, self.min_len = item, max_len, min_len

    def check(self, value, where, error):
        if not isinstance(value, list):
            self.fail(where, error, f"expected a list, got {_kind(value)} {_show(value)}")
        if not self.min_len <= len(value) <= self.max_len:
            self.fail(where, error, f"a list of {len(value)} items, expected {self.min_len} to {self.max_len}")
        return [self.item.check(v, where / i, error) for i, v in enumerate(value)]


class Tuple(Schema):
    """A list of fixed length whose items follow one schema each."""

    def __init__(self, *items: Schema):
        self.items = items

    def check(self, value, where, error):
        if not isinstance(value, list) or len(value) != len(self.items):
            self.fail(where, error, f"expected a list of {len(self.items)} items, got {_kind(value)} {_show(value)}")
        return [s.check(v, where / i, error) for i, (s, v) in enumerate(zip(self.items, value))]


class Obj(Schema):
    """A JSON object with the given fields. ``optional`` names those that may be missing; keys not listed
    are refused unless ``extra`` is True (kept as they are) or a schema (each checked with it)."""

    def __init__(self, fields: dict[str, Schema], optional: Sequence[str] = (), extra: Any = False):
        self.fields, self.optional, self.extra = fields, set(optional), extra

    def check(self, value, where, error):
        if not isinstance(value, dict):
            self.fail(where, error, f"expected an object, got {_kind(value)} {_show(value)}")
        missing = [k for k in self.fields if k not in value and k not in self.optional]
        if missing:
            self.fail(where, error, f"lacks {', '.join(repr(k) for k in missing)}")
        out = {}
        for k, v in value.items():
            if k in self.fields:
                out[k] = self.fields[k].check(v, where / k, error)
            elif self.extra is True:
                out[k] = v
            elif isinstance(self.extra, Schema):
                out[k] = self.extra.check(v, where / k, error)
            else:
                self.fail(where / k, error, f"unknown key (known here: {', '.join(sorted(self.fields))})")
        return out


class Map(Schema):
    """An object of any keys (strings of at most ``max_key`` characters) whose values follow ``value``."""

    def __init__(self, value: Schema, max_len: int = 10_000, max_key: int = 256):
        self.value, self.max_len, self.max_key = value, max_len, max_key

    def check(self, value, where, error):
        if not isinstance(value, dict):
            self.fail(where, error, f"expected an object, got {_kind(value)} {_show(value)}")
        if len(value) > self.max_len:
            self.fail(where, error, f"{len(value)} keys, more than {self.max_len}")
        for k in value:
            if len(k) > self.max_key:
                self.fail(where, error, f"a key of {len(k)} characters, more than {self.max_key}")
        return {k: self.value.check(v, where / k, error) for k, v in value.items()}


class Anything(Schema):
    """Plain JSON data that something else checks in depth (a stored config: the config schema does)."""

    def check(self, value, where, error):
        return value


class Data(Schema):
    """Plain JSON data of any shape (a family's small state), every number finite and every integer within
    +-MAX_COUNT, at most ``max_items`` values in all."""

    def __init__(self, max_items: int = 10_000):
        self.max_items = max_items

    def check(self, value, where, error):
        stack, seen = [(value, where)], 0
        while stack:
            v, w = stack.pop()
            seen += 1
            if seen > self.max_items:
                self.fail(where, error, f"holds more than {self.max_items} values")
            if isinstance(v, dict):
                stack.extend((c, w / k) for k, c in v.items())
            elif isinstance(v, list):
                stack.extend((c, w / i) for i, c in enumerate(v))
            elif isinstance(v, bool) or v is None or isinstance(v, str):
                continue
            elif isinstance(v, int):
                Int(-MAX_COUNT, MAX_COUNT).check(v, w, error)
            elif isinstance(v, float):
                Num().check(v, w, error)
        return value


class Check(Schema):
    """``inner``, then ``test(value)`` returns None or the problem in words."""

    def __init__(self, inner: Schema, test: Callable[[Any], Optional[str]]):
        self.inner, self.test = inner, test

    def check(self, value, where, error):
        value = self.inner.check(value, where, error)
        problem = self.test(value)
        if problem:
            self.fail(where, error, problem)
        return value


# --------------------------------------------------------------------------- reading
def read_bytes(path: Path, max_bytes: int, error: type, what: str = "file") -> bytes:
    """A file's bytes, refused before reading when larger than ``max_bytes``."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise error(f"{path}: {size} bytes, more than a {what} may hold ({max_bytes} bytes): not one distgen "
                        f"wrote, or damaged")
        with open(path, "rb") as f:
            return f.read(max_bytes + 1)[:max_bytes]
    except FileNotFoundError:
        raise error(f"{path}: missing") from None
    except IsADirectoryError:
        raise error(f"{path}: is a folder, not a file") from None
    except OSError as e:
        raise error(f"{path}: unreadable ({e.strerror or e})") from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def depth_problem(value: Any, limit: int = MAX_DEPTH) -> Optional[str]:
    """Whether plain data nests deeper than ``limit`` (iteratively: no recursion to exhaust)."""
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            if d > limit:
                return f"nested more than {limit} levels deep"
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return None


def parse_json(text: bytes | str, where: Any, error: type) -> Any:
    """JSON text into plain data: duplicate keys, nesting beyond :data:`MAX_DEPTH` and unparseable numbers are
    errors naming ``where``."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise error(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except RecursionError:  # the C parser stops itself on '[[[[...' before the stack runs out
        raise error(f"{where}: not readable JSON (nested too deep)") from None
    except ValueError as e:  # bad JSON, a duplicate key, an integer of more digits than Python parses
        raise error(f"{where}: not readable JSON ({e})") from None
    deep = depth_problem(data)
    if deep:
        raise error(f"{where}: not readable JSON ({deep})")
    return data


def read_json(path: Path, schema: Schema, *, error: type, max_bytes: int = 16 * MiB, what: str = "file") -> Any:
    """``path`` read (at most ``max_bytes``), parsed and checked against ``schema``: the checked value, or
    ``error`` naming the file and field."""
    data = parse_json(read_bytes(path, max_bytes, error, what), path, error)
    return schema.check(data, Where(path), error)


def iter_jsonl(path: Path, *, max_line: int = MiB) -> Iterator[tuple[int, Optional[Any]]]:
    """``(line number, record)`` for each non-empty line of a JSON-lines file, read line by line (a file of any
    size in bounded memory); the record is None where a line is not JSON or longer than ``max_line`` bytes."""
    with open(path, "rb") as f:
        for i, line in enumerate(_lines(f, max_line), 1):
            if line is None:
                yield i, None
                continue
            if not line.strip():
                continue
            try:
                yield i, parse_json(line, path, ValueError)
            except ValueError:
                yield i, None


def _lines(f, max_line: int) -> Iterator[Optional[bytes]]:
    """Lines of a binary file; a line longer than ``max_line`` comes as None (and is skipped to its end)."""
    while True:
        line = f.readline(max_line + 1)
        if not line:
            return
        if len(line) > max_line and not line.endswith(b"\n"):
            while True:  # the rest of the overlong line
                more = f.readline(max_line)
                if not more or more.endswith(b"\n"):
                    break
            yield None
            continue
        yield line


def inside(folder: Path, name: str, where: Any, error: type) -> Path:
    """``folder / name`` for a name already checked as plain (or a relative path of plain names), refused when
    it is, or passes through, a link that leads out of ``folder``."""
    path = Path(folder) / name
    try:
        if path.is_symlink() or any(p.is_symlink() for p in list(path.parents)[:len(Path(name).parts) - 1]):
            real, base = path.resolve(), Path(folder).resolve()
            if not real.is_relative_to(base):
                raise error(f"{where}: {name!r} is a link that leads out of {folder} (to {real}); distgen reads "
                            f"and writes only files inside it")
    except OSError as e:  # a link loop, say
        raise error(f"{where}: {name!r} cannot be resolved ({e.strerror or e})") from None
    return path


# --------------------------------------------------------------------------- pieces several files share
# DataInfo (distgen.families.base): the data geometry a family's networks are built for.
DATA_INFO = Obj({"resolution": Int(1, MAX_RESOLUTION), "channels": Int(1, 4), "num_classes": Int(0, MAX_CLASSES)},
                optional=("num_classes",))
# A stored config: a mapping of sections, each checked in depth by the config's own schema when it is built.
CONFIG = Map(Map(Anything(), max_len=1000), max_len=100)


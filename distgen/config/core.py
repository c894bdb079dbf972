"""Typed configuration: frozen dataclasses built from YAML plus dotted overrides.

A config file is plain YAML mirroring the dataclass tree; ``key.sub=value``
arguments on the command line override it. Everything is checked before
anything runs: unknown keys, wrong types and impossible values raise
:class:`ConfigError` naming the dotted field.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import yaml

from distgen.readback import MAX_DEPTH


_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type or impossible.

    The message always starts with the dotted field name (``train.batch_size``)
    and, when known, the file it came from.
    """


class _Raw(str):
    """A value typed on the command line: parsed according to the field's type."""


def check(cond: bool, field: str, msg: str) -> None:
    """Raise ConfigError for ``field`` unless ``cond`` holds (used by ``validate`` hooks)."""
    if not cond:
        raise ConfigError(f"{field}: {msg}")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _parse_raw(raw: _Raw) -> Any:
    try:
        return safe_yaml(str(raw), "override")
    except ConfigError:
        return str(raw)


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside braces and quotes: ``a-{0..1}.tar, b-{x,y}.tar`` is two items."""
    items, depth, quote, cur = [], 0, None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(cur)
            cur = ""
            continue
        cur += ch
    items.append(cur)
    return items


def _parse_raw_list(raw: _Raw, path: str) -> list:
    """A list typed on the command line: YAML flow syntax (``[a, b]``), one bare value (``a``), or a
    bracketed list whose items YAML cannot read plainly (``[a-{000000..000001}.tar]``: braces are
    YAML's mapping syntax), split at commas outside braces."""
    text = str(raw).strip()
    parsed = _parse_raw(raw)
    if isinstance(parsed, list):
        return parsed
    if not (text.startswith("[") and text.endswith("]")):
        return [str(raw)]
    inner = text[1:-1].strip()
    if not inner:
        return []
    out = []
    for item in _split_top_level(inner):
        item = item.strip()
        if len(item) >= 2 and item[0] == item[-1] and item[0] in "'\"":
            item = item[1:-1]
        if not item:
            raise ConfigError(f"{path}: empty item in the list {text}")
        out.append(item)
    return out


# A caller's way for a section to pick a subclass from its own contents: (class, mapping, path) -> class.
# ``model`` picks its family's dataclass this way (distgen.config.model_chooser).
Chooser = Callable[[type, dict, str], type]


def _build(tp: Any, value: Any, path: str, choose: Optional[Chooser] = None) -> Any:
    """Convert a YAML/override value into ``tp``, or raise ConfigError naming ``path``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, _Raw):
            value = _parse_raw(value)
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{path or '<root>'}: expected a mapping, got {value!r}")
        return build_dataclass(tp, value, path, choose)
    if origin is Literal:
        choices = typing.get_args(tp)
        v = str(value) if isinstance(value, _Raw) else value
        if v not in choices:
            raise ConfigError(f"{path}: {v!r} is not one of {', '.join(repr(c) for c in choices)}")
        return v
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if isinstance(value, _Raw) and _parse_raw(value) is None and type(None) in args:
            return None
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _build(a, value, path, choose)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{path}: {value!r} is not a {_type_name(tp)}")
    if origin in (list, tuple):
        (item,) = typing.get_args(tp)[:1]
        if isinstance(value, _Raw):
            value = _parse_raw_list(value, path)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        out = [_build(item, v, f"{path}[{i}]", choose) for i, v in enumerate(value)]
        return tuple(out)
    if tp is str:
        if isinstance(value, _Raw):
            return str(value)
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return str(value)
    if isinstance(value, _Raw):
        value = _parse_raw(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():  # more digits than Python parses
            raise ConfigError(f"{path}: {_short(value)} is out of range (at most {MAX_INT} in magnitude)")
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {_short(value)}")
        if not -MAX_INT <= value <= MAX_INT:  # every count and size distgen keeps fits in 64 bits
            raise ConfigError(f"{path}: {_short(value)} is out of range (at most {MAX_INT} in magnitude)")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if not math.isfinite(value):  # YAML's .inf / .nan: no setting means anything infinite
            raise ConfigError(f"{path}: must be a finite number, got {value!r}")
        return float(value)
    if tp is Any or tp is dict:
        return _parse_raw(value) if isinstance(value, _Raw) else value
    raise TypeError(f"unsupported config type {tp!r} at {path}")


def build_dataclass(cls: type, data: dict, path: str = "", choose: Optional[Chooser] = None) -> Any:
    """Build dataclass ``cls`` from a mapping, checking keys, types and values. ``choose`` lets a section
    pick a subclass from its contents (a model family's section)."""
    if choose is not None:
        sub = choose(cls, data, path)
        if sub is not cls:
            return build_dataclass(sub, data, path, choose)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in fields:
            hint = difflib.get_close_matches(str(key), list(fields), n=1)
            extra = f" (did you mean '{path + '.' if path else ''}{hint[0]}'?)" if hint else ""
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{full}: unknown key{extra}; known keys here: {known}")
        kwargs[key] = _build(hints[key], value, full, choose)
    # Sections left out of the file still get checked (and resolved) with their defaults.
    for name, f in fields.items():
        if name not in kwargs and dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], {}, f"{path}.{name}" if path else name, choose)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(path)
    return obj


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set ``a.b.c=value`` overrides into a nested dict (values stay raw strings)."""
    data = _deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item}: an override must look like key.sub=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"{key}: malformed override key")
        node = data
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"{key}: '{p}' is a value, not a section")
            node = nxt
        node[parts[-1]] = _Raw(value)
    return data


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


MAX_INT = 2 ** 63 - 1
MAX_YAML_BYTES = 1 << 20  # a config is a few KB; the largest (a long shard list) stays far below this
MAX_YAML_NODES = 200_000  # values after aliases are expanded: a "billion laughs" document stops here


def _short(value: Any) -> str:
    s = repr(value)
    return s if len(s) <= 80 else f"{s[:40]}... ({len(str(value))} characters)"


class _Duplicate(Exception):
    pass


class _TooDeep(Exception):
    pass


class _Loader(yaml.SafeLoader):
    """YAML's safe loader that refuses a key given twice in one mapping (PyYAML keeps the last silently) and
    nesting past MAX_DEPTH while it scans: PyYAML's scanner costs the square of the flow depth (3000 '[' took
    5 s on a busy machine before the composer's recursion limit stopped it)."""

    def fetch_flow_collection_start(self, TokenClass):
        if self.flow_level >= MAX_DEPTH:
            raise _TooDeep()
        super().fetch_flow_collection_start(TokenClass)

    def add_indent(self, column):
        if len(self.indents) >= MAX_DEPTH:
            raise _TooDeep()
        return super().add_indent(column)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # '<<: *base' merges; keys after it override the merged ones on purpose
                key = self.construct_object(key_node, deep=True)
                try:
                    dup = key in seen
                except TypeError:
                    continue  # an unhashable key: PyYAML's own error follows
                if dup:
                    raise _Duplicate(f"line {key_node.start_mark.line + 1}: the key {_short(key)} is given twice "
                                     f"in one mapping (YAML would keep the last silently)")
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _expanded_problem(root) -> Optional[str]:
    """Whether a composed YAML document, its aliases expanded, holds more than MAX_YAML_NODES values, nests
    deeper than MAX_DEPTH or refers to itself. Counted over the node graph (each node once), so the check
    costs the document's size, not the expansion's."""
    size: dict[int, int] = {}
    height: dict[int, int] = {}
    on_path: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        kids = ([c for kv in node.value for c in kv] if isinstance(node, yaml.MappingNode)
                else list(node.value) if isinstance(node, yaml.SequenceNode) else [])
        if done:
            on_path.discard(id(node))
            size[id(node)] = 1 + sum(size[id(c)] for c in kids)
            height[id(node)] = 1 + max((height[id(c)] for c in kids), default=0)
            if size[id(node)] > MAX_YAML_NODES:
                return f"its aliases expand to more than {MAX_YAML_NODES} values (an alias bomb?)"
            if height[id(node)] > MAX_DEPTH:
                return f"nested more than {MAX_DEPTH} levels deep"
            continue
        if id(node) in size:
            continue
        if id(node) in on_path:
            return "an alias refers to a value that holds it (a recursive document)"
        on_path.add(id(node))
        stack.append((node, True))
        stack.extend((c, False) for c in kids if id(c) not in size)
    return None


def safe_yaml(text: str, where: Any) -> Any:
    """YAML text into plain data, refusing (ConfigError naming ``where``) what safe_load takes silently or
    chokes on: a key given twice, aliases that expand past MAX_YAML_NODES values, nesting past MAX_DEPTH,
    integers of more digits than Python parses."""
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"{where}: {len(text)} characters, more than a config may hold ({MAX_YAML_BYTES})")
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        problem = _expanded_problem(node)
        if problem:
            raise ConfigError(f"{where}: not accepted as a config: {problem}")
        return loader.construct_document(node)
    except ConfigError:
        raise
    except _Duplicate as e:
        raise ConfigError(f"{where}: {e}") from None
    except _TooDeep:
        raise ConfigError(f"{where}: not accepted as a config: nested more than {MAX_DEPTH} levels deep") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {e}") from None
    except RecursionError:  # the composer recurses once per level
        raise ConfigError(f"{where}: not accepted as a config: nested too deep") from None
    except ValueError as e:  # int('...5000 digits...'): Python's limit on integer digits
        raise ConfigError(f"{where}: not accepted as a config: {str(e).strip().splitlines()[0]}") from None
    finally:
        loader.dispose()


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        size = p.stat().st_size
        if size > MAX_YAML_BYTES:
            raise ConfigError(f"{p}: {size} bytes, more than a config may hold ({MAX_YAML_BYTES})")
        text = p.read_text()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{p}: unreadable ({e.strerror or e})") from None
    data = safe_yaml(text, p)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections")
    return data


def to_dict(obj: Any) -> Any:
    """Plain-data form of a config (tuples become lists) for YAML/JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def to_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=False)

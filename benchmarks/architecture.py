"""Figures of distgen's shape, from its source (no import of distgen): module and class sizes, import cycles
(function-level imports included), family modules that import the export layer, and ``hasattr``/``getattr``
probes of a family outside the one capability check.

    python benchmarks/architecture.py            # the figures
    python benchmarks/architecture.py --json     # the same as JSON (tests/test_architecture.py reads it)

The limits the architecture issue set: modules <= 500 lines (the standalone ONNX sampler, one file by design,
excepted), classes <= 250 lines, no cycle, no family module importing ``distgen.export``, no capability probe.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "distgen"
MODULE_LIMIT, CLASS_LIMIT = 500, 250
# One file by design: it is copied next to an ONNX export and runs with numpy and onnxruntime only.
STANDALONE = {"distgen/export/sample_onnx.py", "distgen/onnx_sampler.py"}
# A probe is hasattr/getattr whose object is a family (by the names the code gives one).
_FAMILY_NAMES = re.compile(r"^(family|fam|self\.family|run\.family|model\.family)$")
CAPABILITY_HOME = "distgen/families/capabilities.py"


def modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the package."""
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """distgen modules ``name`` imports anywhere in its file (top level or inside functions)."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in known:
                    out.add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                sub = f"{mod}.{a.name}"
                if sub in known:
                    out.add(sub)
                elif mod in known:
                    out.add(mod)
    out.discard(name)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def class_sizes(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(), str(path))
    return [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]


def probes(path: Path) -> list[str]:
    """``hasattr(family, ...)`` / ``getattr(family, ...)`` calls, as ``file:line``."""
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for n in ast.walk(tree):
        if (isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in ("hasattr", "getattr")
                and n.args and _FAMILY_NAMES.match(ast.unparse(n.args[0]))):
            out.append(f"{path.relative_to(ROOT)}:{n.lineno}")
    return out


def report() -> dict:
    mods = modules()
    known = set(mods)
    graph = {m: imports(m, p, known) for m, p in mods.items()}
    rel = lambda p: str(p.relative_to(ROOT))  # noqa: E731
    lines = {rel(p): len(p.read_text().splitlines()) for p in mods.values()}
    classes = {f"{rel(p)}:{c}": n for p in mods.values() for c, n in class_sizes(p)}
    export_importers = sorted(
        rel(mods[m]) for m, deps in graph.items() if m.startswith("distgen.families")
        and any(d == "distgen.export" or d.startswith("distgen.export.") or d in ("distgen.onnx_export",
                "distgen.onnx_sampler") for d in deps))
    return {
        "modules_over_limit": {f: n for f, n in sorted(lines.items()) if n > MODULE_LIMIT and f not in STANDALONE},
        "classes_over_limit": {c: n for c, n in sorted(classes.items()) if n > CLASS_LIMIT},
        "largest_modules": dict(sorted(lines.items(), key=lambda kv: -kv[1])[:8]),
        "largest_classes": dict(sorted(classes.items(), key=lambda kv: -kv[1])[:8]),
        "cycles": cycles(graph),
        "families_importing_export": export_importers,
        "capability_probes": sorted(x for p in mods.values() if rel(p) != CAPABILITY_HOME for x in probes(p)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    r = report()
    if ap.parse_args().json:
        print(json.dumps(r, indent=2))
        return
    for k, v in r.items():
        n = len(v)
        print(f"{k}: {n}")
        for item in (v.items() if isinstance(v, dict) else v):
            print(f"    {item[0]}: {item[1]}" if isinstance(item, tuple) else f"    {item}")


if __name__ == "__main__":
    main()

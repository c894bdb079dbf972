"""The shape distgen keeps as families are added (benchmarks/architecture.py measures it from the source): modules
of at most 500 lines and classes of at most 250, no import cycle (function-level imports included), no family
module importing the export layer, and no hasattr/getattr probe of a family outside the capability check."""

from __future__ import annotations

import importlib.util

import pytest

from conftest import REPO

spec = importlib.util.spec_from_file_location("architecture", REPO / "benchmarks" / "architecture.py")
arch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(arch)


@pytest.fixture(scope="module")
def report():
    return arch.report()


@pytest.mark.parametrize("key", ["modules_over_limit", "classes_over_limit", "cycles", "families_importing_export",
                                 "capability_probes"])
def test_the_code_keeps_its_shape(report, key):
    assert not report[key], f"{key}: {report[key]}"


def test_the_measures_see_what_they_look_for(tmp_path):
    """The tool's own checks on a small package of known faults: a cycle through a function-level import, a
    relative import, a probe of a family, and a class over the limit."""
    pkg = tmp_path / "distgen"
    (pkg / "families").mkdir(parents=True)
    for f in ("__init__.py", "families/__init__.py"):
        (pkg / f).write_text("")
    (pkg / "a.py").write_text("from distgen import b\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n")
    (pkg / "c.py").write_text("def g(family):\n    return hasattr(family, 'classify')\n")
    (pkg / "families" / "x.py").write_text("from distgen.export import onnx\n")
    (pkg / "export").mkdir()
    (pkg / "export" / "__init__.py").write_text("")
    (pkg / "export" / "onnx.py").write_text("class Big:\n" + "    x = 1\n" * 260)
    mods = {}
    for p in sorted(pkg.rglob("*.py")):
        parts = list(p.relative_to(tmp_path).with_suffix("").parts)
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    graph = {m: arch.imports(m, p, set(mods)) for m, p in mods.items()}
    assert arch.cycles(graph) == [["distgen.a", "distgen.b"]]
    assert "distgen.export.onnx" in graph["distgen.families.x"]
    assert [n for _, n in arch.class_sizes(pkg / "export" / "onnx.py")] == [261]
    old = arch.ROOT
    try:
        arch.ROOT = tmp_path
        assert arch.probes(pkg / "c.py") == ["distgen/c.py:2"]
    finally:
        arch.ROOT = old

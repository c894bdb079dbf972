"""distgen/engines_deepspeed.py: the one place that reads DeepSpeed's internals, and the DeepSpeed release it does so
for (no DeepSpeed engine is built here: tests/test_deepspeed.py trains under it)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from distgen import engines_deepspeed as eds
from distgen.errors import TrainingError

PKG = Path(__file__).resolve().parents[1] / "distgen"


def test_deepspeed_engines_are_built_only_under_the_deepspeed_release_its_internals_were_read_in(monkeypatch):
    """Another DeepSpeed fails at start by name (the installed and the tested release, what to do), unless the
    escape hatch is set; the tested release is the one requirements.lock pins."""
    lock = (PKG.parent / "requirements.lock").read_text().splitlines()
    assert f"deepspeed=={eds.TESTED_VERSION}" in lock
    monkeypatch.delenv(eds.ALLOW_ENV, raising=False)
    for same in (eds.TESTED_VERSION, eds.TESTED_VERSION + "+cu124"):
        assert eds.version_problem(same) is None
    problem = eds.version_problem("0.20.0")
    assert problem.startswith("DeepSpeed 0.20.0 is installed, but distgen reads DeepSpeed internals") and \
        f"install deepspeed=={eds.TESTED_VERSION}" in problem and eds.ALLOW_ENV in problem and "\n" not in problem
    monkeypatch.setattr(eds, "installed_version", lambda: "0.18.2")
    with pytest.raises(TrainingError, match=rf"^DeepSpeed 0\.18\.2 is installed.*deepspeed=={eds.TESTED_VERSION}"):
        eds.check_version()
    monkeypatch.setenv(eds.ALLOW_ENV, "1")
    eds.check_version()  # the escape hatch: built, untested


def test_only_the_deepspeed_adapter_touches_deepspeed_internals():
    """engines.py (and every other module) reaches DeepSpeed through Accelerate and distgen.engines_deepspeed only:
    no DeepSpeed import, no private attribute of its engines, optimizers, checkpoint engine or parameters."""
    internals = re.compile(r"\bimport deepspeed\b|\bfrom deepspeed\b|checkpoint_engine|loss_scaler|cur_scale|"
                           r"gradscaler|partition_cache|\.save_checkpoint\(|\.load_checkpoint\(|deepspeed\.zero|"
                           r"\.ds_[a-z]+\b|\Wds_(id|tensor|status|shape|numel)\b")
    found = [f"{p.relative_to(PKG)}:{i}: {line.strip()}" for p in sorted(PKG.rglob("*.py"))
             if p.name != "engines_deepspeed.py"
             for i, line in enumerate(p.read_text().splitlines(), 1) if internals.search(line)]
    assert found == []
    engines = (PKG / "engines.py").read_text()
    assert "__dict__" not in engines and "from distgen.engines_deepspeed import" in engines

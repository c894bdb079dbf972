"""``--checkpoint step-N|latest|best``: which of a run folder's weights ``sample``, ``export``, ``eval`` and ``ema``
read. The name comes from the user and selects a folder, so it is checked as a name first (no path, no ``..``);
a step that does not exist, was cut off mid-save or does not load is refused, naming it and listing what the run
has. Imports nothing heavy (``distgen status`` lists checkpoints with :func:`inventory`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Optional

from distgen import checkpoint as ckpt
from distgen import readback as rb
from distgen.errors import CheckpointError, SampleError

HELP = ("which weights of a run folder: step-N (that checkpoint; step-4 or step-00000004), latest (the newest "
        "checkpoint that loads: the default) or best (RUN_DIR/best, the best evaluation's EMA weights)")
BEST = "best"
_STEP = re.compile(r"step-(\d{1,12})")


def parse(name: str) -> tuple[str, Optional[int]]:
    """``("latest", None)``, ``("best", None)`` or ``("step", N)``; a SampleError naming ``--checkpoint`` for
    anything else (a path, ``..``, another form)."""
    problem = rb.name_problem(name)
    if problem:  # before anything touches the file system: the name selects a folder
        raise SampleError(f"--checkpoint {name!r}: {problem}; expected step-N, latest or best")
    if name in ("latest", BEST):
        return name, None
    m = _STEP.fullmatch(name)
    if m is None:
        raise SampleError(f"--checkpoint {name!r}: expected step-N (e.g. step-4 or step-00000004), latest or best")
    step = int(m.group(1))
    if step >= 10 ** 8:  # step folders have 8 digits
        raise SampleError(f"--checkpoint {name!r}: a step of more than 8 digits")
    return "step", step


def inventory(run_dir: Path) -> list[str]:
    """What the run folder has to choose from, in words: its complete checkpoints, best/, and the folders that
    are not checkpoints to load (cut off mid-save, set aside as damaged)."""
    root = Path(run_dir) / "checkpoints"
    have = [p.name for p in ckpt.checkpoint_folders(root)]
    out = [", ".join(have) if have else "no checkpoint"]
    if (Path(run_dir) / BEST / "meta.json").is_file():
        out.append(BEST)
    if root.is_dir():
        cut = sorted(p.name for p in root.glob(".tmp-step-*"))
        damaged = sorted(p.name for p in root.glob("step-*.damaged*"))
        if cut:
            out.append(f"cut off mid-save: {', '.join(cut)}")
        if damaged:
            out.append(f"set aside as damaged: {', '.join(damaged)}")
    return out


def _refuse(run_dir: Path, what: str) -> SampleError:
    return SampleError(f"--checkpoint: {what}; {run_dir} has: {'; '.join(inventory(run_dir))}")


def choose(run_dir: Path, name: Optional[str], load: Callable[[Path], Any],
           log: Callable[[str], None]) -> tuple[Path, Any]:
    """The folder ``name`` selects in ``run_dir`` and what ``load(folder)`` returned for it. ``None`` or
    ``latest``: the newest checkpoint that loads (a newer damaged one reported through ``log``); ``step-N`` and
    ``best``: that folder or a SampleError (missing, cut off mid-save, does not load) listing what exists."""
    run_dir = Path(run_dir)
    kind, step = parse(name) if name is not None else ("latest", None)
    root = run_dir / "checkpoints"
    if kind == "latest":
        try:
            folder, value = ckpt.load_newest(root, load, log=log)
        except CheckpointError as e:
            raise SampleError(str(e)) from None
        if folder is None:
            raise SampleError(f"{root}: no checkpoint")
        return folder, value
    if kind == BEST:
        folder = run_dir / BEST
        if not (folder / "meta.json").is_file():
            raise _refuse(run_dir, f"{folder}: no best weights (a run keeps them when eval.every is set and an "
                                   f"evaluation scored)")
    else:
        folder = ckpt.step_dir(root, step)
        if not folder.is_dir():
            if ckpt.tmp_dir(root, step).exists():
                raise _refuse(run_dir, f"{folder.name} is incomplete (its save was cut off: "
                                       f"{ckpt.tmp_dir(root, step).name}) and is never loaded")
            raise _refuse(run_dir, f"{folder}: no such checkpoint")
    try:
        return folder, load(folder)
    except Exception as e:  # noqa: BLE001 - whatever fails reading it, the chosen folder does not load
        raise _refuse(run_dir, f"{folder} does not load ({ckpt.describe_failure(folder, e)})") from None

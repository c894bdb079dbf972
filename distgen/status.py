"""``distgen status RUN_DIR|FOLDER``: where a run stands, one screen per run, without importing torch or a family.

It reads the run folder only, and all of it as untrusted (an edited, truncated or crafted file is named in one
line, never a traceback): ``metrics.jsonl`` (its last :data:`TAIL` bytes), ``config.yaml``, every checkpoint's
``meta.json``, the safetensors headers and zip directories of its files (sizes checked, nothing loaded), ``best/``,
the EMA snapshots' index, the lock (:func:`distgen.ownership.lock_holder`: a process holds it exactly while it
trains) and ``last-error.json`` (:func:`distgen.ownership.record_failure`).
"""

from __future__ import annotations

import math
import os
import struct
import sys
import time
import zipfile
from pathlib import Path
from statistics import median
from typing import Any, Optional

from distgen import checkpoint as ckpt
from distgen import ownership
from distgen import readback as rb
from distgen import snapshots
from distgen.errors import CheckpointError, ConfigError, SampleError

TAIL = 4 * rb.MiB  # of metrics.jsonl: the recent records, whatever the file's length
RECENT = 10  # step records behind the ETA's pace
MAX_HEADER = 64 * rb.MiB  # a safetensors header (distgen's are a few KiB)
_TRAIN = rb.Obj({"batch_size": rb.Int(1, 1 << 30), "grad_accum": rb.Int(1, 1 << 20), "total_kimg": rb.Num(0, 1e12),
                 "max_steps": rb.Opt(rb.Int(1, rb.MAX_COUNT))}, optional=("grad_accum", "max_steps"), extra=True)
_PACE = {"step", "kimg", "lr", "samples_per_s", "eta_s"}


def status_command(path: str) -> int:
    """Print each run's screen; 2 with a one-line error when ``path`` is neither a run nor a folder of runs."""
    folder = Path(path)
    if not folder.is_dir():
        print(f"distgen: error: {path}: not a folder (a run folder, or a folder of run folders)", file=sys.stderr)
        return 2
    if is_run(folder):
        print(screen(folder))
        return 0
    runs = sorted(c for c in folder.iterdir() if c.is_dir() and is_run(c))
    if not runs:
        print(f"distgen: error: {path}: neither a run folder ({ownership.RUN_MARKER} or checkpoints/) nor a folder "
              f"of run folders", file=sys.stderr)
        return 2
    for i, run in enumerate(runs):
        print(("\n" if i else "") + screen(run), flush=True)
    return 0


def is_run(folder: Path) -> bool:
    return (folder / ownership.RUN_MARKER).is_file() or (folder / "checkpoints").is_dir()


def screen(run: Path) -> str:
    """One run's status as lines of text; what cannot be read is said, by file, on a ``problem`` line."""
    problems: list[str] = []
    try:
        return "\n".join(_screen(run, problems))
    except Exception as e:  # noqa: BLE001 - a screen is never a traceback: the run is named with what failed
        return f"{_clean(str(run))}\n  problem    {_clean(ckpt.first_line(e))} ({type(e).__name__})"


def _screen(run: Path, problems: list[str]) -> list[str]:
    train, family = _config(run, problems)
    steps, evals = _records(run / "metrics.jsonl", problems)
    cps = _checkpoints(run, problems)
    metas = [c["meta"] for c in cps if c.get("meta")]
    newest = metas[-1] if metas else None
    running, who = ownership.lock_holder(run)
    error = _last_error(run, problems)

    last = steps[-1] if steps else None
    step = max([last["step"] if last else 0, newest["step"] if newest else 0])
    kimg = max([last["kimg"] if last else 0.0, newest["nimg"] / 1000 if newest else 0.0])
    batch = _global_batch(last, newest, train)
    stop_at, total = _length(train, batch)
    family = family or (newest or {}).get("family")
    head = _clean(str(run)) + (f"  ({_clean(family)}" + (f", global batch {batch}" if batch else "") + ")"
                               if family else "")
    out = [head, f"  state      {_state(running, who, error, newest, stop_at, step, steps, run)}"]
    out.append(f"  progress   {_progress(step, kimg, stop_at, total, train)}")
    eta = _eta(steps, step, stop_at, batch, running)
    if eta:
        out.append(f"  eta        {eta}")
    if newest and newest.get("world_size_changes"):
        out.append(f"  world size {_world_size_changes(newest['world_size_changes'])}")
    if last:
        out.append(f"  losses     {_losses(last)}")
    out += _evaluations(evals, run, newest, problems)
    out += _checkpoint_lines(run, cps)
    out += _snapshot_lines(run, problems)
    if error and running is not True:
        out.append(f"  error      {error}")
    out += [f"  problem    {p}" for p in problems]
    return out


# --------------------------------------------------------------------------- reading, every file as untrusted
def _clean(text: Any, limit: int = 300) -> str:
    """Text from a file, safe to print: control characters (a terminal's escape sequences) shown as '?', cut."""
    s = "".join("?" if ord(c) < 32 or 127 <= ord(c) < 160 else c for c in str(text))
    return s if len(s) <= limit else s[:limit - 3] + "..."


def _config(run: Path, problems: list[str]) -> tuple[Optional[dict], Optional[str]]:
    """The train section (batch size, length) and the family, from config.yaml (what the last start trained with)
    or else the newest checkpoint's stored config."""
    from distgen.config.core import load_yaml

    path = run / "config.yaml"
    if not path.is_file():
        return None, None
    try:
        data = load_yaml(path)
        train = _TRAIN.check(data.get("train", {}), rb.Where(path, "train"), ConfigError)
        model = data.get("model", {})
        family = model.get("family") if isinstance(model, dict) and isinstance(model.get("family"), str) else None
        return train, family
    except ConfigError as e:
        problems.append(_clean(e))
        return None, None


def _records(path: Path, problems: list[str]) -> tuple[list[dict], list[dict]]:
    """The step records and the evaluation records in the last TAIL bytes of metrics.jsonl, oldest first."""
    if not path.is_file():
        return [], []
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - TAIL))
            text = f.read(TAIL)
    except OSError as e:
        problems.append(f"{_clean(path)}: unreadable ({_clean(e.strerror or e)})")
        return [], []
    lines = text.split(b"\n")
    if size > TAIL:
        lines = lines[1:]  # the first is cut
    steps, evals, bad = [], [], 0
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = rb.parse_json(line, path, ValueError)
        except ValueError:
            rec = None
        if not (isinstance(rec, dict) and type(rec.get("step")) is int and 0 <= rec["step"] <= rb.MAX_COUNT
                and type(rec.get("kimg")) in (int, float) and math.isfinite(rec["kimg"])):
            if i != len(lines) - 1:  # a torn last line is a record being written: not a problem
                bad += 1
            continue
        (evals if any(str(k).startswith("eval/") for k in rec) else steps).append(rec)
    if bad:
        problems.append(f"{_clean(path)}: {bad} line(s) near its end are not records (skipped)")
    return steps, evals


def _number(v: Any) -> Optional[float]:
    return float(v) if type(v) in (int, float) and math.isfinite(v) else None


def _safetensors_problem(path: Path) -> Optional[str]:
    """Why ``path`` is not a whole safetensors file (its header, read alone, against its size), or None."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return "truncated (no header)"
            n = struct.unpack("<Q", head)[0]
            if n > min(MAX_HEADER, size - 8):
                return "truncated or not safetensors (its header does not fit the file)"
            header = rb.parse_json(f.read(n), path, ValueError)
    except ValueError:
        return "not safetensors (its header is not JSON)"
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    if not isinstance(header, dict):
        return "not safetensors (its header is not an object)"
    ends = [v.get("data_offsets", [0, 0])[1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
            and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2]
    want = 8 + n + max([e for e in ends if type(e) is int] or [0])
    if want != size:
        return f"{size} bytes, its header describes {want} (truncated or damaged)"
    return None


def _file_problem(path: Path) -> Optional[str]:
    if path.suffix == ".safetensors":
        return _safetensors_problem(path)
    if path.suffix == ".pt":  # torch's zip format: the central directory at its end says it is whole
        try:
            with zipfile.ZipFile(path) as z:
                z.infolist()
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            return f"truncated or damaged ({_clean(e, 100)})"
    return None


def _folder_size(folder: Path) -> int:
    total = 0
    for here, _dirs, files in os.walk(folder):
        for f in files:
            try:
                total += os.lstat(os.path.join(here, f)).st_size
            except OSError:
                pass
    return total


def _check_checkpoint(folder: Path, required: tuple[str, ...]) -> tuple[Optional[dict], Optional[str]]:
    """(meta.json, None) for a folder whose files are all there and whole, else (meta or None, the problem)."""
    try:
        meta = ckpt.read_meta(folder, required)
    except CheckpointError as e:
        return None, str(e)
    expected = [ckpt.ema_file(folder, i, n).name for n, steps in meta.get("ema_steps", {}).items()
                for i in range(len(steps))]
    expected += [f"rng-{r}.safetensors" for r in range(meta.get("world_size", 0))]
    try:
        names = sorted(p.name for p in folder.iterdir() if p.is_file())
    except OSError as e:
        return meta, f"unreadable ({e.strerror or e})"
    missing = [n for n in expected if n not in names]
    if missing:
        return meta, f"lacks {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else "")
    for name in names:
        problem = _file_problem(folder / name)
        if problem:
            return meta, f"{name}: {problem}"
    return meta, None


def _checkpoints(run: Path, problems: list[str]) -> list[dict]:
    """Every entry of checkpoints/, oldest step first: {name, size, meta, problem, kind}."""
    root = run / "checkpoints"
    if not root.is_dir():
        return []
    rows = []
    for folder in ckpt.checkpoint_folders(root):
        meta, problem = _check_checkpoint(folder, ckpt.RESUME_KEYS)
        rows.append({"name": folder.name, "size": _folder_size(folder), "meta": None if problem else meta,
                     "problem": problem, "kind": "step"})
    for folder in sorted(root.glob(".tmp-step-*")):
        rows.append({"name": folder.name, "size": _folder_size(folder), "kind": "tmp",
                     "problem": "incomplete: a save cut off (or under way); never loaded"})
    for folder in sorted(root.glob("step-*.damaged*")):
        rows.append({"name": folder.name, "size": _folder_size(folder), "kind": "damaged",
                     "problem": "set aside by a resume: it did not load"})
    return rows


def _last_error(run: Path, problems: list[str]) -> Optional[str]:
    path = run / ownership.ERROR_FILE
    if not path.is_file():
        return None
    try:
        e = rb.read_json(path, ownership.ERROR_SCHEMA, error=ValueError, max_bytes=64 * 1024)
    except ValueError as err:
        problems.append(_clean(err))
        return None
    first = e["message"].strip().splitlines()[0] if e["message"].strip() else ""
    return f"{_clean(e['type'], 60)}: {_clean(first)} (at {_clean(e['time'], 40)})"


# --------------------------------------------------------------------------- what it says
def _global_batch(last: Optional[dict], newest: Optional[dict], train: Optional[dict]) -> Optional[int]:
    """Samples a step: from the records (kimg / step), else the config and the checkpoint's world size."""
    if last and last["step"] > 0 and last["kimg"] > 0:
        return max(1, round(last["kimg"] * 1000 / last["step"]))
    if newest and newest["step"] > 0:
        return max(1, round(newest["nimg"] / newest["step"]))
    if train and newest:
        return train["batch_size"] * train.get("grad_accum", 1) * newest["world_size"]
    return None


def _world_size_changes(changes: list[dict]) -> str:
    """The resumes at another process count the newest checkpoint records, the last three."""
    said = []
    for c in changes[-3:]:
        a, b = c["from_global_batch"], c["to_global_batch"]
        said.append(f"{c['from_world']} -> {c['to_world']} process(es) at step {c['step']} (global batch "
                    + (f"{a} kept)" if a == b else f"{a} -> {b})"))
    return "; ".join(said) + (f" (and {len(changes) - 3} earlier)" if len(changes) > 3 else "")


def _length(train: Optional[dict], batch: Optional[int]) -> tuple[Optional[int], Optional[int]]:
    """(the step this launch stops at, the steps of train.total_kimg)."""
    if not train or not batch:
        return None, None
    total = math.ceil(train["total_kimg"] * 1000 / batch)
    stop = min(total, train["max_steps"]) if train.get("max_steps") else total
    return stop, total


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _state(running: Optional[bool], who: str, error: Optional[str], newest: Optional[dict], stop_at: Optional[int],
           step: int, steps: list[dict], run: Path) -> str:
    metrics = run / "metrics.jsonl"
    age = ""
    if metrics.is_file():
        age = f"; last record {_duration(max(0.0, time.time() - metrics.stat().st_mtime))} ago"
    if running:
        return f"training now ({_clean(who)}){age}"
    if running is None:
        return f"unknown whether a process trains it ({_clean(who)}){age}"
    if error:
        return f"failed: stopped on an error at step {step} (below); not running"
    if newest is None:
        return "not started (no checkpoint)" if not steps else f"stopped before its first checkpoint (step {step})"
    at_end = stop_at is not None and newest["step"] >= stop_at
    if newest["reason"] == "end" and (at_end or stop_at is None):
        return f"finished at step {newest['step']}"
    if newest["reason"] == "preempted":
        return (f"preempted at step {newest['step']} (stopped on a signal); `distgen train` with its config "
                f"resumes it")
    return (f"stopped, not running, no error recorded (killed, or its machine failed); resumes from step "
            f"{newest['step']}")


def _progress(step: int, kimg: float, stop_at: Optional[int], total: Optional[int], train: Optional[dict]) -> str:
    if total is None:
        return f"step {step}, {kimg:g} kimg (length unknown: no readable config.yaml)"
    s = f"step {step} of {total}, {kimg:g} of {train['total_kimg']:g} kimg ({100 * step / max(total, 1):.1f}%)"
    if stop_at is not None and stop_at < total:
        s += f"; this launch stops at step {stop_at} (train.max_steps)"
    return s


def _eta(steps: list[dict], step: int, stop_at: Optional[int], batch: Optional[int],
         running: Optional[bool]) -> Optional[str]:
    if stop_at is None or not batch or step >= stop_at:
        return None
    recent = [v for v in (_number(r.get("samples_per_s")) for r in steps[-RECENT:]) if v and v > 0]
    if not recent:
        return None
    pace = median(recent)
    left = (stop_at - step) * batch / pace
    tail = "" if running else " if resumed at that pace"
    return f"{_duration(left)} to step {stop_at} at {pace:.4g} samples/s (median of the last {len(recent)} records){tail}"


def _losses(rec: dict) -> str:
    shown = []
    for k, v in rec.items():
        if k in _PACE or str(k).endswith("_total") or str(k).startswith("eval/"):
            continue
        if v is None and str(k).startswith("loss"):
            shown.append(f"{_clean(k, 40)} non-finite")
        elif _number(v) is not None:
            shown.append(f"{_clean(k, 40)} {v:.4g}")
        if len(shown) == 8:
            break
    return "  ".join(shown) + f"  (step {rec['step']})"


def _evaluations(evals: list[dict], run: Path, newest: Optional[dict], problems: list[str]) -> list[str]:
    out = []
    if evals:
        last = evals[-1]
        vals = [f"{_clean(k[5:], 40)} {v:.5g}" for k, v in last.items() if str(k).startswith("eval/")
                and _number(v) is not None][:6]
        out.append(f"  eval       last at step {last['step']}: {'  '.join(vals) or 'nothing computed'}")
    best = None
    if (run / "best" / "meta.json").is_file():
        meta, problem = _check_checkpoint(run / "best", ckpt.EMA_KEYS)
        if problem:
            problems.append(f"{_clean(run / 'best')}: {_clean(problem)}")
        else:
            best = meta.get("best")
    best = best or (newest or {}).get("best")
    if best:
        out.append(f"  best       {_clean(best['metric'], 40)} {best['value']:.5g} at step {best['step']}"
                   + (f" ({_clean(run / 'best')})" if (run / "best").is_dir() else ""))
    return out


def _checkpoint_lines(run: Path, cps: list[dict]) -> list[str]:
    if not cps:
        return ["  checkpoints none"]
    steps = [c for c in cps if c["kind"] == "step"]
    loads = next((c["name"] for c in reversed(steps) if c["problem"] is None), None)
    out = ["  checkpoints" + ("" if loads else "  (none complete: none loads)")]
    for c in cps:
        m = c.get("meta")
        what = (f"{m['reason']:<9s} {m['nimg'] / 1000:g} kimg" if m else f"{'damaged' if c['kind'] == 'step' else ''}"
                f"{': ' if c['kind'] == 'step' else ''}{_clean(c['problem'])}")
        mark = "  <- loads (the newest complete one)" if c["name"] == loads else ""
        out.append(f"    {_clean(c['name'], 40):<22s} {_size(c['size']):>10s}  {what}{mark}")
    if (run / "best").is_dir():
        out.append(f"    {'best':<22s} {_size(_folder_size(run / 'best')):>10s}  --checkpoint best")
    return out


def _snapshot_lines(run: Path, problems: list[str]) -> list[str]:
    try:
        entries = snapshots.read_index(run, must_exist=False)
    except SampleError as e:
        problems.append(_clean(e))
        return []
    if not entries:
        return []
    folder = run / snapshots.SNAPSHOT_DIR
    missing = [e["file"] for e in entries if not (folder / e["file"]).is_file()
               or (folder / e["file"]).stat().st_size != e["size"]]
    stds = ", ".join(f"{s:g}" for s in entries[-1]["stds"])
    line = (f"  snapshots  {len(entries)} post-hoc EMA snapshot(s), {entries[0]['nimg'] / 1000:g} to "
            f"{entries[-1]['nimg'] / 1000:g} kimg, sigma_rel {stds}, {_size(sum(e['size'] for e in entries))}")
    if missing:
        line += f"; {len(missing)} missing or of another size ({missing[0]}...)"
    return [line]


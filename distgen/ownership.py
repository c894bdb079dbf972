"""Which folders are distgen's to write into and replace, and the lock that keeps one trainer per run folder.

distgen writes only into a folder it made, or one it is told to make: a run folder carries
``distgen-run.json`` (checked by content, not by its name), and ``distgen train`` refuses any other
non-empty folder. While a run trains, rank 0 holds an exclusive ``flock`` on ``RUN_DIR/distgen.lock``:
a second trainer on the same folder is refused, told who holds it; the kernel releases the lock when its
holder dies, however it dies, so a killed job's lock is never stale. ``distgen status`` tells whether a run trains
now by the same lock (:func:`lock_holder`), and shows the error a run stopped on (:data:`ERROR_FILE`, written by
:func:`record_failure`). ``export --force`` and ``ema --force``
replace only a folder whose marker file reads as distgen's own output (:func:`check_output_folder`).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Optional

from distgen import readback as rb
from distgen.durable import write_text_durably
from distgen.errors import SampleError, TrainingError

RUN_MARKER = "distgen-run.json"
RUN_FORMAT = "distgen-run/1"
LOCK = "distgen.lock"
_RUN_SCHEMA = rb.Obj({"format": rb.Str(choices=(RUN_FORMAT,)), "created": rb.Str(max_len=64)}, extra=True)
_HOLDER_SCHEMA = rb.Obj({"pid": rb.Int(1, 2 ** 31), "host": rb.Str(max_len=256), "since": rb.Str(max_len=64),
                         "slurm_job": rb.Opt(rb.Str(max_len=64))}, optional=("slurm_job",), extra=True)


def run_name_problem(name: str) -> Optional[str]:
    """Why ``run.name`` cannot name a folder under runs/ (``..``, a path, control characters), or None."""
    return rb.name_problem(name)


def listing(folder: Path, limit: int = 5) -> str:
    names = sorted(p.name for p in folder.iterdir())
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def is_run_folder(folder: Path) -> bool:
    """Did distgen make ``folder``? Its marker reads as one; or (a run from before markers) a checkpoint under it
    has a distgen meta.json."""
    try:
        rb.read_json(folder / RUN_MARKER, _RUN_SCHEMA, error=ValueError, max_bytes=64 * 1024)
        return True
    except ValueError:
        pass
    from distgen import checkpoint as ckpt

    for step in reversed(ckpt.checkpoint_folders(folder / "checkpoints")):
        try:
            ckpt.read_meta(step)
            return True
        except Exception:  # noqa: BLE001 - any unreadable meta.json just does not count as proof
            continue
    return False


def claim_run_folder(folder: Path) -> None:
    """Make ``folder`` distgen's run folder, or a TrainingError naming it: it must be new, empty, or distgen's."""
    if folder.exists() and not folder.is_dir():
        raise TrainingError(f"run.dir {folder}: exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not is_run_folder(folder):
        raise TrainingError(f"run.dir {folder}: a folder of other files ({listing(folder)}), not a distgen run "
                            f"folder (it has no {RUN_MARKER}); distgen trains only into a new or empty folder or "
                            f"one it made. Choose another run.name / run.dir")
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / RUN_MARKER).is_file() or not _marker_ok(folder):
        write_text_durably(folder / RUN_MARKER, json.dumps({"format": RUN_FORMAT, "created": _now()}) + "\n")


def _marker_ok(folder: Path) -> bool:
    try:
        rb.read_json(folder / RUN_MARKER, _RUN_SCHEMA, error=ValueError, max_bytes=64 * 1024)
        return True
    except ValueError:
        return False


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class RunLock:
    """An exclusive lock on ``RUN_DIR/distgen.lock`` for as long as it is held (or its process lives)."""

    def __init__(self, fd: Optional[int] = None):
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None


def lock_run_folder(folder: Path, log: Callable[[str], None] = print) -> RunLock:
    """Take the run folder's lock, or a TrainingError saying who holds it. On a file system without flock
    (some parallel file systems mounted without it) the run goes on unlocked, saying so."""
    import fcntl

    path = folder / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        _flock_retrying(fd, fcntl.LOCK_EX)
    except BlockingIOError:
        os.close(fd)
        raise TrainingError(f"run.dir {folder}: another distgen train is training in it ({_holder(path)}); two "
                            f"trainers would overwrite each other's checkpoints. Wait for it to end or stop it, "
                            f"or train this one under another run.name / run.dir") from None
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            os.close(fd)
            raise
        log(f"distgen: warning: {path}: this file system cannot lock files ({e.strerror}); nothing stops a second "
            f"trainer on the same run folder")
        return RunLock(fd)
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now(),
              "slurm_job": os.environ.get("SLURM_JOB_ID")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    return RunLock(fd)


def _flock_retrying(fd: int, how: int, tries: int = 10, wait: float = 0.05) -> None:
    """flock without blocking, tried again for half a second: ``distgen status`` probes the lock with a shared
    lock of an instant, which must not make a trainer starting at that moment think the folder taken."""
    import fcntl

    for i in range(tries):
        try:
            fcntl.flock(fd, how | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if i == tries - 1:
                raise
            time.sleep(wait)


def lock_holder(folder: Path) -> tuple[Optional[bool], str]:
    """Does a process train in ``folder`` now? ``(True, who)`` while one holds its lock; ``(False, why not)``;
    ``(None, why unknown)`` where the lock cannot be probed. Probes with a shared lock taken and dropped at once
    (never blocking), so it reads nothing a trainer writes and works wherever the trainer's lock does (NFS
    included): the kernel drops a dead trainer's lock, so a held lock is a live trainer."""
    import fcntl

    path = folder / LOCK
    if not path.is_file():
        return False, f"no {LOCK}: never trained here"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        return None, f"{path}: cannot be opened ({e.strerror or e})"
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False, f"no process holds {LOCK}" + (f" (the last trainer was {_holder(path)})"
                                                     if _holder_known(path) else "")
    except BlockingIOError:
        return True, _holder(path)
    except OSError as e:  # a file system without flock: the trainer ran unlocked too, so say what is known
        return None, f"{path}: this file system cannot lock files ({e.strerror}); the last trainer was {_holder(path)}"
    finally:
        os.close(fd)  # drops the probe's lock


def _holder_known(path: Path) -> bool:
    try:
        rb.read_json(path, _HOLDER_SCHEMA, error=ValueError, max_bytes=4096)
        return True
    except ValueError:
        return False


# --------------------------------------------------------------------------- the error a run stopped on
ERROR_FILE = "last-error.json"
ERROR_SCHEMA = rb.Obj({"time": rb.Str(max_len=64), "type": rb.Str(max_len=128), "message": rb.Str(max_len=4000),
                       "pid": rb.Int(1, 2 ** 31), "host": rb.Str(max_len=256)}, optional=("pid", "host"),
                      extra=True)


def record_failure(folder: Path, e: BaseException) -> None:
    """Rank 0, as a locked run stops on ``e``: what stopped it into ``RUN_DIR/last-error.json`` (for ``distgen
    status``). Never raises: the error itself is what the user must see."""
    msg = str(e).strip() or type(e).__name__
    try:
        write_text_durably(folder / ERROR_FILE, json.dumps({
            "time": _now(), "type": type(e).__name__, "message": msg[:4000], "pid": os.getpid(),
            "host": socket.gethostname()}) + "\n")
    except OSError:  # a full disk may be why it stopped
        pass


def clear_failure(folder: Path) -> None:
    """Rank 0, as a new attempt takes the run folder: an earlier attempt's error is no longer the run's."""
    try:
        (folder / ERROR_FILE).unlink(missing_ok=True)
    except OSError:
        pass


def _holder(path: Path) -> str:
    """Who holds a lock, from what it wrote into the lock file (untrusted: checked, and said as unknown if odd)."""
    try:
        h = rb.read_json(path, _HOLDER_SCHEMA, error=ValueError, max_bytes=4096)
    except ValueError:
        return "its holder did not say who it is"
    job = f", SLURM job {h['slurm_job']}" if h.get("slurm_job") else ""
    return f"pid {h['pid']} on {h['host']}{job}, since {h['since']}"


def take_run_folder(folder: Path, main: bool, agree: Callable[[Any], list]) -> RunLock:
    """Every rank: rank 0 claims and locks ``folder``; every rank raises its TrainingError if that failed
    (``agree``: all_gather_object, so no rank waits for a rank that stopped)."""
    lock, problem = RunLock(), None
    if main:
        try:
            claim_run_folder(folder)
            lock = lock_run_folder(folder)
        except TrainingError as e:
            problem = str(e)
        except OSError as e:
            problem = f"run.dir {folder}: cannot be written ({os_problem(e)})"
    problems = [p for p in agree(problem) if p]
    if problems:
        lock.release()
        raise TrainingError(problems[0])
    return lock


# --------------------------------------------------------------------------- outputs of export and ema
EXPORT_MARKER = "distgen.json"  # distgen.export.meta.EXPORT_META: that module is imported only to read one
EMA_MARKER = "posthoc.json"


def _export_marker_ok(folder: Path) -> bool:
    from distgen.export.meta import read_export_meta

    try:
        read_export_meta(folder)
        return True
    except SampleError:
        return False


_EMA_SCHEMA = rb.Obj({"run": rb.Str(), "kimg": rb.Num(0), "snapshots": rb.Int(1), "max_residual": rb.Num(0),
                      "widths": rb.List(rb.Obj({"sigma_rel": rb.Num(0, 1)}, extra=True), max_len=10_000)},
                     extra=True)


def _ema_marker_ok(folder: Path) -> bool:
    try:
        rb.read_json(folder / EMA_MARKER, _EMA_SCHEMA, error=ValueError, max_bytes=16 * rb.MiB)
        return True
    except ValueError:
        return False


MARKERS = {EXPORT_MARKER: ("export", _export_marker_ok), EMA_MARKER: ("ema output", _ema_marker_ok)}


def check_output_folder(run_dir: Path, out_dir: Path, force: bool, *, marker: str = EXPORT_MARKER,
                        flag: str = "OUT_DIR") -> Path:
    """The resolved output folder of a command that writes from a run (``export``; ``ema``, whose folders hold
    ``posthoc.json``), or a SampleError: distgen never writes over the run itself, a folder that holds it, or a
    folder of other files; its own earlier output (its marker file read and checked as distgen wrote it) is
    replaced only with ``force``."""
    what, marker_ok = MARKERS[marker]
    out = out_dir.resolve()
    run = run_dir.resolve()
    if out == run or run.is_relative_to(out):
        raise SampleError(f"{out_dir}: {flag} is the run folder {run_dir} or holds it; write into a new folder")
    if out.exists() and not out.is_dir():
        raise SampleError(f"{out_dir}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / marker).is_file():
            raise SampleError(f"{out_dir}: a folder that holds other files ({listing(out)}), not a distgen {what}; "
                              f"write into a new or empty folder")
        if not marker_ok(out):
            raise SampleError(f"{out_dir}: its {marker} is not one distgen wrote for an {what}, so the folder is "
                              f"not replaced (it holds {listing(out)}); write into a new or empty folder")
        if not force:
            raise SampleError(f"{out_dir}: holds an earlier {what}; pass --force to replace it")
    return out


# --------------------------------------------------------------------------- OS errors in words
_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free space or write elsewhere",
    errno.EDQUOT: "the disk quota is used up: free space or write elsewhere",
    errno.EROFS: "the file system is read-only: write elsewhere",
    errno.EACCES: "permission denied: write into a folder you may write to",
    errno.EPERM: "not permitted: write into a folder you may write to",
    errno.ENAMETOOLONG: "the name is too long for the file system: choose a shorter name",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "a folder stands where a file is expected",
    errno.EEXIST: "already exists",
    errno.ENOENT: "no such file or folder",
}


def os_problem(e: OSError) -> str:
    """An OSError as ``path: what happened; what to do``, for the one line a command ends with."""
    where = e.filename if e.filename is not None else "a file"
    hint = _OS_HINTS.get(e.errno)
    what = e.strerror or str(e) or type(e).__name__
    return f"{where}: {what}" + (f" ({hint})" if hint and hint != what.lower() else "")

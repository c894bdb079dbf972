"""Writing files and folders so that a crash or a power loss never leaves half of one under its final name: every
file flushed, then renamed over the old one, and the rename flushed. Checkpoints (:mod:`distgen.checkpoint`),
the run folder's lock, EMA snapshots and exported folders are written through here.
"""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        # Some network and FUSE file systems cannot fsync a folder (they commit renames themselves).
        if not (e.errno in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP) and os.path.isdir(path)):
            raise
    finally:
        os.close(fd)


def sync_tree(folder: Path) -> None:
    """Flush every file under ``folder``, then every folder, deepest first, so a rename that publishes
    ``folder`` can never outlive its contents in a crash or power loss."""
    for here, dirs, files in os.walk(folder, topdown=False):
        for f in files:
            fsync_path(Path(here) / f)
        fsync_path(Path(here))


def write_text_durably(path: Path, text: str) -> None:
    """Write ``path`` through a temporary file that is flushed, renamed over it, and the rename flushed."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


PARTIAL = ".distgen-partial"  # inside a folder atomic_dir is building or discarding: it may be removed


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Build a folder under a temporary name and publish it as ``final`` only when complete.

    Yields the temporary folder. On an exception inside the block the temporary folder is removed
    and ``final`` is left as it was; on success its contents are flushed to disk, an existing
    ``final`` is moved aside, the new one renamed into place, and only then the old one removed.
    A leftover of a crash (``.<name>.tmp``, ``.<name>.old``) is removed only if it holds the
    :data:`PARTIAL` mark distgen puts in such folders: a user's folder of that name is never deleted.
    """
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp")
    old = final.with_name(f".{final.name}.old")
    for leftover in (tmp, old):
        if leftover.exists() or leftover.is_symlink():
            if leftover.is_symlink() or not (leftover / PARTIAL).is_file():
                raise FileExistsError(errno.EEXIST, f"in the way of {final.name}, and not a folder distgen left "
                                                    f"there (it lacks {PARTIAL}): move it away", str(leftover))
            shutil.rmtree(leftover)
    tmp.mkdir(parents=True)
    (tmp / PARTIAL).touch()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tmp / PARTIAL).unlink()
    sync_tree(tmp)
    if final.exists():
        (final / PARTIAL).touch()  # from here on, if a crash leaves it as .old, the next call may remove it
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_path(final.parent)
    shutil.rmtree(old, ignore_errors=True)

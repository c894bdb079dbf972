"""Opening a shard's bytes: a local file, or the output of a ``pipe:`` command the user typed.

A ``pipe:`` command runs through the shell, so it is only ever taken from what the user wrote (the
command line or their own config): manifests name local files relative to themselves (see
:func:`distgen.data.manifest.resolve_shards`). Other URL schemes (``http://``, ``s3://``, ...) go to
webdataset's ``gopen``. Our own pipe reader exists to report a failing command in words: the
command, its exit status or signal, and the last line it wrote to stderr.
"""

from __future__ import annotations

import re
import signal
import subprocess
import tempfile
from typing import BinaryIO, Optional

PIPE = "pipe:"
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class PipeError(OSError):
    """A ``pipe:`` command ended badly; the message says how, in words."""


def status_in_words(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with status {code}"


class PipeStream:
    """The standard output of ``sh -c COMMAND`` as a readable binary stream (not seekable)."""

    def __init__(self, command: str, bufsize: int = 1 << 16):
        self.command = command
        self._err = tempfile.TemporaryFile()  # a file, not a pipe: a chatty command can never block on it
        self._proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=self._err,
                                      bufsize=bufsize)
        self._out = self._proc.stdout
        self.closed = False

    def read(self, n: int = -1) -> bytes:
        return self._out.read(n)

    def seekable(self) -> bool:
        return False

    def failure(self, stopped_early: bool = False) -> Optional[str]:
        """Close the stream and wait for the command: None if it succeeded, else what went wrong, in words.

        ``stopped_early``: we stopped reading before the command's end (a tar's end-of-archive marker
        comes before its padding), so a SIGPIPE (or a shell's 141 for one) is expected, not an error.
        """
        if not self.closed:
            self.closed = True
            self._out.close()
            self._proc.wait()
            self._err.seek(0)
            self._stderr = [l for l in self._err.read().decode("utf-8", "replace").splitlines() if l.strip()]
            self._err.close()
        code = self._proc.returncode
        if code == 0 or (stopped_early and code in (-signal.SIGPIPE, 128 + signal.SIGPIPE)):
            return None
        said = f" ({self._stderr[-1].strip()[:300]})" if self._stderr else ""
        return f"the command `{self.command}` {status_in_words(code)}{said}"

    def close(self, stopped_early: bool = True) -> None:
        why = self.failure(stopped_early)
        if why:
            raise PipeError(why)


def open_shard(url: str) -> BinaryIO:
    """A shard's bytes: ``pipe:COMMAND``, a local path, or another URL scheme through webdataset's gopen."""
    if url.startswith(PIPE):
        return PipeStream(url[len(PIPE):])
    if url.startswith("file://"):
        return open(url[len("file://"):], "rb")
    if SCHEME.match(url):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    return open(url, "rb")

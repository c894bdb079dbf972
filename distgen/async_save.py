"""Checkpoint writes beside training (``train.async_checkpoint``), and the one writer every save goes through.

With it on, a periodic save copies rank 0's share of the state off the training tensors (:func:`snapshot`: to host
memory, a copy the next optimizer steps cannot change), and one background thread writes those files, flushes
them, renames the folder into place and prunes old checkpoints (:func:`distgen.checkpoint.commit`), or updates
``best/``, while the loop goes on. Without it the same writer runs each write at once, as distgen always did.

The rules, the same on every rank:

- Each rank's own files (its RNG states, a family's per-rank tensors: kilobytes) are written at the save itself by
  every rank, before rank 0 hands its files (weights, optimizer states, EMAs, meta.json: the large ones) to the
  thread. So only rank 0 writes in the background, and no collective runs off the main thread; except for sharded
  checkpoints (``train.checkpoint_format: sharded``), whose shards every rank copies at the save and writes in its
  own thread, DCP's collectives on a gloo group of their own (:func:`distgen.checkpoint_dcp.stage`); rank 0's
  thread writes its files and renames the folder only once that write has returned, when every rank's are flushed.
- At most one write in flight: a save, or a ``best/`` update, first waits for the previous write.
- A write's outcome is settled at the next checkpoint save (:meth:`CheckpointWriter.saving`), which the end of the
  run and a signal's save are too: rank 0 waits for the write, every rank learns whether it failed, and every rank
  raises if it did, naming the folder. A failure is never dropped; on the way out of a run that already stops on
  another error, it is printed (:meth:`CheckpointWriter.close`).
- A crash mid-write leaves the ``.tmp-step-N`` folder being filled, which is never loaded (the rename is what
  makes a checkpoint complete) and which the next save removes as distgen's own: the previous checkpoint stays the
  newest that loads.
- While a write runs, a second signal or the signal's grace period does not cut it (:meth:`Preemption.saving`).
"""

from __future__ import annotations

import copy
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from distgen import dist, preemption
from distgen.errors import TrainingError


def snapshot(obj: Any, memo: Optional[dict] = None) -> Any:
    """``obj`` (state dicts, lists, plain data) with every tensor copied to host memory, a CPU tensor included: a
    copy the training steps that follow cannot change. A tensor held twice stays one tensor in the copy."""
    import torch

    memo = {} if memo is None else memo
    if id(obj) in memo:
        return memo[id(obj)]
    if torch.is_tensor(obj):
        out = obj.detach().to("cpu", copy=True)
    elif isinstance(obj, dict):
        out = copy.copy(obj)  # the same kind of dict (an OrderedDict stays one), its values then replaced
        for k, v in obj.items():
            out[k] = snapshot(v, memo)
    elif isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        out = type(obj)(snapshot(v, memo) for v in obj)
    else:
        out = copy.deepcopy(obj)
    memo[id(obj)] = out
    return out


class CheckpointWriter:
    """Every checkpoint and ``best/`` write of a run goes through here: in a background thread (``background``:
    ``train.async_checkpoint``) or at once. Also counts, for the records, the seconds the loop was held by saves
    and the seconds the writes took (:meth:`timings`)."""

    def __init__(self, background: bool):
        self.background = background
        self._thread: Optional[threading.Thread] = None
        self._folder: Optional[Path] = None  # what the write in flight (or the last one) makes
        self._seen: Optional[Path] = None  # the folder of the last save, on every rank
        self._error: Optional[BaseException] = None  # the background write's failure, not yet raised
        self._lock = threading.Lock()
        self._blocked = self._written = 0.0
        self._preempt = preemption.install()  # here, on the main thread: a thread cannot install signal handlers

    @contextmanager
    def saving(self, folder: Path, say: bool = False) -> Iterator[None]:
        """Every rank, around a checkpoint save of ``folder``: first the write in flight ends (saying so when
        ``say``, at a signal or the end) and its failure, on any rank, is raised on every rank; the time inside
        counts as the loop held by the save."""
        t0 = time.perf_counter()
        try:
            if self.background:
                if say and self.in_flight():
                    dist.print0(f"distgen: waiting for the checkpoint write in flight ({self._folder})")
                self.wait()
                if dist.agreed(self._error is not None):  # every rank reaches a save at the same step
                    self._raise()
            self._seen = folder
            yield
        finally:
            with self._lock:
                self._blocked += time.perf_counter() - t0

    def submit(self, folder: Path, write: Callable[..., Any], *args: Any, background: bool = True) -> None:
        """Rank 0 (every rank for sharded files): ``write(*args)``, which makes ``folder``. In the background when
        this writer and ``background`` say so (``args`` snapshotted first, then the loop goes on); else now, its error
        raised here."""
        self.wait()
        if not (self.background and background):
            t0 = time.perf_counter()
            try:
                write(*args)
            finally:
                self._count_write(time.perf_counter() - t0)
            return
        if self._error is not None:
            return  # a failed write is pending: the next save raises it, and nothing is written before then
        args = snapshot(args)
        self._folder = folder
        # Not a daemon: an interpreter that exits (an uncaught error) lets the write finish first.
        self._thread = threading.Thread(target=self._run, args=(write, args), name="distgen-checkpoint-writer")
        self._thread.start()

    def _run(self, write: Callable[..., Any], args: tuple) -> None:
        t0 = time.perf_counter()
        try:
            with self._preempt.saving():
                write(*args)
        except BaseException as e:  # noqa: BLE001 - kept, and raised in the main loop at the next save
            self._error = e
        finally:
            self._count_write(time.perf_counter() - t0)

    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        """The write in flight, if any, ends (successfully or not: see :meth:`saving`)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        """The loop is left (an error, Ctrl-C, a signal, the end): the write in flight finishes, and a failure of it
        not raised yet (the run stops on another error) is printed, never dropped."""
        self.wait()
        dcp_ckpt = sys.modules.get("distgen.checkpoint_dcp")  # imported where sharded files were written
        if dcp_ckpt is not None:
            dcp_ckpt.release_writer_group()  # the background writes' group, if this run made one
        if self._error is not None:
            try:
                self._raise()
            except TrainingError as e:
                print(f"distgen: error: {e}", file=sys.stderr, flush=True)

    def _raise(self) -> None:
        e, self._error = self._error, None
        if e is None:  # the write failed on rank 0; this rank stops with it
            raise TrainingError(f"{self._seen}: the checkpoint write in the background (train.async_checkpoint) "
                                f"failed on rank 0, whose error names the folder and the cause; stopping on every "
                                f"rank")
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrainingError(f"{self._folder}: not written: its write in the background (train.async_checkpoint) "
                            f"failed: {type(e).__name__}: {why}") from e

    def _count_write(self, seconds: float) -> None:
        with self._lock:
            self._written += seconds

    def timings(self) -> dict:
        """For a record: ``checkpoint_blocked_s``, the seconds the loop was held by checkpoint saves since the last
        record, and ``checkpoint_write_s``, the seconds the writes that ended since then took (in the background,
        or inside the save); each only when there was one."""
        with self._lock:
            out = {k: v for k, v in (("checkpoint_blocked_s", self._blocked), ("checkpoint_write_s", self._written))
                   if v > 0}
            self._blocked = self._written = 0.0
        return out

"""DataLoader worker processes' lifecycle: they outlive a scheduler's SIGTERM/SIGUSR1 (which the main process
turns into a checkpoint, :mod:`distgen.preemption`) and die with their parent, however it dies."""

from __future__ import annotations

import ctypes
import os
import signal
import threading
from contextlib import contextmanager
from typing import Iterator

from distgen.preemption import SIGNALS


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int) -> None:
    """Have the kernel kill this process (SIGKILL) when its parent dies, however the parent dies.

    A parent killed with SIGKILL runs no clean-up, and a worker blocked writing batches into a full
    queue (the loader ahead of training) would otherwise live on, holding its memory, for good. Linux
    only; elsewhere torch's own watchdog (a check every few seconds while idle) is what remains. The
    signal follows the parent *thread* that started the worker: loaders are iterated on the main thread.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the line above: nobody is left to read our batches
        os._exit(0)


def worker_init(_worker_id: int, parent: int) -> None:
    """Let a worker outlive a scheduler's SIGTERM/SIGUSR1 but not its parent.

    SLURM signals every process of a job; the main process turns the signal
    into a checkpoint, and a worker that died first would crash it (the
    DataLoader raises on a worker killed by a signal). The parent's own
    terminate() at shutdown is also a SIGTERM, so a thread reads each signal
    with its sender and exits only when the sender is the parent. A parent
    that dies takes its workers with it (:func:`die_with_parent`).
    """
    die_with_parent(parent)
    sigs = set(SIGNALS)
    signal.pthread_sigmask(signal.SIG_BLOCK, sigs)

    def watch():
        while True:
            info = signal.sigwaitinfo(sigs)
            if info.si_signo == signal.SIGTERM and info.si_pid == parent:
                os._exit(0)

    threading.Thread(target=watch, name="distgen-signals", daemon=True).start()


@contextmanager
def signals_blocked() -> Iterator[None]:
    """Start DataLoader workers inside: a scheduler's SIGTERM / SIGUSR1 stays blocked while they start, so a
    worker is born with them blocked and only its watch thread (:func:`worker_init`) ever takes them; torch's
    own worker handler would otherwise let a signal that lands before ``worker_init`` runs kill the worker
    (and crash the run it should checkpoint). The signals arrive when the block ends."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, set(SIGNALS))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)

"""Scheduler signals as a flag the training loop polls, installed before anything slow happens.

SLURM sends SIGTERM (preemption) or, through the sbatch script, SIGUSR1's relayed SIGTERM (time
limit). ``distgen train`` installs the handler first thing, before importing torch, so a signal that
lands during start-up is not Python's default (death, exit 143) but a flag: the run then exits with
:data:`EXIT_PREEMPTED` before its first step, leaving the newest checkpoint as it is, and the job is
requeued. Inside the loop the flag becomes a checkpoint and the same exit.

A step that never comes (a hung file system, a stuck collective) must not keep the job alive: a second
signal outside a checkpoint save, or :data:`GRACE_ENV` seconds (default 300) after the first with no save
under way, ends the process at once with the same exit status, the newest checkpoint left as it is. A
signal within :data:`DUPLICATE_S` of the first is the same one delivered twice, not a second: SLURM signals
every process of a step and torch's launcher forwards the signal to its workers as well.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

# Exit status after a SIGTERM/SIGUSR1: EX_TEMPFAIL, "try again later". The launchers requeue on it.
EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
GRACE_ENV = "DISTGEN_SIGNAL_GRACE"  # seconds from a signal to the exit, when no checkpoint is being saved
DUPLICATE_S = 5.0  # a signal this soon after the first is its copy (scheduler and launcher both deliver it)


class Preemption:
    """SIGTERM / SIGUSR1 set :attr:`flag`; the loop finishes its step, checkpoints and exits. A second signal,
    or the grace period running out, exits at once unless a checkpoint is being written (:meth:`saving`)."""

    def __init__(self):
        self.flag = False
        self.signum: Optional[int] = None
        self._saving = 0
        self._saving_lock = threading.Lock()  # a checkpoint written in the background saves beside the loop's own
        self._first = 0.0

    def _handler(self, signum, frame):
        if self.flag:
            if not self._saving and time.monotonic() - self._first >= DUPLICATE_S:
                _exit_now(f"a second signal ({signal.Signals(signum).name}) before the checkpoint")
            return  # a copy of the first, or a save under way that finishes before the loop exits
        self.flag, self.signum, self._first = True, signum, time.monotonic()
        grace = _grace()
        threading.Thread(target=self._watchdog, args=(grace,), name="distgen-signal-watchdog", daemon=True).start()

    def _watchdog(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline or self._saving:
            time.sleep(0.05)
        _exit_now(f"no checkpoint within {grace:g} s of the signal (the step never came; {GRACE_ENV})")

    @contextmanager
    def saving(self) -> Iterator[None]:
        """While inside, a checkpoint is being written: neither a second signal nor the watchdog cuts it. Any thread
        (distgen.async_save writes in one of its own)."""
        with self._saving_lock:
            self._saving += 1
        try:
            yield
        finally:
            with self._saving_lock:
                self._saving -= 1


def _grace() -> float:
    try:
        return max(float(os.environ.get(GRACE_ENV, "300")), 0.0)
    except ValueError:
        return 300.0


def _exit_now(why: str) -> None:
    """End the process now with the requeue status (no clean-up runs: the newest checkpoint stays the last)."""
    try:
        os.write(2, f"\ndistgen: {why}; exiting with {EXIT_PREEMPTED} (requeue) without a new checkpoint\n".encode())
    finally:
        os._exit(EXIT_PREEMPTED)


_installed: Optional[Preemption] = None


def install() -> Preemption:
    """The process's Preemption, its handlers installed on the first call (later calls return it)."""
    global _installed
    if _installed is None:
        _installed = Preemption()
        for sig in SIGNALS:
            signal.signal(sig, _installed._handler)
    return _installed


def hold_for_test(preempt: Preemption, what: str) -> None:
    """Test-only: while the file named by ``$DISTGEN_TEST_HOLD`` exists, wait here (after a checkpoint)
    until a signal arrives, so a test's signal provably lands mid-training or after the final
    checkpoint. Unset in real runs, where this returns at once."""
    path = os.environ.get("DISTGEN_TEST_HOLD")
    if not path or not Path(path).exists():
        return
    print(f"distgen: holding after the {what} checkpoint while {path} exists (test setting)", flush=True)
    deadline = time.time() + 600
    while Path(path).exists() and not preempt.flag and time.time() < deadline:
        time.sleep(0.1)

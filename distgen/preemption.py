"""Scheduler signals as a flag the training loop polls, installed before anything slow happens.

SLURM sends SIGTERM (preemption) or, through the sbatch script, SIGUSR1's relayed SIGTERM (time
limit). ``distgen train`` installs the handler first thing, before importing torch, so a signal that
lands during start-up is not Python's default (death, exit 143) but a flag: the run then exits with
:data:`EXIT_PREEMPTED` before its first step, leaving the newest checkpoint as it is, and the job is
requeued. Inside the loop the flag becomes a checkpoint and the same exit.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Optional

# Exit status after a SIGTERM/SIGUSR1: EX_TEMPFAIL, "try again later". The launchers requeue on it.
EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption:
    """SIGTERM / SIGUSR1 set :attr:`flag`; the loop finishes its step, checkpoints and exits."""

    def __init__(self):
        self.flag = False
        self.signum: Optional[int] = None

    def _handler(self, signum, frame):
        self.flag, self.signum = True, signum


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

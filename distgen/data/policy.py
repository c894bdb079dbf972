"""Bad inputs: what a stage does with a DataError (``data.on_error``: stop, or skip and count the samples lost)."""

from __future__ import annotations

import logging
from typing import Optional

from distgen.data.errors import DataError

log = logging.getLogger("distgen.data")


class ErrorPolicy:
    """``raise`` stops at the first bad input; ``skip`` counts the samples it costs, logs it and goes on."""

    def __init__(self, mode: str = "raise"):
        if mode not in ("raise", "skip"):
            raise ValueError(f"data.on_error must be raise or skip, got {mode!r}")
        self.mode = mode
        self.skipped = 0

    def __call__(self, err: DataError, lost: Optional[int] = 1) -> None:
        """``lost``: the samples this error costs (a broken shard tail: all the rest of it); None when
        unknown (a shard without a manifest count), counted as one."""
        if self.mode == "raise":
            raise err
        self.skipped += 1 if lost is None else lost
        what = "the rest of the shard (how many samples is unknown without a manifest count)" if lost is None \
            else f"{lost} sample(s)"
        log.warning("skipped bad input, %s lost (%d so far in this worker): %s", what, self.skipped, err)

    def take(self) -> int:
        n, self.skipped = self.skipped, 0
        return n

"""What the training loop (:mod:`distgen.train`) carries from step to step: where the run stands
(:class:`TrainState`, exactly what a checkpoint records), where its data stream stands (:class:`DataCursor`, which
owns the rule of where the stream restarts), and what every part of a run shares (:class:`Run`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from distgen.async_save import CheckpointWriter
from distgen.config import Config
from distgen.ema import EMASet
from distgen.engines import Engine, Trained
from distgen.families import DataInfo, Family, Phase
from distgen.runlog import Tally
from distgen.speed import Speed
from distgen.telemetry import Telemetry
from distgen.world_change import BatchPlan


def new_counters() -> dict:
    return {"nonfinite_total": 0, "nonfinite_run": 0, "overflow_total": 0, "skipped_updates_total": 0,
            "skipped_samples_total": 0}


@dataclass
class TrainState:
    """Where a run stands: exactly what a checkpoint's meta.json records of it, so that saving is
    :meth:`to_meta` and resuming :meth:`from_meta`."""

    step: int = 0
    nimg: int = 0  # samples drawn (a non-finite step's included)
    data_start_step: int = 0  # the data stream was last (re)started at this step...
    data_skip: int = 0  # ...and this many of its batches were drawn (0 at a periodic checkpoint)
    counters: dict = field(default_factory=new_counters)
    interval: dict = field(default_factory=dict)  # "<phase>/<name>" -> [sum, count] since the last record
    best: Optional[dict] = None  # the best evaluation so far: metric, value, step
    reason: Optional[str] = None  # why the checkpoint it came from was written: periodic, preempted, end
    world_size_changes: list = field(default_factory=list)  # BatchPlan.record of each resume at another count

    def to_meta(self) -> dict:
        return {"step": self.step, "nimg": self.nimg, "data_start_step": self.data_start_step,
                "data_skip": self.data_skip, "counters": dict(self.counters), "interval": dict(self.interval),
                "best": self.best, "world_size_changes": [dict(c) for c in self.world_size_changes]}

    @classmethod
    def from_meta(cls, meta: dict) -> "TrainState":
        return cls(step=meta["step"], nimg=meta["nimg"], data_start_step=meta["data_start_step"],
                   data_skip=meta.get("data_skip", 0), counters={**new_counters(), **meta["counters"]},
                   interval=dict(meta["interval"]), best=meta.get("best"), reason=meta.get("reason"),
                   world_size_changes=[dict(c) for c in meta.get("world_size_changes", [])])

    def advance(self, global_batch: int) -> None:
        """One step done. ``nimg`` counts the samples drawn, a skipped step's too: the learning-rate and EMA
        schedules follow the step count without reading back whether each step was finite."""
        self.step += 1
        self.nimg += global_batch

    def resumed_with(self, batch: BatchPlan, checkpoint: Path) -> Optional[str]:
        """Resumed from ``checkpoint`` with ``batch``: a change of process count is recorded (every later
        checkpoint carries it); returns the log line of a change of process count or global batch (None: neither)."""
        if batch.world_changed:
            self.world_size_changes.append(batch.record(self.step, self.nimg))
        return batch.describe(checkpoint, self.step, self.nimg)

    def finished_at(self, stop_at: int) -> bool:
        """Did this state come from the final checkpoint of a run that ends at ``stop_at``?"""
        return self.reason == "end" and self.step >= stop_at


class DataCursor:
    """The training stream and where it stands: the step it was (re)started at and the batches drawn since.

    Every periodic checkpoint (every ``every`` steps) restarts the stream (:meth:`restart`), seeded by
    (seed, rank, step), in the straight run as in one resumed from that checkpoint; a checkpoint between those
    (a signal, the end) records :meth:`position`, and a resume draws the batches already used (``skip``). So a
    resumed run sees exactly the batches of the uninterrupted one. Which checkpoint sits at such a boundary is
    decided here alone (:meth:`boundary`): the loop restarts the stream by it and a checkpoint records its
    position by it, and were the two to disagree, a resumed run would draw other batches than the straight one.
    """

    def __init__(self, make: Callable[[int], "object"], every: int, start: int = 0, skip: int = 0):
        self._make = make
        self.every = every  # train.checkpoint_every
        self._skipped_before = 0  # bad samples skipped by the streams before this one (data.on_error=skip)
        self.waited = 0.0  # seconds spent in next() so far: the loader's stall (distgen.telemetry)
        self.loader = None
        self.restart(start)
        for _ in range(skip):
            self.next()

    def due(self, step: int) -> bool:
        """Is ``step`` one of the straight run's periodic checkpoint steps?"""
        return step % self.every == 0

    def boundary(self, step: int, nonfinite_run: int) -> bool:
        """Does the straight run restart its stream after ``step`` (``nonfinite_run``: the non-finite steps in a row
        then)? At a periodic checkpoint's step, unless a non-finite streak runs: no periodic checkpoint is written in
        one (the last stays the last good one), and so the stream goes on."""
        return self.due(step) and nonfinite_run == 0

    def checkpoint_position(self, step: int, nonfinite_run: int) -> tuple[int, int]:
        """What a checkpoint at ``step`` records of the stream, (start step, batches to draw again): at a
        :meth:`boundary` (a periodic checkpoint, or one at a step where the straight run would have written one,
        e.g. the end) the resumed run restarts it at ``step`` as the straight run does; elsewhere it draws again
        the batches of :meth:`position`."""
        return (step, 0) if self.boundary(step, nonfinite_run) else self.position()

    def restart(self, step: int) -> None:
        if self.loader is not None:
            self._skipped_before += self.loader.skipped
        self.loader = self._make(step)
        self._batches = iter(self.loader)
        self.start, self.drawn = step, 0

    def next(self) -> dict:
        t0 = time.perf_counter()
        batch = next(self._batches)
        self.waited += time.perf_counter() - t0
        self.drawn += 1
        return batch

    def position(self) -> tuple[int, int]:
        """(the step the stream started at, batches drawn from it)."""
        return self.start, self.drawn

    @property
    def skipped(self) -> int:
        """Bad samples all of this process's streams have skipped (data.on_error=skip)."""
        return self._skipped_before + self.loader.skipped


@dataclass
class Run:
    """What every part of a run shares: its config, engine, family and networks (set as they are built)."""

    cfg: Config
    eng: Engine
    family: Family
    phases: list[Phase]
    info: DataInfo
    dir: Path
    speed: Speed
    stop_at: int = 0  # the step this launch ends at, and the batch (distgen.world_change): set at the resume
    batch: Optional[BatchPlan] = None
    # plain modules by name: the ones each engine wraps and trains in place (DDP's .module, DeepSpeed's .module)
    nets: dict = field(default_factory=dict)
    trained: dict[str, Trained] = field(default_factory=dict)
    emas: dict[str, EMASet] = field(default_factory=dict)
    skips_reported: int = 0  # this process's skipped samples already in the counters
    preview: Optional[dict] = None  # a translator's grid inputs (rank 0)
    tally: Optional[Tally] = None  # the steps' numbers on the device since the last read
    telemetry: Optional[Telemetry] = None  # pace, data wait, memory and MFU between records
    saver: CheckpointWriter = field(init=False)  # every checkpoint and best/ write (train.async_checkpoint)

    def __post_init__(self):
        self.saver = CheckpointWriter(self.cfg.train.async_checkpoint)

    @property
    def global_batch(self) -> int:
        return self.batch.global_batch

    @property
    def root(self) -> Path:
        return self.dir / "checkpoints"

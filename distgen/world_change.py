"""Resuming at another world size (process count): the rule for the batch, and what the run says about it.

``train.batch_size`` is per device and per micro-step; the global batch is batch_size x processes x grad_accum.
A checkpoint records the global batch its steps were trained with (``global_batch`` in meta.json; older ones: the
stored config's batch x their ``world_size``). Resumed with another process count, a run keeps that global batch
when it divides by processes x ``train.grad_accum`` (the per-device batch becomes global / (processes x
accumulation)). When it does not, no per-device batch keeps it with that accumulation, and the run keeps the
checkpoint's per-device batch instead: the global batch changes, and the run says from what to what. A config
whose ``train.batch_size`` or ``train.grad_accum`` differs from the checkpoint's stored config is a change made on
purpose: it is used as given. The learning rate is ``train.lr`` whatever the batch (distgen scales no rate with
the batch), and ``train.total_kimg`` stays the run's length in samples: the steps left follow the new batch.

The data stream restarts at the resumed step, dealt over the new ranks as a fresh stream is (each rank its share
of the shards, seeded by (seed, rank, worker, step)); ``nimg`` goes on counting the samples drawn, the global
batch a step. Each change is said in the log and recorded in every later checkpoint (``world_size_changes``,
shown by ``distgen status``). Exactness is promised only at the same world size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass(frozen=True)
class BatchPlan:
    """The batch a (resumed) run trains with, and the checkpoint's it comes from (``was_*``: 0 for a fresh run)."""

    per_device: int
    grad_accum: int
    world: int
    was_world: int = 0
    was_global: int = 0
    why: str = ""  # why the global batch was not kept ("" when it was, or nothing changed)

    @property
    def global_batch(self) -> int:
        return self.per_device * self.world * self.grad_accum

    @property
    def world_changed(self) -> bool:
        return self.was_world not in (0, self.world)

    @property
    def restarts_stream(self) -> bool:
        """Does the data stream restart at the resumed step? (Another count or batch: a stored position means
        batches of another size on other ranks.)"""
        return self.world_changed or self.was_global not in (0, self.global_batch)

    def record(self, step: int, nimg: int) -> dict:
        """The ``world_size_changes`` entry of meta.json for this change at ``step``."""
        return {"step": step, "nimg": nimg, "from_world": self.was_world, "to_world": self.world,
                "from_global_batch": self.was_global, "to_global_batch": self.global_batch}

    def describe(self, checkpoint: Path, step: int, nimg: int) -> Optional[str]:
        """The log line of a change of world size or global batch at a resume (None when neither changed)."""
        if not self.restarts_stream:
            return None
        shape = (f"{self.per_device} per device x {self.world} process(es) x {self.grad_accum} accumulation")
        if self.global_batch == self.was_global:
            batch = f"global batch {self.global_batch} kept: {shape}"
        else:
            batch = f"global batch {self.was_global} -> {self.global_batch} ({self.why}): {shape}"
        head = (f"distgen: world size changed: {checkpoint} was written by {self.was_world} process(es), resuming "
                f"with {self.world}; " if self.world_changed else f"distgen: batch changed at {checkpoint}; ")
        lr = ("learning rate unchanged" if self.global_batch == self.was_global
              else "learning rate unchanged (train.lr: distgen does not scale it with the batch)")
        return (f"{head}{batch}; {lr}; the data stream restarts at step {step}, dealt over {self.world} "
                f"process(es); samples seen go on from {nimg / 1000:g} kimg (exact resume holds only at the same "
                f"world size)")


def plan_batch(tc, world: int, meta: Optional[dict]) -> BatchPlan:
    """The batch to train with at ``world`` processes, resuming from ``meta`` (a checkpoint's meta.json; None: a
    fresh run), by the rule of this module's docstring. ``tc``: the config's train section."""
    if meta is None:
        return BatchPlan(tc.batch_size, tc.grad_accum, world)
    stored = meta["config"].get("train", {})
    was_world = meta["world_size"]
    configured = (stored.get("batch_size", tc.batch_size), stored.get("grad_accum", 1))
    was_global = meta.get("global_batch") or configured[0] * configured[1] * was_world
    if (tc.batch_size, tc.grad_accum) != configured:
        return BatchPlan(tc.batch_size, tc.grad_accum, world, was_world, was_global,
                         "train.batch_size or train.grad_accum changed in the config")
    accum = tc.grad_accum
    if was_global % (world * accum) == 0:
        return BatchPlan(was_global // (world * accum), accum, world, was_world, was_global)
    kept = max(1, was_global // (was_world * accum))  # the checkpoint's per-device batch
    return BatchPlan(kept, accum, world, was_world, was_global,
                     f"{was_global} does not divide by {world} process(es) x {accum} accumulation, so the "
                     f"per-device batch stays {kept}")


def run_length(total_kimg: float, max_steps: Optional[int], step: int, nimg: int, global_batch: int
               ) -> tuple[int, int]:
    """(the steps of ``train.total_kimg``, the step this launch stops at) for a run at ``step`` / ``nimg`` going on
    with ``global_batch``: the samples left at the new batch when the batch changed along the way."""
    total = total_kimg * 1000
    if nimg == step * global_batch:  # one batch all along: the count a straight run has
        steps = math.ceil(total / global_batch)
    else:
        steps = step + max(0, math.ceil((total - nimg) / global_batch))
    return steps, min(steps, max_steps) if max_steps else steps


def deepspeed_refusal(folder: Path, nets: list[str], was_world: int, world: int) -> str:
    """Why a DeepSpeed checkpoint written by ``was_world`` processes is not resumed by ``world``, with the command
    that converts its states (DeepSpeed's universal checkpoint)."""
    convert = "; ".join(f"python -m deepspeed.checkpoint.ds_to_universal --input_folder "
                        f"{folder / 'deepspeed' / n / 'state'} --output_folder {folder / 'deepspeed' / n / 'universal'}"
                        for n in nets)
    return (f"{folder}: written by {was_world} DeepSpeed process(es), resumed with {world}: ZeRO partitions the "
            f"optimizer states per process and DeepSpeed refuses them at another count. Resume with "
            f"--num_processes {was_world}; DeepSpeed's converter to its universal checkpoint is `{convert}`, whose "
            f"output distgen does not load (the converted states load in DeepSpeed with "
            f"checkpoint.load_universal)")

"""What a run reports as it goes: ``metrics.jsonl``, the experiment trackers (TensorBoard by default), a progress bar
(rank 0), and the interval sums behind every record (each rank's losses and extra scalars since the last one).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import torch

from distgen import dist

COUNTED = ("nonfinite_total", "overflow_total", "skipped_updates_total")


class Tally:
    """What the steps add up between two reads, kept on the device: each micro-step's loss and extra scalars
    (sum and count of the finite ones), the counters of :data:`COUNTED`, and the streak of non-finite steps.

    Nothing here reads a value back to the host: a read (:meth:`read`, one transfer) happens only where the
    loop needs the numbers (a record, a checkpoint, a signal), so the CPU never waits for the GPU mid-interval.
    """

    def __init__(self, device: torch.device, streak: int = 0):
        self.device = device
        self._f = torch.float64 if device.type != "mps" else torch.float32
        self.sums: dict[str, torch.Tensor] = {}  # "<phase>/<name>" -> [sum, count]
        self.counts = torch.zeros(len(COUNTED), dtype=self._f, device=device)
        self.streak = torch.tensor(float(streak), dtype=self._f, device=device)  # non-finite steps in a row, now
        self.longest = self.streak.clone()  # the longest streak since the last read

    def _value(self, v) -> torch.Tensor:
        if torch.is_tensor(v):
            return v.detach().to(self.device, self._f)
        # a fill, not a copy from host memory: a blocking copy to the GPU would wait for the queue
        return torch.full((), float(v), dtype=self._f, device=self.device)

    def add(self, phase: str, loss: torch.Tensor, extras: dict, finite: torch.Tensor) -> None:
        """One micro-step's loss and extras, counted only when its loss is finite."""
        f = finite.to(self._f)
        for k, v in {"loss": loss, **extras}.items():
            v = self._value(v).reshape(())
            acc = self.sums.setdefault(f"{phase}/{k}", torch.zeros(2, dtype=self._f, device=self.device))
            acc += torch.stack([torch.where(finite, v, torch.zeros_like(v)), f])

    def count(self, name: str, flag) -> None:
        """Add ``flag`` (a 0-dim tensor, bool or number) to counter ``name``."""
        self.counts[COUNTED.index(name)] += self._value(flag).reshape(())

    def end_step(self, bad: torch.Tensor) -> None:
        """A step ended; ``bad``: it had a non-finite loss or gradient (and updated nothing)."""
        b = bad.to(self._f)
        self.counts[0] += b
        self.streak = (self.streak + 1) * b
        self.longest = torch.maximum(self.longest, self.streak)

    def read(self, counters: dict, interval: dict) -> int:
        """Fold everything into the host's ``counters`` and ``interval`` sums (one transfer) and start again.
        Returns the longest non-finite streak since the last read."""
        keys = list(self.sums)
        flat = torch.cat([self.counts, self.streak[None], self.longest[None], *self.sums.values()]).tolist()
        for name, v in zip(COUNTED, flat):
            counters[name] += int(v)
        streak, longest = int(flat[len(COUNTED)]), int(flat[len(COUNTED) + 1])
        counters["nonfinite_run"] = streak
        rest = flat[len(COUNTED) + 2:]
        for i, k in enumerate(keys):
            acc = interval.setdefault(k, [0.0, 0])
            acc[0] += rest[2 * i]
            acc[1] += int(rest[2 * i + 1])
        self.sums.clear()
        self.counts.zero_()
        self.longest = self.streak.clone()
        return longest


def interval_means(interval: dict, phases: list[str]) -> dict:
    """Means over the interval and all ranks (every rank calls it). ``loss`` is the first phase's (the only one
    for most families); with several phases each also appears as ``loss/<phase>``. None where nothing was
    finite, or the phase did not run (a lazy regulariser)."""
    total: dict[str, list] = {}
    for part in dist.all_gather_object(interval):
        for k, (sm, n) in part.items():
            t = total.setdefault(k, [0.0, 0])
            t[0] += sm
            t[1] += n
    out = {k: t[0] / t[1] for k, t in sorted(total.items()) if t[1]}
    res = {"loss": out.pop(f"{phases[0]}/loss", None)}
    if len(phases) > 1:
        res[f"loss/{phases[0]}"] = res["loss"]
        for ph in phases[1:]:
            res[f"loss/{ph}"] = out.pop(f"{ph}/loss", None)
    res.update(out)
    return res



class RunLog:
    """Rank-0 outputs of a run: metrics.jsonl, the experiment trackers (:mod:`distgen.trackers`, TensorBoard by
    default), a progress bar or line per record."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, enabled: bool, trackers=None,
                 shown: tuple[str, ...] = ()):
        self.enabled = enabled
        self.shown = shown  # a family's scalars (``<phase>/<name>``) shown beside the loss in progress lines
        self.path = run_dir / "metrics.jsonl"
        self.trackers = trackers  # started (distgen.trackers.Trackers.start); rank 0's log to them
        self.bar = None
        if not enabled:
            return
        if self.path.exists():
            self._truncate(start_step)
        from tqdm import tqdm

        # A bar on a terminal; one line per record in batch logs (SLURM, CI).
        self.tty = sys.stderr.isatty()
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, disable=not self.tty)

    def _truncate(self, start_step: int) -> None:
        """A resumed run drops the records written after its checkpoint by the run it replaces. A line that
        is not a JSON record with an integer step (the torn last line a full disk or a crash leaves, or an
        edit) is dropped too, saying so. Read line by line: a file of any size costs bounded memory."""
        from distgen.readback import iter_jsonl

        tmp = self.path.with_name(self.path.name + ".tmp")
        torn = []
        with open(tmp, "w") as out:
            for i, rec in iter_jsonl(self.path):
                step = rec.get("step") if isinstance(rec, dict) else None
                if isinstance(step, bool) or not isinstance(step, int):
                    torn.append(i)
                elif step <= start_step:
                    out.write(json.dumps(rec) + "\n")
        if torn:
            shown = ", ".join(map(str, torn[:10])) + (f" and {len(torn) - 10} more" if len(torn) > 10 else "")
            dist.print0(f"distgen: {self.path}: dropped {len(torn)} line(s) that are not whole records "
                        f"(line {shown}; a torn write)")
        os.replace(tmp, self.path)

    def _write(self, rec: dict) -> None:
        """One metrics.jsonl line; its numbers to the trackers at its step."""
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.trackers is not None:
            self.trackers.log(rec)

    def record(self, rec: dict) -> None:
        if not self.enabled:
            return
        self._write(rec)
        eta = rec.get("eta_s")
        eta = f"{eta / 60:.1f}m" if eta is not None else "-"
        fmt = lambda v: f"{v:.4f}" if v is not None else "non-finite"  # noqa: E731
        per_phase = {k[5:]: v for k, v in rec.items() if k.startswith("loss/")}
        # one number per phase where there are several (a GAN's D and G)
        loss = " ".join(f"{k} {fmt(v)}" for k, v in per_phase.items()) if per_phase else fmt(rec["loss"])
        loss += "".join(f"  {k} {rec[k]:.4g}" for k in self.shown if rec.get(k) is not None)
        pace = telemetry_text(rec)
        if self.tty:
            self.bar.set_postfix(kimg=f"{rec['kimg']:.1f}", loss=loss, sps=f"{rec['samples_per_s']:.0f}", eta=eta,
                                 pace=pace)
        else:
            dist.print0(f"step {rec['step']:>7d}  kimg {rec['kimg']:8.2f}  loss {loss}  "
                        f"{rec['samples_per_s']:7.1f} samples/s  {pace}  eta {eta}")

    def record_eval(self, rec: dict) -> None:
        """An evaluation's metrics: metrics.jsonl and TensorBoard (eval/<name>), and a line on stdout."""
        if not self.enabled:
            return
        self._write(rec)
        shown = "  ".join(f"{k[5:]} {v:.5g}" for k, v in rec.items()
                          if k.startswith("eval/") and isinstance(v, float))
        msg = f"eval at step {rec['step']}: {shown or 'nothing computed'}"
        if self.tty:
            self.bar.write(msg)
        else:
            dist.print0(msg)

    def image(self, path: Optional[Path], step: int) -> None:
        """A sample grid to the trackers."""
        if self.enabled and path is not None and self.trackers is not None:
            self.trackers.log_image(path, step)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self, status: str = "FINISHED") -> None:
        """The run ends (FINISHED), stops for a requeue (KILLED) or on an error (FAILED)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.trackers is not None:
            self.trackers.finish(status)


def telemetry_text(rec: dict) -> str:
    """A record's step time, data wait, peak memory and MFU, for a progress line."""
    parts = []
    if rec.get("step_time_s") is not None:
        parts.append(f"step {rec['step_time_s'] * 1000:.0f}ms")
    if rec.get("data_wait_share") is not None:
        parts.append(f"data {rec['data_wait_share']:.0%}")
    if rec.get("peak_mem_gib") is not None:
        parts.append(f"mem {rec['peak_mem_gib']:.2f}GiB")
    if rec.get("mfu") is not None:
        parts.append(f"MFU {rec['mfu']:.1%}")
    return "  ".join(parts)



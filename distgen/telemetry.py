"""Step telemetry, in every record (progress line, metrics.jsonl, trackers): samples/s in all and per device, step
time, the share of it spent waiting for the next batch (the loader's stall), peak memory, and model FLOP
utilisation (MFU) where one step's FLOPs can be counted and the device's peak is known; and the model state a rank
holds (``state_gib``: what sharding divides, counted from the tensors, so the same on CPU as on a GPU).

Nothing here reads the device inside a step: times are the host's clock between records (a record reads the
device's numbers anyway, so the queue has drained there), the data wait is the host's time inside the loader's
``next`` (a loader that keeps up has the batch ready; one that stalls keeps the host waiting there), CUDA's peak
memory is the caching allocator's own counter (no sync), and on CPU the process's peak resident set.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import random
import re
import resource
import sys
import time
from typing import Optional

import numpy as np
import torch

from distgen import dist
from distgen.engines_deepspeed import held

GiB = 2 ** 30

# Dense (no 2:4 sparsity) peak TFLOP/s of one device, by precision, from the vendors' data sheets. "tf32": float32
# matmuls and convolutions on tensor cores (train.tf32, on by default on CUDA); "fp32": without them.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "GB200": {"bf16": 2500, "fp16": 2500, "tf32": 1250},
    "B200": {"bf16": 2250, "fp16": 2250, "tf32": 1100},
    "H100 SXM": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},  # also H200, GH200, H800
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},  # also H200 NVL
    "H100 PCIe": {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2},
    "A100": {"bf16": 312, "fp16": 312, "tf32": 156, "fp32": 19.5},  # SXM and PCIe alike; also A800
    "L40S": {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6},
    "L4": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "A10": {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2},
    "MI300X": {"bf16": 1307.4, "fp16": 1307.4, "tf32": 653.7, "fp32": 163.4},  # also MI325X
}
# torch.cuda.get_device_name() -> row of PEAK_TFLOPS: the first pattern found in the name
DEVICE_ROWS = [(r"GB200", "GB200"), (r"B200", "B200"), (r"H200 NVL|H100 NVL", "H100 NVL"), (r"H100 PCIe", "H100 PCIe"),
               (r"GH200|H200|H100|H800", "H100 SXM"), (r"A100|A800", "A100"), (r"L40S", "L40S"), (r"\bL4\b", "L4"),
               (r"\bA10\b", "A10"), (r"MI300X|MI325X", "MI300X")]


def precision(tc, tf32: bool) -> str:
    """The precision of the run's matmuls: its autocast type, else TF32 or plain float32."""
    return tc.mixed_precision if tc.mixed_precision != "no" else ("tf32" if tf32 else "fp32")


def device_peak(tc, device: torch.device, tf32: bool) -> tuple[Optional[float], str]:
    """(one device's dense peak in TFLOP/s, where it came from), or (None, why there is none)."""
    prec = precision(tc, tf32)
    if tc.peak_tflops:
        return tc.peak_tflops, f"train.peak_tflops, {prec}"
    if device.type != "cuda":
        return None, f"no peak known on {device.type} (set train.peak_tflops to have MFU)"
    name = torch.cuda.get_device_name(device)
    row = next((r for pattern, r in DEVICE_ROWS if re.search(pattern, name)), None)
    peak = PEAK_TFLOPS.get(row, {}).get(prec)
    if peak is None:
        return None, f"no {prec} peak known for {name} (set train.peak_tflops to have MFU)"
    return peak, f"{name}, {prec}"


# --------------------------------------------------------------------------- one step's FLOPs
def count_step_flops(run) -> tuple[Optional[float], Optional[float]]:
    """FLOPs of one training step on one device, counted once at the start by torch.utils.flop_counter (matmuls,
    convolutions, attention: what MFU counts) on the plain networks before any engine wraps them: every phase's
    forward and backward on a batch of the run's size (a phase due every k steps counts 1/k), times the micro-steps.
    Returns (FLOPs, the device's peak TFLOP/s); (None, None), said why, where MFU would mislead or cannot be had.
    The count leaves no trace: weights, buffers, gradients, the family's state and every random generator are as
    they were."""
    tc = run.cfg.train
    why = run.family.flops_problem()
    peak, where = device_peak(tc, run.eng.device, run.speed.tf32)
    if why or peak is None:
        dist.print0(f"distgen: telemetry: no MFU: {why or where}")
        return None, None
    try:
        flops = _count(run)
    except Exception as e:  # noqa: BLE001 - telemetry must not stop a run; the records just lack MFU
        dist.print0(f"distgen: telemetry: no MFU: counting one step's FLOPs failed ({type(e).__name__}: {e})")
        return None, None
    dist.print0(f"distgen: telemetry: {flops / 1e9:.4g} GFLOP a step per device (forward and backward, counted "
                f"once); MFU against {peak:g} TFLOP/s ({where})")
    return flops, peak


def _count(run) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from distgen.data import make_train_loader
    from distgen.families import PhaseNets, StepContext

    cfg, device, nets = run.cfg, run.eng.device, run.nets
    data = dataclasses.replace(cfg.data, workers=0, shuffle_buffer=1)  # the first batch at once
    batch = next(iter(make_train_loader(data, batch_size=cfg.train.batch_size, rank=run.eng.rank,
                                        world=run.eng.world, seed=cfg.run.seed)))
    batch = run.speed.batch_layout({k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()})
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.mixed_precision)
    saved = _Saved(run.family, nets, device)
    try:
        total = 0.0
        for index, phase in enumerate(run.phases):
            for n, m in nets.items():  # the phase's network trains, the others are frozen (as the engines do)
                for p, keep in zip(m.parameters(), saved.trainable[n]):
                    p.requires_grad_(keep and n == phase.network)
            counter = FlopCounterMode(display=False)
            counter.mod_tracker = _Totals()
            with counter:
                with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
                    per_sample, _ = run.family.loss(StepContext(phase.name), PhaseNets(dict(nets), nets), batch,
                                                    torch.Generator(device=device).manual_seed(index))
                per_sample.float().mean().backward()
            total += counter.get_total_flops() / phase.every
        return total * cfg.train.grad_accum
    finally:
        saved.restore()


class _Totals:
    """FlopCounterMode's module tracker without its backward hooks, which torch.autograd.grad inside a loss (R1, a
    gradient penalty) makes fail ("A leaf node was passed to _will_engine_execute_node"): a total needs no
    per-module breakdown."""

    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *args) -> None:
        pass


class _Saved:
    """What a counted step may change, to put back: weights and buffers (EDM2 renormalises in place, BatchNorm
    keeps statistics), gradients and requires_grad flags, the family's state, and the random generators."""

    def __init__(self, family, nets: dict, device: torch.device):
        self.family, self.nets, self.device = family, nets, device
        self.states = {n: {k: v.detach().clone() for k, v in m.state_dict().items()} for n, m in nets.items()}
        self.trainable = {n: [p.requires_grad for p in m.parameters()] for n, m in nets.items()}
        self.family_state = copy.deepcopy(family.state_dict())
        self.rank_state = {k: v.clone() for k, v in family.rank_state().items()}
        self.rng = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
                    random.getstate(), np.random.get_state())

    def restore(self) -> None:
        for n, m in self.nets.items():
            m.load_state_dict(self.states[n])
            for p, keep in zip(m.parameters(), self.trainable[n]):
                p.grad = None
                p.requires_grad_(keep)
        self.family.load_state_dict(self.family_state)
        self.family.load_rank_state(self.rank_state)
        cpu, cuda, py, npy = self.rng
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        random.setstate(py)
        np.random.set_state(npy)


# --------------------------------------------------------------------------- the records' numbers
def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's counter, or on Linux the process's peak resident set (writing 5 to clear_refs
    resets VmHWM). Each record holds the peak since the one before, as torchtitan logs it: a run's steady state
    shows after the first record instead of the start-up's (a whole network before sharding) for ever."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type == "cpu":
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass  # not Linux, or not allowed: the peak then runs from the process's start


def peak_memory(device: torch.device) -> Optional[int]:
    """This process's peak memory in bytes since :func:`reset_peak_memory`: CUDA's most allocated; on CPU the
    peak resident set; None elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if device.type == "cpu":
        # Linux: this program's own peak (VmHWM, the peak of the address space exec made). getrusage's maxrss is
        # carried over exec from the forked parent, so a process started by a large one (a test runner, a
        # notebook) would report the parent's size
        try:
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux
    return None


# The keys of a record that measure the machine (its pace, its memory), not the training: two runs of the same
# training (a straight one and a resumed one) differ in these only
PACE_KEYS = ("samples_per_s", "samples_per_s_per_device", "step_time_s", "data_wait_share", "peak_mem_gib",
             "state_gib", "mfu", "eta_s", "checkpoint_blocked_s", "checkpoint_write_s")  # the last two: distgen.async_save


def _local(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` this rank holds: a DTensor's local shard (FSDP2), a ZeRO-3 parameter's partition."""
    return t.to_local() if hasattr(t, "to_local") else held(t)


def state_bytes(trained: dict) -> int:
    """The trained networks' state this rank holds: their parameters (its shards under FSDP2 and ZeRO-3), the
    optimizers' parameters where they are other tensors (DeepSpeed's fp32 master partitions) and states, each
    storage once, plus one gradient for each parameter the optimizer steps (the gradients live from the backward
    to the step, so a record between steps finds none). What sharding divides: counted from the tensors, it reads
    the same on CPU as on a GPU, and leaves out what an allocator adds (caches, the weights FSDP2 gathers for a
    forward, DDP's gradient buckets)."""
    storages: dict[int, int] = {}
    grads = 0

    def hold(t: torch.Tensor) -> None:
        s = _local(t).untyped_storage()
        storages[s.data_ptr()] = s.nbytes()

    for t in trained.values():
        for p in t.raw.parameters():
            hold(p)
        opt = t.opt
        while getattr(opt, "optimizer", None) is not None:
            opt = opt.optimizer  # Accelerate's wrapper, DeepSpeed's ZeRO optimizer: the torch one inside
        # the parameters it steps: its groups', and its states' keys (ZeRO-3 empties the groups between steps)
        stepped = {id(p): p for group in opt.param_groups for p in group["params"]}
        stepped.update((id(p), p) for p in opt.state if torch.is_tensor(p))
        for p in stepped.values():
            hold(p)
            grads += _local(p).numel() * p.element_size() if p.requires_grad else 0
        for st in opt.state.values():
            for v in st.values():
                if torch.is_tensor(v):
                    hold(v)
    storages.pop(0, None)  # empty tensors
    return sum(storages.values()) + grads


class Telemetry:
    """The pace and the device's state between two records, for every record; each rank measures its own, and a
    record holds the slowest (data wait) and fullest (memory) device's."""

    def __init__(self, device: torch.device, world: int, global_batch: int, start_nimg: int, waited: float,
                 flops: Optional[float], peak_tflops: Optional[float], trained: Optional[dict] = None):
        self.device, self.world, self.global_batch, self.trained = device, world, global_batch, trained or {}
        self.flops, self.peak = flops, peak_tflops
        self.t_last = self.t_start = time.perf_counter()
        self.n_last = self.n_start = start_nimg
        self.w_last = waited
        reset_peak_memory(device)  # this run's peak, not an earlier one's in this process

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (an evaluation) out of the training pace."""
        self.t_last += seconds

    def record(self, step: int, nimg: int, stop_at: int, waited: float) -> dict:
        """Every rank: the numbers since the last record. ``waited``: the seconds this rank has spent in the data
        stream's ``next`` so far (:attr:`DataCursor.waited`)."""
        now = time.perf_counter()
        elapsed = max(now - self.t_last, 1e-9)
        steps = (nimg - self.n_last) / self.global_batch
        wait = min((waited - self.w_last) / elapsed, 1.0)
        mem = peak_memory(self.device)
        reset_peak_memory(self.device)
        shares, mems, states = zip(*dist.all_gather_object((wait, mem, state_bytes(self.trained))))
        sps = (nimg - self.n_last) / elapsed
        avg = (nimg - self.n_start) / max(now - self.t_start, 1e-9)
        rec = {"samples_per_s": sps, "samples_per_s_per_device": sps / self.world,
               "step_time_s": elapsed / steps if steps else None, "data_wait_share": max(shares),
               **({"peak_mem_gib": max(mems) / GiB} if None not in mems else {}), "state_gib": max(states) / GiB,
               "eta_s": (stop_at - step) * self.global_batch / avg if avg > 0 else None}
        if self.flops and self.peak and steps:
            rec["mfu"] = self.flops / (elapsed / steps) / (self.peak * 1e12)
        self.t_last, self.n_last, self.w_last = now, nimg, waited
        return rec

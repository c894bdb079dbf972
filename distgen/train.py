"""The training loop. It receives a validated Config and knows no model family and no engine.

A family (distgen.families) supplies networks, phases and per-sample losses; an engine
(distgen.engines: DDP, DeepSpeed ZeRO or FSDP2, on Accelerate) trains them; this loop runs the phases,
keeps EMAs, logs, samples, checkpoints, resumes (distgen.run_checkpoints) and handles preemption. Counting is in
samples seen (kimg), never epochs. Read :func:`train` top to bottom; the pieces it calls follow it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Optional

import torch

from distgen import checkpoint as ckpt
from distgen import dist, phema, preemption, speed, telemetry, threads
from distgen.config import Config, to_dict, to_yaml
from distgen.data import make_loader, make_train_loader, resolve_shards
from distgen.durable import write_text_durably
from distgen.ema import EMASet, gathered_emas, shards_held
from distgen.engines import Engine
from distgen.errors import TrainingError
from distgen.loop_state import DataCursor, Run, TrainState
from distgen.ownership import clear_failure, record_failure, take_run_folder
from distgen.families import FAMILIES, DataInfo, Family, Phase, PhaseNets, StepContext, build_family
from distgen.preemption import EXIT_PREEMPTED
from distgen.previews import ema_view, preview_batch, sample_grid
from distgen.runlog import RunLog, Tally, interval_means
from distgen.trackers import Trackers
from distgen.run_checkpoints import resume, save_checkpoint
from distgen.world_change import run_length
from distgen.families.capabilities import Translates, offers


def train(cfg: Config, allow_config_change: bool = False) -> int:
    """Train ``cfg``'s run to its end (0), or until a scheduler's signal (:data:`EXIT_PREEMPTED`).

    ``allow_config_change``: resume a checkpoint whose model config differs from ``cfg`` (refused otherwise).
    """
    preempt = preemption.install()  # the CLI installed it before importing torch; callers of train() get it here
    info = data_info(cfg)
    family = build_family(cfg.model, info)
    phases = family.phases()
    trackers = Trackers(cfg)  # a tracker that is not installed is refused here
    eng = Engine(cfg.train, family, list(dict.fromkeys(p.network for p in phases)),  # what cannot run fails here
                 log_with=trackers.instances)
    # From here the run folder is this trainer's alone: new, empty or distgen's own, and locked until the end.
    lock = take_run_folder(Path(cfg.run.folder), eng.main, dist.all_gather_object)
    try:
        if eng.main:
            clear_failure(Path(cfg.run.folder))
        return _train(cfg, eng, family, phases, info, preempt, allow_config_change, trackers)
    except BaseException as e:  # what stopped the run, for `distgen status` (still raised: the CLI prints it)
        if eng.main:
            record_failure(Path(cfg.run.folder), e)
        raise
    finally:
        lock.release()


def _train(cfg: Config, eng: Engine, family: Family, phases: list[Phase], info: DataInfo,
           preempt: preemption.Preemption, allow_config_change: bool, trackers: Trackers) -> int:
    tc, ec = cfg.train, cfg.eval
    trained_names = list(dict.fromkeys(p.network for p in phases))
    fast = speed.resolve(tc, eng.device, family, trained_names, eng.deepspeed, eng.fsdp is not None)
    fast.apply_backends(eng.device)

    # ---- what runs, said once (the batch and the run's length follow the checkpoint: below, at the resume)
    dist.print0(to_yaml(cfg), end="")
    dist.print0(f"distgen: {eng.world} process(es) on {eng.device} ({eng.describe()}), mixed precision "
                f"{tc.mixed_precision}, checkpoints {'in the background' if tc.async_checkpoint else 'synchronous'}")

    # ---- networks (the same initial weights on every rank), EMAs, engines
    run = Run(cfg, eng, family, phases, info, Path(cfg.run.folder), fast)  # its batch and length: at the resume
    torch.manual_seed(cfg.run.seed)
    # Python's and numpy's generators too, per rank: a run started afresh or in a process that trained before
    # (a sweep, a test matrix) has the same states, which every checkpoint records and a resume restores.
    dist.seed_host_generators(cfg.run.seed, eng.rank)
    run.nets = {n: m.to(eng.device) for n, m in family.build_networks().items()}
    if not ckpt.checkpoint_folders(run.root) and type(family).data_init is not Family.data_init:
        # Data-dependent initialisation (Glow's actnorm) on a fresh run, before engines copy the weights
        # and EMAs start from them; a resumed run has the result in its checkpoint.
        first = make_loader(list(cfg.data.train), dataclasses.replace(cfg.data, workers=0), batch_size=tc.batch_size,
                            mode="train", rank=eng.rank, world=eng.world, seed=cfg.run.seed)
        family.data_init(run.nets, on_device(next(iter(first)), eng.device))
    if fast.channels_last:  # before the EMA copies, so that sampling from them runs in the same layout
        for m in run.nets.values():
            m.to(memory_format=torch.channels_last)
    flops, peak = telemetry.count_step_flops(run)  # MFU's numerator, once, before engines wrap the networks
    run.emas = {n: EMASet.from_config(run.nets[n], cfg.ema) for n in family.ema_networks()}
    # After the EMA copies (plain modules: they only sample), before compiling (which traces the checkpoints)
    fast.checkpoint_activations(family, run.nets)
    dist.print0(f"distgen: speed: {fast.describe()}, {threads.describe()}")  # once the networks said what they take
    for n in fast.compiled:  # after the EMA copies: those are plain modules (sampling is not compiled)
        fast.compile_network(run.nets[n])
    run.trained = eng.prepare(run.nets, family, fast, run.emas)  # FSDP2 and ZeRO-3 shard the EMAs as their networks
    ema_shards = shards_held(run.emas)
    if ema_shards:
        dist.print0(f"distgen: {ema_shards}")
    for n in set(run.nets) - set(run.trained):
        run.nets[n].requires_grad_(False)  # networks no phase trains (a frozen autoencoder)

    # ---- resume from the newest checkpoint that loads (a damaged newer one is reported and set aside); the batch
    # by distgen.world_change's rule (the checkpoint's global batch, also at another process count)
    latest, state = resume(run, allow_config_change)
    global_batch = run.global_batch
    total_steps, stop_at = run_length(tc.total_kimg, tc.max_steps, state.step, state.nimg, global_batch)
    run.stop_at = stop_at
    dist.print0(f"distgen: global batch {global_batch} = {run.batch.per_device} per device x {eng.world} process(es) "
                f"x {tc.grad_accum} accumulation; {total_steps} steps for {tc.total_kimg:g} kimg")
    if latest is not None and state.finished_at(stop_at):
        # A run that already ended (a job requeued after its final checkpoint, say) ends again at once.
        dist.print0(f"distgen: {run.dir} already finished at step {state.step} ({state.nimg / 1000:.1f} kimg); "
                    "nothing to do")
        eng.end()
        return 0
    if eng.main:  # written once the checkpoint to resume from is known to load and to fit this config
        run.dir.mkdir(parents=True, exist_ok=True)
        write_text_durably(run.dir / "config.yaml", to_yaml(cfg))
        if latest is not None:
            dist.print0(f"distgen: resumed from {latest} (step {state.step}, {state.nimg / 1000:.1f} kimg)")
        dropped = phema.drop_snapshots_after(run.dir, state.nimg)  # a stopped run's, taken again from here
        if dropped:
            dist.print0(f"distgen: {dropped} EMA snapshot(s) after {state.nimg / 1000:.1f} kimg set to be taken again")
    trackers.start(eng.acc, state.step)  # one that cannot start stops the run here, before its first step

    # ---- the data stream, where the checkpoint left it; logs; evaluation
    at, skip = (state.step, 0) if run.batch.restarts_stream else (state.data_start_step, state.data_skip)
    cursor = DataCursor(lambda start: make_train_loader(
        cfg.data, batch_size=run.batch.per_device, rank=eng.rank, world=eng.world, seed=cfg.run.seed,
        start_step=start, pin_memory=eng.device.type == "cuda"), tc.checkpoint_every, start=at, skip=skip)
    if offers(family, Translates) and eng.main:  # the grids translate the same inputs every time
        run.preview = preview_batch(cfg, tc.sample_num, eng.device)
    log = RunLog(run.dir, stop_at, state.step, eng.main, trackers, shown=family.progress_scalars)
    flops = flops and flops * run.batch.per_device / tc.batch_size  # counted at the config's per-device batch
    run.telemetry = telemetry.Telemetry(eng.device, eng.world, global_batch, state.nimg, cursor.waited, flops, peak,
                                        run.trained)
    run.tally = Tally(eng.device, state.counters["nonfinite_run"])
    evaluator = make_evaluator(cfg, eng) if ec.every else None
    last_good = latest
    if dist.agreed(preempt.flag):
        # The signal came during start-up: nothing new to save; the newest checkpoint stays as it is.
        dist.print0(f"distgen: signal received during start-up, before step {state.step + 1}; no checkpoint "
                    f"written; exiting with {EXIT_PREEMPTED} (requeue)")
        log.close("KILLED")
        return EXIT_PREEMPTED

    # ---- the loop: one step runs every phase that is due
    status = "FAILED"  # the trackers' runs end FINISHED, KILLED (preempted) or FAILED
    try:
        while state.step < stop_at:
            lr_mult = lr_factor(tc, state.nimg)
            train_step(run, state, cursor, lr_mult)
            log.advance()
            if phema.snapshot_due(state.nimg, global_batch, cfg.ema.snapshot_kimg):
                with gathered_emas(run.emas):  # every rank (FSDP2 gathers the EMAs' shards); rank 0 writes
                    if eng.main:
                        phema.write_snapshot(run.dir, run.emas, state.step, state.nimg, cfg.ema.snapshot_dtype)

            # ---- records, and what ends or interrupts the run. The step's counters and losses stay on the
            # device (run.tally) and are read only here, at a record, a checkpoint or a signal.
            record = state.step % tc.log_every == 0 or state.step == stop_at
            periodic = cursor.due(state.step) and state.step < stop_at
            signalled = dist.agreed(preempt.flag) and state.step < stop_at  # at the last step the run just ends below
            diverged = False
            if record or periodic or signalled:
                diverged = run.tally.read(state.counters, state.interval) >= tc.max_nonfinite
            unhealthy = None
            if record or diverged:
                # the family's own divergence signs in the record's means (an EBM's energies running away)
                unhealthy = run.family.health(log_record(run, state, cursor, log, lr_mult))
            if diverged or unhealthy:
                where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
                why = unhealthy or f"{tc.max_nonfinite} non-finite steps in a row"
                raise TrainingError(f"{why} (step {state.step}); stopping without saving: {where}")
            if signalled:
                path = save_checkpoint(run, state, cursor, "preempted")
                dist.print0(f"\ndistgen: signal received: checkpoint {path} written at step {state.step}; "
                            f"exiting with {EXIT_PREEMPTED} (requeue)")
                status = "KILLED"
                return EXIT_PREEMPTED

            # ---- periodic checkpoint (none in a non-finite streak: the last one stays the last good one),
            # after which the data stream restarts, in a straight run as in a resumed one (the cursor's rule)
            if periodic and cursor.boundary(state.step, state.counters["nonfinite_run"]):
                last_good = save_checkpoint(run, state, cursor, "periodic")
                cursor.restart(state.step)
                preemption.hold_for_test(preempt, "periodic")
            if tc.sample_every and state.step % tc.sample_every == 0 and state.step < stop_at:
                with gathered_emas(run.emas):
                    log.image(sample_grid(run, f"step-{state.step:08d}"), state.step)
                eng.barrier()
            if evaluator is not None and (state.step % ec.every == 0 or state.step == stop_at):
                evaluate(run, state, evaluator, log)

        # ---- the end: final checkpoint, a sample grid, where everything is
        final = save_checkpoint(run, state, cursor, "end")
        preemption.hold_for_test(preempt, "final")
        with gathered_emas(run.emas):
            grid = sample_grid(run, f"step-{state.step:08d}")
        log.image(grid, state.step)
        status = "FINISHED"
    finally:
        run.saver.close()  # a write in flight (the loop left on an error) finishes; its own failure is printed
        log.close(status)
    count_skips(run, state, cursor)
    print_summary(run, state, final, grid)
    eng.barrier()
    eng.end()
    return 0


# --------------------------------------------------------------------------- one step, one phase
def train_step(run: Run, state: TrainState, cursor: DataCursor, lr_mult: float) -> None:
    """One step: every phase that is due, then the EMAs of the networks whose update went through.

    Whether the step went through is a device tensor (``bad``: a loss or gradient was not finite), never read
    here: the optimizer and the EMAs skip on the device, and the counters wait in ``run.tally``.
    """
    bad = torch.zeros((), dtype=torch.bool, device=run.eng.device)
    held = {}  # network -> its update was held by train.skip_grad_norm (VDVAE): its EMA holds too
    for index, phase in enumerate(run.phases):
        if state.step % phase.every == 0:
            bad, was_held = run_phase(run, phase, index, state, cursor, lr_mult, bad)
            if was_held is not None:
                held[phase.network] = held[phase.network] | was_held if phase.network in held else was_held
    for t in run.trained.values():
        t.restore()
    state.advance(run.global_batch)
    run.tally.end_step(bad)
    for n, e in run.emas.items():
        keep = ~(bad | held[n]) if n in held else ~bad
        e.update(list(run.trained[n].model.parameters()), state.nimg, run.global_batch, network=run.nets[n],
                 keep=keep)


def run_phase(run: Run, phase: Phase, index: int, state: TrainState, cursor: DataCursor, lr_mult: float,
              bad: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One phase's forward, backward and optimizer step over ``train.grad_accum`` micro-batches.

    ``bad`` (a device bool) is set once a phase of this step had a non-finite loss or gradient: later phases
    then hold their update too. Returns ``bad`` and whether ``train.skip_grad_norm`` held this network's
    update (a device bool, None without it).
    """
    cfg, eng, tc = run.cfg, run.eng, run.cfg.train
    t = run.trained[phase.network]
    t.train_only_this(list(run.trained.values()))
    view = PhaseNets({n: t.model if n == phase.network else run.nets[n] for n in run.nets}, run.nets)
    for g in t.opt.param_groups:
        g["lr"] = tc.lr * t.lr_scale * lr_mult
    noise, held = torch.Generator(device=eng.device), None
    for micro in range(tc.grad_accum):
        batch = run.speed.batch_layout(on_device(cursor.next(), eng.device))
        # Noise of (seed, rank, step, phase, micro-step): no RNG state to carry across resumes. The global
        # RNG too (dropout draws from it, and so do loaders built at a resume): only a per-step seed makes a
        # resumed run's dropout masks those of the straight run.
        noise.manual_seed(dist.derive_seed(cfg.run.seed, eng.rank, state.step, index, micro))
        torch.manual_seed(dist.derive_seed(cfg.run.seed, eng.rank, state.step, index, micro, 1))
        with t.acc.accumulate(t.model):
            with eng.gathered(t, phase.twice):  # FSDP2: a double backward's weights held to its end
                with eng.autocast(t):
                    per_sample, extras = run.family.loss(StepContext(phase.name, state.step, state.nimg, micro), view,
                                                         batch, noise)
                loss = per_sample.float().mean()  # the reduction in float32 whatever the precision
                finite = torch.isfinite(loss.detach())
                run.tally.add(phase.name, loss, extras, finite)
                bad = eng.backward(t, loss, bad | ~finite, run.tally)
            bad, was_held = eng.step(t, bad, run.tally)
            if was_held is not None:
                held = was_held if held is None else held | was_held
            if t.acc.sync_gradients:
                # After the optimizer step, skipped or not: WGAN's clipping of weights that did not move
                # changes nothing.
                run.family.after_step(phase.name, run.nets)
    return bad, held


# --------------------------------------------------------------------------- records, samples, evaluation
def log_record(run: Run, state: TrainState, cursor: DataCursor, log: RunLog, lr_mult: float) -> dict:
    """Every rank: the interval's means (all ranks') into one metrics.jsonl record, returned (the same on every
    rank); the interval starts anew."""
    tc, counters = run.cfg.train, state.counters
    count_skips(run, state, cursor)
    means = interval_means(state.interval, [p.name for p in run.phases])
    rec = {"step": state.step, "kimg": state.nimg / 1000, "loss": means.pop("loss"), "lr": tc.lr * lr_mult,
           **run.telemetry.record(state.step, state.nimg, run.stop_at, cursor.waited), **run.saver.timings(),
           "nonfinite_total": counters["nonfinite_total"], "overflow_total": counters["overflow_total"],
           "skipped_updates_total": counters["skipped_updates_total"],
           **({"skipped_samples_total": counters["skipped_samples_total"]} if run.cfg.data.on_error == "skip"
              else {}),
           **means}  # loss null when every step of the interval was non-finite
    log.record(rec)
    state.interval.clear()
    return rec


def count_skips(run: Run, state: TrainState, cursor: DataCursor) -> None:
    """Every rank: add all ranks' bad samples skipped since the last call to ``skipped_samples_total``."""
    if run.cfg.data.on_error != "skip":
        return
    local = cursor.skipped
    state.counters["skipped_samples_total"] += int(dist.all_reduce_sum(int(local - run.skips_reported)))
    run.skips_reported = local


def make_evaluator(cfg: Config, eng: Engine):
    """The periodic evaluator, or None when every asked-for metric has to be skipped (training goes on)."""
    from distgen.evaluate import Evaluator, spec_from_config

    evaluator = Evaluator(spec_from_config(cfg), eng.device)
    for m, why in evaluator.skipped.items():
        dist.print0(f"distgen: eval: {m} will be skipped: {why}")
    return None if all(m in evaluator.skipped for m in cfg.eval.metrics) else evaluator


def evaluate(run: Run, state: TrainState, evaluator, log: RunLog) -> None:
    """Metrics of the primary EMA weights; the best ones so far are kept in run_dir/best."""
    ec, t0 = run.cfg.eval, time.time()
    with gathered_emas(run.emas):  # every rank alike (FSDP2 gathers the EMAs' shards)
        res = evaluator.run(run.family, ema_view(run), run.cfg.data)
        primary = {n: e.state()[0][0] for n, e in run.emas.items()}
    value = res.get(ec.best_key)
    improved = value is not None and ec.better(value, state.best["value"] if state.best else None)
    if improved:
        state.best = {"metric": ec.best_key, "value": value, "step": state.step}
    # the best so far beside the results: a tracker plots it as a curve, and its summary shows the last
    best = {f"best/{state.best['metric']}": state.best["value"], "best/step": state.best["step"]} if state.best else {}
    log.record_eval({"step": state.step, "kimg": state.nimg / 1000,
                     **{f"eval/{k}": v for k, v in res.items() if k != "skipped"}, **best})
    if improved and run.eng.main:  # in the background with train.async_checkpoint
        run.saver.submit(run.dir / "best", ckpt.write_best, run.dir / "best", primary,
                         {"step": state.step, "nimg": state.nimg, "best": state.best, "family": run.family.name,
                          "data_info": to_dict(run.info), "config": to_dict(run.cfg)})
    run.eng.barrier()
    run.telemetry.exclude(time.time() - t0)  # evaluation time does not count against training speed


def print_summary(run: Run, state: TrainState, final: Path, grid: Optional[Path]) -> None:
    """Rank 0: where everything is."""
    if not run.eng.main:
        return
    dist.print0(f"distgen: done at step {state.step} ({state.nimg / 1000:.1f} kimg)")
    if state.counters["skipped_samples_total"]:
        dist.print0(f"distgen: {state.counters['skipped_samples_total']} bad input sample(s) skipped in this run "
                    f"(data.on_error=skip; skipped_samples_total in metrics.jsonl)")
    dist.print0(f"distgen: run folder  {run.dir}")
    dist.print0(f"distgen: checkpoint  {final}")
    tracked = f" (trackers: {', '.join(run.cfg.run.trackers)})" if run.cfg.run.trackers else ""
    dist.print0(f"distgen: metrics     {run.dir / 'metrics.jsonl'}{tracked}")
    if grid:
        dist.print0(f"distgen: samples     {grid}")
    snapshots = phema.read_index(run.dir, must_exist=False)
    if snapshots:
        dist.print0(f"distgen: EMA snapshots {len(snapshots)} in {run.dir / phema.SNAPSHOT_DIR} "
                    f"(distgen ema {run.dir} ...)")
    if state.best:
        b = state.best
        dist.print0(f"distgen: best        {run.dir / 'best'} ({b['metric']} {b['value']:.5g} at step "
                    f"{b['step']})")


# --------------------------------------------------------------------------- small helpers
def lr_factor(cfg, nimg: int) -> float:
    """Learning-rate multiplier after ``nimg`` samples: linear warm-up, then constant/cosine/linear decay."""
    warm = cfg.warmup_kimg * 1000
    if warm > 0 and nimg < warm:
        return (nimg + 1) / warm
    total = cfg.total_kimg * 1000
    start = warm if cfg.lr_decay_start_kimg is None else cfg.lr_decay_start_kimg * 1000
    frac = min(max((nimg - start) / max(total - start, 1), 0.0), 1.0)
    if cfg.lr_decay == "cosine":
        return 0.5 * (1 + math.cos(math.pi * frac))
    if cfg.lr_decay == "linear":
        return 1.0 - frac
    return 1.0


def data_info(cfg: Config) -> DataInfo:
    if not cfg.data.train:
        raise TrainingError("data.train: no training shards configured (a manifest, brace pattern or pipe: URLs)")
    meta = resolve_shards(list(cfg.data.train)).meta
    if meta.get("kind") == "latents" and cfg.model.family != "latent_diffusion":
        raise TrainingError(f"data.train: {cfg.data.train[0]} holds latents (distgen data encode), which only "
                            f"model.family latent_diffusion trains on, not {cfg.model.family!r}")
    family = FAMILIES[cfg.model.family]
    layout = "unpaired" if cfg.data.train_b else ("paired" if meta.get("layout") == "paired" else "images")
    if layout != family.data_layout:
        needs = {"images": "image shards (data.train), without data.train_b",
                 "paired": "paired shards in data.train (a manifest with layout paired: distgen data shard "
                           "pix2pix:DIR or fashion-mnist:edges)",
                 "unpaired": "two domains: data.train (A) and data.train_b (B), e.g. distgen data shard "
                             "cyclegan:DIR or fashion-mnist:classes=A/B"}
        field = "data.train_b" if cfg.data.train_b or family.data_layout == "unpaired" else "data.train"
        raise TrainingError(f"{field}: model.family {cfg.model.family!r} trains on {needs[family.data_layout]}; "
                            f"the configured data is {layout} ({cfg.data.train[0]})")
    return DataInfo(cfg.data.resolution, cfg.data.channels, int(meta.get("num_classes") or 0)
                    if layout == "images" else 0)


def on_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}

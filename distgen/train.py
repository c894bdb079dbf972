"""The training loop. It receives a validated Config and knows no model family and no engine.

A family (distgen.families) supplies networks, phases and per-sample losses; an engine
(distgen.engines: DDP, DeepSpeed ZeRO or FSDP2, on Accelerate) trains them; this loop runs the phases,
keeps EMAs, logs, samples, checkpoints, resumes and handles preemption. Counting is in samples
seen (kimg), never epochs. Read :func:`train` top to bottom; the pieces it calls follow it.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from distgen import checkpoint as ckpt
from distgen import dist, phema, preemption, speed, telemetry, threads
from distgen.config import Config, model_changes, to_dict, to_yaml
from distgen.data import make_loader, make_train_loader, resolve_shards
from distgen.durable import write_text_durably
from distgen.ema import EMASet, gathered_emas
from distgen.engines import Engine
from distgen.errors import TrainingError
from distgen.loop_state import DataCursor, Run, TrainState
from distgen.ownership import clear_failure, record_failure, take_run_folder
from distgen.families import FAMILIES, DataInfo, Family, Phase, PhaseNets, StepContext, build_family
from distgen.preemption import EXIT_PREEMPTED
from distgen.previews import ema_view, preview_batch, sample_grid
from distgen.runlog import RunLog, Tally, interval_means
from distgen.trackers import Trackers
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

    # ---- the run's length, said once
    global_batch = tc.batch_size * eng.world * tc.grad_accum
    total_steps = math.ceil(tc.total_kimg * 1000 / global_batch)
    stop_at = min(total_steps, tc.max_steps) if tc.max_steps else total_steps
    dist.print0(to_yaml(cfg), end="")
    dist.print0(f"distgen: {eng.world} process(es) on {eng.device} ({eng.describe()}), mixed precision "
                f"{tc.mixed_precision}")
    dist.print0(f"distgen: speed: {fast.describe()}, {threads.describe()}")
    dist.print0(f"distgen: global batch {global_batch} = {tc.batch_size} per device x {eng.world} process(es) x "
                f"{tc.grad_accum} accumulation; {total_steps} steps for {tc.total_kimg:g} kimg")

    # ---- networks (the same initial weights on every rank), EMAs, engines
    run = Run(cfg, eng, family, phases, info, Path(cfg.run.folder), stop_at, global_batch, fast)
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
    for n in fast.compiled:  # after the EMA copies: those are plain modules (sampling is not compiled)
        fast.compile_network(run.nets[n])
    run.trained = eng.prepare(run.nets, family, fast, run.emas)  # FSDP2 shards the EMAs as their networks
    for n in set(run.nets) - set(run.trained):
        run.nets[n].requires_grad_(False)  # networks no phase trains (a frozen autoencoder)

    # ---- resume from the newest checkpoint that loads (a damaged newer one is reported and set aside)
    latest, state = resume(run, allow_config_change)
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
    cursor = DataCursor(lambda start: make_train_loader(
        cfg.data, batch_size=tc.batch_size, rank=eng.rank, world=eng.world, seed=cfg.run.seed, start_step=start,
        pin_memory=eng.device.type == "cuda"), tc.checkpoint_every, start=state.data_start_step, skip=state.data_skip)
    if offers(family, Translates) and eng.main:  # the grids translate the same inputs every time
        run.preview = preview_batch(cfg, tc.sample_num, eng.device)
    log = RunLog(run.dir, stop_at, state.step, eng.main, trackers, shown=family.progress_scalars)
    run.telemetry = telemetry.Telemetry(eng.device, eng.world, global_batch, state.nimg, cursor.waited, flops, peak)
    run.tally = Tally(eng.device, state.counters["nonfinite_run"])
    evaluator = make_evaluator(cfg, eng) if ec.every else None
    last_good = latest
    if agreed(preempt.flag):
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
            signalled = agreed(preempt.flag) and state.step < stop_at  # at the last step the run just ends below
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
            with eng.autocast(t):
                per_sample, extras = run.family.loss(StepContext(phase.name, state.step, state.nimg, micro), view, batch,
                                                     noise)
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


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(run: Run, state: TrainState, cursor: DataCursor, reason: str) -> Path:
    """Every rank: the full state into ``checkpoints/.tmp-step-N``, flushed, then renamed ``step-N``. A signal's
    deadline waits for it; an error or Ctrl-C on the way removes the unfinished folder."""
    tmp = ckpt.tmp_dir(run.root, state.step)
    with preemption.install().saving():
        try:
            return _write_checkpoint(run, state, cursor, reason, tmp)
        except BaseException:
            if run.eng.main:
                shutil.rmtree(tmp, ignore_errors=True)  # distgen's own .tmp-step-* folder
            raise


def _write_checkpoint(run: Run, state: TrainState, cursor: DataCursor, reason: str, tmp: Path) -> Path:
    eng, tc = run.eng, run.cfg.train
    # Where the data stream stands: restarted at this step by a resume, or the batches drawn (the cursor's rule)
    state.data_start_step, state.data_skip = cursor.checkpoint_position(state.step, state.counters["nonfinite_run"])
    if eng.main:
        if tmp.exists():
            shutil.rmtree(tmp)  # distgen's own temporary folder (.tmp-step-*), never a user's
        tmp.mkdir(parents=True)
    eng.barrier()
    eng.save(run.trained, tmp)
    # The shared files: gathered on every rank (FSDP2's full state dicts and EMAs are collectives), written by rank 0
    engine_state = eng.state_for_checkpoint(run.trained, run.nets)
    with gathered_emas(run.emas):
        emas = {n: e.state() for n, e in run.emas.items()}
    if eng.main:
        meta = {**state.to_meta(), "world_size": eng.world, "reason": reason,
                "ema_steps": {n: steps for n, (_, steps) in emas.items()},
                "family_state": run.family.state_dict(), "family": run.family.name, "data_info": to_dict(run.info),
                "config": to_dict(run.cfg)}
        ckpt.write(tmp, emas={n: tensors for n, (tensors, _) in emas.items()}, meta=meta, **engine_state)
    ckpt.save_rng(tmp, eng.rank)
    if keeps_rank_state(run.family):
        ckpt.save_tensors(ckpt.family_rank_file(tmp, eng.rank), run.family.rank_state())
    eng.barrier()
    eng.flush(tmp)
    final = ckpt.finalize(run.root, state.step, tc.keep_checkpoints) if eng.main else ckpt.step_dir(run.root, state.step)
    eng.barrier()
    return final


def resume(run: Run, allow_config_change: bool) -> tuple[Optional[Path], TrainState]:
    """Load the newest checkpoint that loads on every rank into the networks, EMAs, engine and RNGs, and
    return it with its state (a fresh state when the run folder has no checkpoint)."""
    eng, cfg = run.eng, run.cfg

    def load(folder: Path) -> dict:
        meta = ckpt.read_meta(folder, ckpt.RESUME_KEYS)
        changed = model_changes(meta["config"], cfg)
        if changed and not allow_config_change:
            raise TrainingError(f"{folder / 'meta.json'}: the run was trained with another model config; "
                                f"changed: {'; '.join(changed)}. Train in a new run folder, or pass "
                                f"--allow-config-change to resume with the new values on purpose")
        other_engine = eng.engine_of(folder)
        if other_engine:
            raise TrainingError(other_engine)
        data = ckpt.read(folder, meta, rank=eng.rank, emas={n: len(e.emas) for n, e in run.emas.items()},
                         family_rank=keeps_rank_state(run.family), **eng.files_to_read(run.trained, run.nets))
        eng.load(run.trained, folder, data)
        for n, tensors in data.weights.items():
            load_weights(run.nets[n], tensors, ckpt.weights_file(folder, n))
        run.family.load_state_dict(meta.get("family_state", {}))
        run.family.load_rank_state(data.family_rank)
        for n, e in run.emas.items():
            e.load(data.emas[n], meta["ema_steps"][n])
        if data.rng is not None:
            ckpt.set_rng_state(*data.rng)
        return meta

    latest, meta = ckpt.load_newest(run.root, load, main=eng.main, failed_anywhere=agreed, set_aside_damaged=True,
                                    log=dist.print0)
    if latest is None:
        return None, TrainState()
    if meta["world_size"] != eng.world:
        dist.print0(f"distgen: note: {latest} was written by {meta['world_size']} process(es), resuming with "
                    f"{eng.world}")
    changed = model_changes(meta["config"], cfg)
    if changed:
        dist.print0(f"distgen: resuming with a changed config (--allow-config-change): {'; '.join(changed)}")
    return latest, TrainState.from_meta(meta)


def keeps_rank_state(family: Family) -> bool:
    return type(family).rank_state is not Family.rank_state


def load_weights(module: torch.nn.Module, tensors: dict, path: Path) -> None:
    """load_state_dict with an error that names the file (a size mismatch means another model config)."""
    try:
        module.load_state_dict(tensors)
    except RuntimeError as e:
        first = " ".join(str(e).split())[:400]
        raise TrainingError(f"{path}: does not fit the configured network ({first})") from None


# --------------------------------------------------------------------------- records, samples, evaluation
def log_record(run: Run, state: TrainState, cursor: DataCursor, log: RunLog, lr_mult: float) -> dict:
    """Every rank: the interval's means (all ranks') into one metrics.jsonl record, returned (the same on every
    rank); the interval starts anew."""
    tc, counters = run.cfg.train, state.counters
    count_skips(run, state, cursor)
    means = interval_means(state.interval, [p.name for p in run.phases])
    rec = {"step": state.step, "kimg": state.nimg / 1000, "loss": means.pop("loss"), "lr": tc.lr * lr_mult,
           **run.telemetry.record(state.step, state.nimg, run.stop_at, cursor.waited),
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
    if improved and run.eng.main:
        ckpt.write_best(run.dir / "best", primary,
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


def agreed(flag: bool) -> bool:
    """Did any rank raise ``flag``? (The same answer on every rank.)"""
    return dist.all_reduce_sum(int(flag)) > 0 if dist.world_size() > 1 else flag

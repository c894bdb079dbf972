"""A run's checkpoints from the training loop's side: writing one (every rank its own files, rank 0 the shared
ones, in the background with ``train.async_checkpoint``) and resuming from the newest that loads. The layout and
its readers are distgen.checkpoint's; what an engine keeps is distgen.engines'."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path
from typing import Optional

import torch

from distgen import checkpoint as ckpt
from distgen import dist, preemption
from distgen.config import model_changes, to_dict
from distgen.ema import gathered_emas
from distgen.errors import CheckpointError, TrainingError
from distgen.families import Family
from distgen.loop_state import DataCursor, Run, TrainState
from distgen.world_change import deepspeed_refusal, plan_batch


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(run: Run, state: TrainState, cursor: DataCursor, reason: str) -> Path:
    """Every rank: the full state into ``checkpoints/.tmp-step-N``, flushed, then renamed ``step-N`` (a periodic one
    in the background with train.async_checkpoint, once the previous write ended: distgen.async_save). A signal's
    deadline waits for it; an error or Ctrl-C on the way removes the unfinished folder."""
    tmp = ckpt.tmp_dir(run.root, state.step)
    with run.saver.saving(ckpt.step_dir(run.root, state.step), say=reason != "periodic"), preemption.install().saving():
        try:
            return _write_checkpoint(run, state, cursor, reason, tmp)
        except BaseException:
            if run.eng.main and not run.saver.in_flight():  # a write in flight cleans up after itself
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
    background = run.saver.background and reason == "periodic"
    # sharded files in the background: each rank's shards copied here, written by every rank's writer thread
    shards = eng.save(run.trained, tmp, stage=background)
    ckpt.save_rng(tmp, eng.rank)
    if keeps_rank_state(run.family):
        ckpt.save_tensors(ckpt.family_rank_file(tmp, eng.rank), run.family.rank_state())
    eng.barrier()
    eng.flush(tmp)
    # The shared files: gathered on every rank (FSDP2's full state dicts and EMAs are collectives), then written,
    # flushed and renamed into place by rank 0
    engine_state = eng.state_for_checkpoint(run.trained, run.nets)
    with gathered_emas(run.emas):
        emas = {n: e.state() for n, e in run.emas.items()}
    if eng.main:
        meta = {**state.to_meta(), "world_size": eng.world, "global_batch": run.global_batch, "reason": reason,
                "checkpoint_format": tc.checkpoint_format,
                "ema_steps": {n: steps for n, (_, steps) in emas.items()}, "family_state": run.family.state_dict(),
                "family": run.family.name, "data_info": to_dict(run.info), "config": to_dict(run.cfg)}
        shared = {"emas": {n: tensors for n, (tensors, _) in emas.items()}, "meta": meta, **engine_state}
        # the shards' write passed bound, not as an argument: the arguments are snapshotted, and it holds copies
        run.saver.submit(ckpt.step_dir(run.root, state.step), functools.partial(ckpt.commit, shards=shards),
                         run.root, state.step, tc.keep_checkpoints, shared, background=background)
    elif shards is not None:  # rank 0 renames the folder once its own write of them returns: all ranks' are flushed
        run.saver.submit(ckpt.step_dir(run.root, state.step), shards)
    eng.barrier()
    return ckpt.step_dir(run.root, state.step)


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
        if eng.deepspeed and meta["world_size"] != eng.world:  # before DeepSpeed refuses it as damage
            raise TrainingError(deepspeed_refusal(folder, list(run.trained), meta["world_size"], eng.world))
        try:
            data = ckpt.read(folder, meta, rank=eng.rank, emas={n: len(e.emas) for n, e in run.emas.items()},
                             family_rank=keeps_rank_state(run.family), **eng.files_to_read(run.trained, run.nets, meta))
            failed = None
        except Exception as e:  # noqa: BLE001 - raised below, once every rank knows
            failed = e
        # Every rank agrees before the engine's load, a collective (FSDP2's scatter, DCP's reads): one rank that
        # stopped here would leave the others waiting in it
        if dist.agreed(failed is not None):
            raise failed or CheckpointError(f"{folder}: does not load on another rank")
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

    latest, meta = ckpt.load_newest(run.root, load, main=eng.main, failed_anywhere=dist.agreed, set_aside_damaged=True,
                                    log=dist.print0)
    run.batch = plan_batch(cfg.train, eng.world, meta)
    if latest is None:
        return None, TrainState()
    state = TrainState.from_meta(meta)
    changed = model_changes(meta["config"], cfg)
    if changed:
        dist.print0(f"distgen: resuming with a changed config (--allow-config-change): {'; '.join(changed)}")
    said = state.resumed_with(run.batch, latest)  # another process count or batch, said in the log and meta.json
    if said:
        dist.print0(said)
    return latest, state


def keeps_rank_state(family: Family) -> bool:
    return type(family).rank_state is not Family.rank_state


def load_weights(module: torch.nn.Module, tensors: dict, path: Path) -> None:
    """load_state_dict with an error that names the file (a size mismatch means another model config)."""
    try:
        module.load_state_dict(tensors)
    except RuntimeError as e:
        raise ckpt.misfit(path, e) from None

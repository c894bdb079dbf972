"""Small pieces of the trainer checked against their definitions."""

from __future__ import annotations

import dataclasses
import random
import sys

import numpy as np
import pytest
import torch

from distgen import checkpoint as ckpt
from distgen.config import TrainConfig
from distgen.ema import EMASet, HalfLifeEMA
from distgen.loop_state import DataCursor, TrainState
from distgen.train import lr_factor


def test_lr_schedule():
    tc = TrainConfig(total_kimg=10, warmup_kimg=1, lr_decay="cosine")
    assert lr_factor(tc, 0) == pytest.approx(1 / 1000)
    assert lr_factor(tc, 499) == pytest.approx(0.5)
    assert lr_factor(tc, 1000) == pytest.approx(1.0)
    assert lr_factor(tc, 5500) == pytest.approx(0.5)
    assert lr_factor(tc, 10000) == pytest.approx(0.0, abs=1e-12)
    lin = TrainConfig(total_kimg=10, lr_decay="linear")
    assert lr_factor(lin, 2500) == pytest.approx(0.75)
    assert lr_factor(TrainConfig(), 123456) == 1.0


def test_ema_follows_edm_halflife_with_rampup():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = HalfLifeEMA([p], halflife_nimg=10_000, rampup=0.05)
    ema.batch = 100
    ema.cur_nimg = 1000  # ramp-up: half-life = min(10000, 0.05 * 1000) = 50 samples
    assert ema.get_decay(1) == pytest.approx(0.5 ** (100 / 50))
    ema.cur_nimg = 10 ** 7  # ramp-up over: the half-life itself
    assert ema.get_decay(1) == pytest.approx(0.5 ** (100 / 10_000))
    fixed = HalfLifeEMA([p], 1, None, fixed_decay=0.999)
    assert fixed.get_decay(5) == 0.999
    # After exactly one half-life of samples at a constant target, the EMA is half-way there.
    net = torch.nn.Linear(1, 1, bias=False)
    net.weight.data.fill_(0.0)
    s = EMASet(net, [1.0], rampup=None, fixed_decay=None)  # half-life 1000 samples
    net.weight.data.fill_(1.0)
    for i in range(10):  # 10 steps of 100 samples
        s.update(list(net.parameters()), (i + 1) * 100, 100)
    assert s.materialize(0).weight.item() == pytest.approx(0.5, rel=1e-6)


def test_rng_state_round_trip(tmp_path):
    torch.manual_seed(3)
    np.random.seed(4)
    random.seed(5)
    ckpt.save_rng(tmp_path, 0)
    want = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    assert ckpt.load_rng(tmp_path, 0)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2] == got[2]
    assert not ckpt.load_rng(tmp_path, 1)


def test_checkpoint_finalize_prunes_and_ignores_partial(tmp_path):
    for step in (10, 20, 30):
        t = ckpt.tmp_dir(tmp_path, step)
        t.mkdir()
        ckpt.write_meta(t, {"step": step})
        ckpt.finalize(tmp_path, step, keep=2)
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step-00000020", "step-00000030"]
    assert (tmp_path / "latest").read_text().strip() == "step-00000030"
    ckpt.tmp_dir(tmp_path, 40).mkdir()  # cut off before the rename: not a checkpoint at all
    (tmp_path / "step-00000050").mkdir()  # renamed by hand, no meta.json: a damaged checkpoint, reported
    said = []
    folder, meta = ckpt.load_newest(tmp_path, ckpt.read_meta, log=said.append)
    assert folder.name == "step-00000030" and meta["step"] == 30
    assert len(said) == 1 and "step-00000050/meta.json: missing" in said[0]
    assert [p.name for p in ckpt.checkpoint_folders(tmp_path)] == ["step-00000020", "step-00000030", "step-00000050"]


def test_state_files_refuse_pickled_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:  # unpickled, it creates the marker file
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"state": Evil()}, tmp_path / "optim-x.pt")
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        ckpt.load_state(tmp_path / "optim-x.pt")
    assert not marker.exists()
    torch.load(tmp_path / "optim-x.pt", weights_only=False)["state"].close()  # the payload does run when loaded
    assert marker.exists()


def test_train_state_round_trips_through_meta_json(tmp_path):
    state = TrainState(step=30, nimg=240, data_start_step=20, data_skip=7, interval={"denoise/loss": [1.5, 3]},
                       best={"metric": "fid", "value": 12.5, "step": 20})
    state.counters["overflow_total"] = 2
    ckpt.write_meta(tmp_path, {**state.to_meta(), "reason": "preempted"})
    back = TrainState.from_meta(ckpt.read_meta(tmp_path))
    assert back == dataclasses.replace(state, reason="preempted")
    assert not back.finished_at(30) and TrainState.from_meta({**state.to_meta(), "reason": "end"}).finished_at(30)
    back.advance(global_batch=8)
    assert (back.step, back.nimg) == (31, 248)


def test_data_cursor_restarted_or_resumed_gives_the_uninterrupted_batches(fm_test_shards):
    """The stream a periodic checkpoint restarts at step s is the one a run resumed from that checkpoint
    builds; one resumed from a mid-stream checkpoint skips the batches drawn and goes on as the first."""
    from distgen.config import DataConfig
    from distgen.data import make_loader

    cfg = DataConfig(resolution=28, workers=0, shuffle_buffer=50)
    make = lambda start: make_loader(str(fm_test_shards), cfg, batch_size=4, mode="train", seed=3,  # noqa: E731
                                     start_step=start)
    keys = lambda cursor, n: [k for _ in range(n) for k in cursor.next()["key"]]  # noqa: E731
    straight = DataCursor(make, 10)
    first = keys(straight, 3)
    straight.restart(10)  # a periodic checkpoint at step 10
    assert straight.position() == (10, 0)
    after = keys(straight, 5)
    assert straight.position() == (10, 5)
    assert keys(DataCursor(make, 10, start=10), 5) == after  # as a run resumed from that checkpoint draws them
    assert keys(DataCursor(make, 10), 5)[:12] == first and first != after[:12]  # another start, another stream
    resumed = DataCursor(make, 10, start=10, skip=2)  # a checkpoint taken 2 batches after the restart
    assert resumed.position() == (10, 2) and keys(resumed, 3) == after[8:]


class _Loader:
    """A stream of numbered batches from ``start``, as make_train_loader's for a data-stream restart."""

    skipped = 0

    def __init__(self, start: int):
        self.start = start

    def __iter__(self):
        return ({"n": self.start * 100 + i} for i in range(10 ** 6))


def test_the_data_cursor_alone_says_where_the_stream_restarts_and_what_a_checkpoint_records():
    """The rule both the loop (restart after a periodic checkpoint) and every checkpoint (the position it records)
    follow: a step that is a multiple of train.checkpoint_every with no non-finite streak is a boundary, where
    the straight run restarts its stream; a checkpoint there records (step, 0), any other the batches drawn."""
    cursor = DataCursor(_Loader, 4)
    for _ in range(3):
        cursor.next()
    assert [s for s in range(13) if cursor.due(s)] == [0, 4, 8, 12]
    assert cursor.boundary(8, nonfinite_run=0) and not cursor.boundary(8, nonfinite_run=2)
    assert not cursor.boundary(7, nonfinite_run=0)
    assert cursor.checkpoint_position(8, 0) == (8, 0)  # periodic, or the end / a signal at such a step
    assert cursor.checkpoint_position(7, 0) == (0, 3)  # mid-stream: the batches to draw again
    assert cursor.checkpoint_position(8, 1) == (0, 3)  # in a streak no periodic checkpoint, no restart
    # A run resumed from either position draws what the straight run draws next.
    cursor.restart(8)
    assert cursor.next() == DataCursor(_Loader, 4, start=8).next()
    mid = DataCursor(_Loader, 4, start=8, skip=1)
    assert mid.position() == (8, 1) and mid.next() == cursor.next()


def test_the_loop_and_the_checkpoint_writer_ask_the_cursor_for_the_boundary():
    """No second copy of the boundary rule in the loop (the one that drifted would break exact resume)."""
    from pathlib import Path

    import distgen.run_checkpoints
    import distgen.train

    src = "".join(Path(m.__file__).read_text() for m in (distgen.train, distgen.run_checkpoints))
    assert "% tc.checkpoint_every" not in src and 'nonfinite_run"] == 0' not in src
    assert "cursor.boundary(" in src and "cursor.checkpoint_position(" in src


def test_the_checkpoint_reader_names_the_file_a_folder_lacks(tmp_path):
    meta = {"world_size": 1, "ema_steps": {"net": [3]}}
    ckpt.write(tmp_path, weights={"net": {"w": torch.ones(2)}}, optimizers={"net": {"step": 1}}, scaler=None,
               emas={"net": [{"w": torch.zeros(2)}]}, meta=meta)
    ckpt.save_rng(tmp_path, 0)
    read = lambda: ckpt.read(tmp_path, meta, rank=0, weights=["net"], optimizers=["net"], deepspeed=[],  # noqa: E731
                             emas={"net": 1}, scaler=False)
    got = read()
    assert torch.equal(got.weights["net"]["w"], torch.ones(2)) and got.optimizers["net"] == {"step": 1}
    for name in ("ema0-net.safetensors", "optim-net.pt", "rng-0.safetensors"):
        moved = tmp_path / name
        moved.rename(tmp_path / "aside")
        with pytest.raises(ckpt.CheckpointError, match=f"^{moved}: missing from the checkpoint"):
            read()
        (tmp_path / "aside").rename(moved)


def test_print0_prints_on_rank_0_only_flushed(capsys, monkeypatch):
    from distgen import dist

    monkeypatch.setenv("RANK", "1")
    dist.print0("distgen: not here")
    monkeypatch.setenv("RANK", "0")
    dist.print0("distgen: here", end="")
    dist.print0("distgen: to stderr", file=sys.stderr)
    out = capsys.readouterr()
    assert (out.out, out.err) == ("distgen: here", "distgen: to stderr\n")


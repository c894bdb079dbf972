"""The streaming pipeline: exact evaluation splits, training streams, transforms, inputs."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from distgen.config import DataConfig
from distgen.data import DataError, Slice, make_loader, partition, resolve_shards
from distgen.data.reading import shuffle


def _keys(loader):
    return [k for b in loader for k in b["key"]]


@pytest.mark.parametrize("lengths,nparts", [([3000, 3000, 3000, 1000], 4), ([10], 4), ([3, 0, 5], 7), ([1], 3)])
def test_partition_covers_every_sample_once(lengths, nparts):
    slices = [Slice(f"s{i}", 0, n) for i, n in enumerate(lengths)]
    seen = Counter()
    sizes = []
    for p in range(nparts):
        part = partition(slices, p, nparts)
        sizes.append(sum(s.stop - s.start for s in part))
        for s in part:
            seen.update((s.url, j) for j in range(s.start, s.stop))
    assert sum(seen.values()) == sum(lengths) and max(seen.values()) == 1
    assert max(sizes) - min(sizes) <= 1  # balanced to one sample


def test_partition_nested_is_still_exact():
    slices = [Slice("a", 0, 7), Slice("b", 0, 4)]
    seen = Counter()
    for r in range(3):
        for w in range(2):
            for s in partition(partition(slices, r, 3), w, 2):
                seen.update((s.url, j) for j in range(s.start, s.stop))
    assert len(seen) == 11 and set(seen.values()) == {1}


@pytest.mark.parametrize("world,workers", [(1, 2), (2, 2), (3, 1), (5, 2)])
@pytest.mark.e2e
def test_eval_pass_is_exact_across_ranks_and_workers(fm_test_shards, world, workers):
    cfg = DataConfig(resolution=28, channels=1, workers=workers)
    all_keys, counts = [], []
    for rank in range(world):
        loader = make_loader(str(fm_test_shards), cfg, batch_size=512, mode="eval", rank=rank, world=world)
        keys = _keys(loader)
        assert loader.count == len(keys)
        counts.append(loader.count)
        all_keys += keys
    assert len(all_keys) == 10000 and len(set(all_keys)) == 10000
    assert max(counts) - min(counts) <= workers  # balanced across ranks


@pytest.mark.e2e
def test_eval_with_fewer_shards_than_workers_and_no_manifest(fm_test_shards, tmp_path):
    # A brace pattern gives no counts: whole shards are dealt out, still exact.
    pattern = str(fm_test_shards.parent / "test-{000000..000003}.tar")
    cfg = DataConfig(resolution=28, channels=1, workers=2)
    keys = []
    for rank in range(3):  # 3 ranks x 2 workers = 6 > 4 shards
        keys += _keys(make_loader(pattern, cfg, batch_size=256, mode="eval", rank=rank, world=3))
    assert len(keys) == 10000 and len(set(keys)) == 10000
    # One shard, 2 ranks x 2 workers, with a manifest: sample-level split.
    m = json.loads(fm_test_shards.read_text())
    m["shards"] = m["shards"][3:]
    m["total"] = 1000
    shutil.copy(fm_test_shards.parent / "test-000003.tar", tmp_path)
    (tmp_path / "one.json").write_text(json.dumps(m))
    keys = []
    for rank in range(2):
        keys += _keys(make_loader(str(tmp_path / "one.json"), cfg, batch_size=100, mode="eval", rank=rank, world=2))
    assert len(keys) == 1000 and len(set(keys)) == 1000


def test_pipe_urls_stream(fm_test_shards):
    shards = str(fm_test_shards.parent / "test-000003.tar")
    cfg = DataConfig(resolution=28, channels=1, workers=0)
    keys = _keys(make_loader([f"pipe:cat {shards}"], cfg, batch_size=300, mode="eval"))
    assert len(keys) == 1000 and keys[0] == "test_0009000"


def test_training_streams_differ_by_rank_and_resume_step_and_repeat_by_seed(fm_test_shards):
    cfg = DataConfig(resolution=28, channels=1, workers=0, shuffle_buffer=500)

    def first(rank=0, step=0, seed=0):
        loader = make_loader(str(fm_test_shards), cfg, batch_size=64, mode="train", rank=rank, world=2,
                             seed=seed, start_step=step)
        it = iter(loader)
        return [k for _ in range(3) for k in next(it)["key"]]

    a = first()
    assert a == first()  # deterministic
    assert len(set(a) & set(first(rank=1))) < 10
    assert len(set(a) & set(first(step=100))) < 10
    assert a != first(seed=1)


def test_training_is_infinite_and_shuffled(fm_test_shards, tmp_path):
    m = json.loads(fm_test_shards.read_text())
    m["shards"] = m["shards"][3:]  # 1000 samples
    m["total"] = 1000
    shutil.copy(fm_test_shards.parent / "test-000003.tar", tmp_path)
    (tmp_path / "small.json").write_text(json.dumps(m))
    cfg = DataConfig(resolution=28, channels=1, workers=1, shuffle_buffer=200)
    it = iter(make_loader(str(tmp_path / "small.json"), cfg, batch_size=500, mode="train"))
    keys = [k for _ in range(6) for k in next(it)["key"]]  # 3000 > 1000 samples
    assert len(keys) == 3000 and len(set(keys)) > 900
    assert keys[:20] != sorted(keys[:20])


def _pil(a, res, box=None, resample=Image.LANCZOS):
    """The reference: PIL's own crop and resample of one uint8 HxW array."""
    im = Image.fromarray(a)
    return np.asarray((im.crop(box) if box else im).resize((res, res), resample))


def test_resize_crop_and_flip(fm_test_shards, tmp_path):
    from distgen.data import write_shards

    m = json.loads(fm_test_shards.read_text())
    m["shards"], m["total"] = m["shards"][3:], 1000  # one shard, 1000 images
    shutil.copy(fm_test_shards.parent / "test-000003.tar", tmp_path)
    (tmp_path / "small.json").write_text(json.dumps(m))
    small = str(tmp_path / "small.json")
    cfg = DataConfig(resolution=28, channels=1, workers=0)
    stored = {k: x for b in make_loader(small, cfg, batch_size=1000, mode="eval", as_float=False)
              for k, x in zip(b["key"], b["image"])}  # 28 x 28 as stored: nothing resampled
    assert len(stored) == 1000
    fm = torch.stack([stored[k] for k in sorted(stored)[:5]])[:, 0].numpy()

    # Non-square images from real ones: 28 high x 43 wide (and the transpose), whose centre crop starts at
    # (43 - 28) // 2 = 7, rounding down the half pixel (a crop rounding up, or not centred, differs).
    wide = np.concatenate([fm[:4], fm[1:, :, :15]], axis=2)
    for name, x, box in (("wide", wide, (7, 0, 35, 28)), ("tall", wide.transpose(0, 2, 1).copy(), (0, 7, 28, 35))):
        np.savez(tmp_path / f"{name}.npz", x=x)
        write_shards(f"npz:{tmp_path / name}.npz", tmp_path / name, "test")

        def read(res, resize="center_crop"):
            cfg = DataConfig(resolution=res, channels=1, workers=0, resize=resize)
            b = next(iter(make_loader(str(tmp_path / name / "test.manifest.json"), cfg, batch_size=8, mode="eval",
                                      as_float=False)))
            assert b["image"].dtype == torch.uint8 and b["image"].shape == (4, 1, res, res)
            return b["image"][:, 0].numpy()

        # At the crop's own size nothing is resampled: the exact centre pixels.
        left, top, right, bottom = box
        assert np.array_equal(read(28), x[:, top:bottom, left:right])
        # Smaller (Lanczos, antialiased) and larger than the image (bicubic), as _to_resolution documents; on these
        # images the other filter gives other pixels, so a swapped filter fails.
        for res, filt, other in ((16, Image.LANCZOS, Image.BICUBIC), (64, Image.BICUBIC, Image.LANCZOS)):
            want = np.stack([_pil(a, res, box, filt) for a in x])
            assert np.array_equal(read(res), want)
            assert not np.array_equal(want, np.stack([_pil(a, res, box, other) for a in x]))
        # Stretch: the whole image, no crop.
        assert np.array_equal(read(16, "stretch"), np.stack([_pil(a, 16) for a in x]))
    # Square images resampled the same way, as floats in [-1, 1].
    b = next(iter(make_loader(small, DataConfig(resolution=16, channels=1, workers=0), batch_size=8, mode="eval")))
    assert b["image"].dtype == torch.float32 and b["label"].dtype == torch.long and b["label"].shape == (8,)
    want = torch.stack([torch.tensor(_pil(stored[k][0].numpy(), 16), dtype=torch.float64) for k in b["key"]])
    # x * (1 / 127.5) - 1 in float32: three roundings of relative size 2^-24 on values of at most 2: within 1e-6.
    assert (b["image"][:, 0].double() - (want / 127.5 - 1)).abs().max() < 1e-6

    # Flips: every image of a training stream is exactly the stored image or exactly its mirror, and never
    # mirrored without data.flip.
    kw = dict(batch_size=256, mode="train", seed=3, as_float=False)
    cfg = DataConfig(resolution=28, channels=1, workers=0, shuffle_buffer=100)
    plain = next(iter(make_loader(small, cfg, **kw)))
    assert all(torch.equal(x, stored[k]) for k, x in zip(plain["key"], plain["image"]))
    flip = next(iter(make_loader(small, dataclasses.replace(cfg, flip=True), **kw)))
    n = mirrored = same = 0
    for k, x in zip(flip["key"], flip["image"]):
        if torch.equal(stored[k], stored[k].flip(-1)):
            continue  # a symmetric image tells nothing
        n += 1
        same += torch.equal(x, stored[k])
        mirrored += torch.equal(x, stored[k].flip(-1))
    assert n >= 250 and same + mirrored == n  # nothing but the image or its exact mirror
    # Each image is mirrored with probability 1/2, independently: mirrored ~ Binomial(n, 1/2). Hoeffding:
    # P(|mirrored - n/2| >= t) <= 2 exp(-2 t^2 / n); t = sqrt(n ln(2e6) / 2) (about 2.7 sqrt(n), 43 for n = 256)
    # makes that at most 1e-6, so a correct flip fails this for at most one seed in a million, while a
    # flip with probability 1/4 or 3/4 (mean n/4 = 64 away from n/2, 3 standard deviations past t) fails it.
    assert abs(mirrored - n / 2) < math.sqrt(n * math.log(2e6) / 2), (mirrored, n)


def test_shuffle_keeps_every_item():
    out = list(shuffle(range(1000), 100, random.Random(0)))
    assert sorted(out) == list(range(1000)) and out != list(range(1000))


def test_resolve_shards_errors(tmp_path, fm_test_shards):
    with pytest.raises(DataError, match="no shards given"):
        resolve_shards([])
    with pytest.raises(DataError, match=r"missing-\{0..1\}|missing-0.tar: shard not found"):
        resolve_shards(str(tmp_path / "missing-{0..1}.tar"))
    m = json.loads(fm_test_shards.read_text())
    m["shards"][0]["name"] = "gone.tar"
    (tmp_path / "m.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"m.json: shard .*gone.tar is missing"):
        resolve_shards(str(tmp_path / "m.json"))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DataError, match="bad.json: not a distgen manifest"):
        resolve_shards(str(tmp_path / "bad.json"))
    s = resolve_shards(str(fm_test_shards))
    assert s.total == 10000 and len(s.urls) == 4


def test_channel_mismatch_with_config_is_refused(fm_test_shards):
    with pytest.raises(DataError, match="data.channels is 3 but the shards hold 1-channel"):
        make_loader(str(fm_test_shards), DataConfig(channels=3), batch_size=4, mode="eval")


@pytest.mark.e2e
def test_process_exits_with_live_workers_and_workers_survive_foreign_sigterm(fm_test_shards, env_with_repo):
    """Workers ignore a scheduler's SIGTERM but still end when their parent shuts down."""
    import subprocess
    import sys

    script = f"""
import os, signal, time
from distgen.config import DataConfig
from distgen.data import make_loader
loader = make_loader({str(fm_test_shards)!r}, DataConfig(resolution=28, workers=2), batch_size=8, mode="train")
it = iter(loader)
next(it)
import multiprocessing
workers = [p.pid for p in multiprocessing.active_children()]
import subprocess
for pid in workers:  # sent by another process (as slurmstepd would): ignored
    subprocess.run(["kill", "-TERM", str(pid)], check=True)
time.sleep(0.5)
next(it)  # still alive and serving
print("alive", len(workers))
"""  # the global iterator stays alive until interpreter exit
    r = subprocess.run([sys.executable, "-c", script], env=env_with_repo, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "alive 2" in r.stdout


def test_slices_read_the_same_samples_by_seek_by_learnt_index_and_through_a_pipe(fm_test_shards, tmp_path):
    from distgen.data.policy import ErrorPolicy
    from distgen.data.reading import _SAMPLE_POS, read_tar

    shard = str(fm_test_shards.parent / "test-000001.tar")
    whole = [s["__key__"] for s in read_tar([Slice(f"pipe:cat {shard}", 0, 3000)], ErrorPolicy())]
    assert len(whole) == 3000
    cuts = [(2999, 3000), (1234, 2000), (0, 17), (500, 501)]
    _SAMPLE_POS.clear()
    for a, b in cuts:  # the first read of each cut seeks through headers, later ones through the index
        for url in (shard, shard, f"pipe:cat {shard}"):
            got = [s["__key__"] for s in read_tar([Slice(url, a, b)], ErrorPolicy())]
            assert got == whole[a:b], (url, a, b)
    # A rewritten file at the same path is never read through the old positions.
    copy = tmp_path / "copy.tar"
    shutil.copy(fm_test_shards.parent / "test-000003.tar", copy)
    assert [s["__key__"] for s in read_tar([Slice(str(copy), 900, 1000)], ErrorPolicy())][0].endswith("9900")
    shutil.copy(shard, copy)
    assert [s["__key__"] for s in read_tar([Slice(str(copy), 900, 1000)], ErrorPolicy())] == whole[900:1000]

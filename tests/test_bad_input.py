"""Bad input: each kind stops with an error naming shard and key, or is skipped and counted."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from distgen.config import DataConfig
from distgen.data import DataError, make_loader, write_shards


def png(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


GOOD = np.full((8, 8), 200, np.uint8)


def write_tar(path, samples):
    with wds.TarWriter(str(path), encoder=False, mtime=0) as w:
        for s in samples:
            w.write(s)
    return str(path)


def good(i, label=True):
    s = {"__key__": f"k{i:03d}", "png": png(GOOD)}
    if label:
        s["cls"] = b"3"
    return s


def run(urls, workers=0, **cfg):
    cfg = DataConfig(**{"resolution": 8, "channels": 1, "workers": workers, **cfg})
    loader = make_loader(urls, cfg, batch_size=4, mode="eval")
    keys = [k for b in loader for k in b["key"]]
    return keys, loader


def manifest(tmp_path, tars, counts, size=(8, 8), channels=1, classes=10):
    m = {"format": "distgen-shards/1", "total": sum(counts), "image_size": list(size), "channels": channels,
         "num_classes": classes, "class_names": [str(i) for i in range(classes)],
         "shards": [{"name": t.split("/")[-1], "count": c} for t, c in zip(tars, counts)]}
    p = tmp_path / "m.manifest.json"
    p.write_text(json.dumps(m))
    return str(p)


@pytest.fixture
def bad_shards(tmp_path):
    """Five shards: one good, one each with a different bad sample, one truncated."""
    ok = write_tar(tmp_path / "ok.tar", [good(i) for i in range(6)])
    notimg = write_tar(tmp_path / "notimg.tar", [good(10), {"__key__": "k011", "png": b"not an image", "cls": b"1"}, good(12)])
    nolabel = write_tar(tmp_path / "nolabel.tar", [good(20), good(21, label=False)])
    big = write_tar(tmp_path / "size.tar", [{"__key__": "k030", "png": png(np.zeros((9, 8))), "cls": b"0"}, good(31)])
    rgb = write_tar(tmp_path / "rgb.tar", [{"__key__": "k040", "png": png(np.zeros((8, 8, 3))), "cls": b"0"}])
    full = open(ok, "rb").read()
    trunc = tmp_path / "trunc.tar"
    trunc.write_bytes(full[: len(full) // 2 + 100])
    return dict(ok=ok, notimg=notimg, nolabel=nolabel, size=big, rgb=rgb, trunc=str(trunc))


def test_not_an_image(bad_shards):
    with pytest.raises(DataError, match=r"shard .*notimg.tar, key k011: 'png' is not a decodable image"):
        run([bad_shards["notimg"]])


def test_missing_label_when_required(bad_shards):
    with pytest.raises(DataError, match=r"shard .*nolabel.tar, key k021: missing 'cls' label \(data.labels is true\)"):
        run([bad_shards["nolabel"]], labels=True)
    keys, _ = run([bad_shards["nolabel"]])  # labels optional: fine
    assert keys == ["k020", "k021"]


def test_wrong_size_against_manifest(tmp_path, bad_shards):
    m = manifest(tmp_path, [bad_shards["size"]], [2])
    with pytest.raises(DataError, match=r"shard .*size.tar, key k030: image is 9x8, expected 8x8 \(from the manifest\)"):
        run(m)


def test_wrong_channel_count(bad_shards):
    with pytest.raises(DataError, match=r"shard .*rgb.tar, key k040: image has 3 channel\(s\), expected 1"):
        run([bad_shards["rgb"]])


def test_truncated_tar(bad_shards):
    with pytest.raises(DataError, match=r"shard .*trunc.tar: corrupt, truncated or unreadable tar after key k00\d"):
        run([bad_shards["trunc"]])


def test_corrupt_tar_header(tmp_path, bad_shards):
    data = bytearray(open(bad_shards["ok"], "rb").read())
    data[2048 + 10] ^= 0xFF  # a byte inside the third member's header name
    p = tmp_path / "corrupt.tar"
    p.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"corrupt.tar: corrupt.*bad header checksum"):
        run([str(p)])


def test_manifest_count_larger_than_shard(tmp_path, bad_shards):
    m = manifest(tmp_path, [bad_shards["ok"]], [7])
    with pytest.raises(DataError, match=r"ok.tar: .*ended after 6 samples, expected at least 7"):
        run(m)


def test_empty_shard_list():
    with pytest.raises(DataError, match="no shards given"):
        run([])


def test_failing_pipe_command(tmp_path):
    with pytest.raises(DataError) as e:
        run(["pipe:cat /nonexistent.tar"])
    assert str(e.value) == ("shard pipe:cat /nonexistent.tar: the command `cat /nonexistent.tar` exited with "
                            "status 1 (cat: /nonexistent.tar: No such file or directory)")
    with pytest.raises(DataError, match=r"the command `kill -9 \$\$` was killed by SIGKILL"):
        run(["pipe:kill -9 $$"])


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_mode_counts_every_bad_input(bad_shards, workers, caplog):
    urls = [bad_shards[k] for k in ("ok", "notimg", "nolabel", "rgb", "trunc")]
    keys, loader = run(urls, workers=workers, labels=True, on_error="skip")
    # not-an-image 1, missing label 1, 3 channels 1, truncated shard 1
    assert loader.skipped == 4
    assert {"k011", "k021", "k040"}.isdisjoint(keys)
    assert {"k000", "k005", "k010", "k012", "k020"} <= set(keys)
    assert len(keys) == loader.count
    if workers == 0:
        assert sum("skipped bad input" in r.message for r in caplog.records) == 4


def test_skip_in_training_mode_reports_counts(tmp_path, bad_shards):
    cfg = DataConfig(resolution=8, channels=1, workers=0, on_error="skip", shuffle_buffer=2)
    loader = make_loader([bad_shards["notimg"]], cfg, batch_size=4, mode="train")
    it = iter(loader)
    for _ in range(5):
        next(it)
    assert loader.skipped >= 4  # one bad sample per pass over the shard


def test_write_shards_is_atomic_when_source_fails(tmp_path):
    np.savez(tmp_path / "ok.npz", x=np.zeros((3, 4, 4), np.uint8))
    write_shards(f"npz:{tmp_path / 'ok.npz'}", tmp_path / "o", "train")
    before = sorted(p.name for p in (tmp_path / "o").iterdir())
    with pytest.raises(DataError):
        write_shards(f"npz:{tmp_path / 'missing.npz'}", tmp_path / "o", "train")
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == before


def test_write_shards_failing_midway_keeps_the_previous_shards(tmp_path):
    from distgen.data.sources.base import Source

    np.savez(tmp_path / "ok.npz", x=np.zeros((3, 4, 4), np.uint8))
    write_shards(f"npz:{tmp_path / 'ok.npz'}", tmp_path / "o", "train", samples_per_shard=1)
    before = {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir()}

    def items():
        for i in range(5):
            if i == 3:
                raise DataError("source broke at item 3")
            yield np.full((4, 4), i, np.uint8), None

    with pytest.raises(DataError, match="item 3"):
        write_shards(Source("broken", 5, (), items, (4, 4), 1), tmp_path / "o", "train", samples_per_shard=1)
    assert {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir()} == before

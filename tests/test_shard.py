"""Sharding real data sets: counts, manifest, determinism, pixel and label round trip."""

from __future__ import annotations

import gzip
import hashlib
import json
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from distgen.config import DataConfig
from distgen.data import DataError, make_loader, write_shards
from distgen.data.sources.fashion_mnist import FASHION_MNIST_DIR, _read_idx
from pathlib import Path


def _idx(name):
    return _read_idx(Path(FASHION_MNIST_DIR) / name, "test")


def _eval_all(manifest, **cfg):
    cfg = DataConfig(**{"resolution": 28, "channels": 1, "workers": 0, **cfg})
    loader = make_loader(str(manifest), cfg, batch_size=1000, mode="eval")
    images, labels, keys = [], [], []
    for b in loader:
        images.append(b["image"])
        labels.append(b.get("label"))
        keys += b["key"]
    return images, labels, keys, loader


@pytest.mark.e2e
def test_train_split_manifest_total_is_60000(tmp_path):
    m = write_shards("fashion-mnist", tmp_path, "train", samples_per_shard=25000)
    assert m["total"] == 60000
    assert [s["count"] for s in m["shards"]] == [25000, 25000, 10000]
    on_disk = json.loads((tmp_path / "train.manifest.json").read_text())
    assert on_disk == m
    assert on_disk["image_size"] == [28, 28] and on_disk["channels"] == 1
    assert on_disk["num_classes"] == 10 and on_disk["class_names"][9] == "Ankle boot"
    for s in on_disk["shards"]:
        path = tmp_path / s["name"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == s["sha256"]
        with tarfile.open(path) as tf:
            names = tf.getnames()
        assert len(names) == 2 * s["count"]  # png + cls per sample
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "train-000000.tar", "train-000001.tar", "train-000002.tar", "train.manifest.json"]


@pytest.mark.e2e
def test_sharding_is_byte_identical(tmp_path, fm_test_shards):
    write_shards("fashion-mnist", tmp_path, "test", samples_per_shard=3000)
    for name in ["test-000000.tar", "test-000003.tar", "test.manifest.json"]:
        assert (tmp_path / name).read_bytes() == (fm_test_shards.parent / name).read_bytes(), name


def test_round_trip_pixels_and_labels(fm_test_shards):
    images, labels, keys, loader = _eval_all(fm_test_shards)
    x = np.concatenate([i.numpy() for i in images])
    y = np.concatenate([l.numpy() for l in labels])
    assert loader.count == 10000 and len(keys) == 10000
    order = np.argsort(keys)  # keys are test_<index>
    want_x = _idx("t10k-images-idx3-ubyte.gz")
    want_y = _idx("t10k-labels-idx1-ubyte.gz")
    assert keys[order[123]] == "test_0000123"
    got = np.rint((x[order, 0] + 1) * 127.5).astype(np.uint8)
    np.testing.assert_array_equal(got, want_x)
    np.testing.assert_array_equal(y[order], want_y)
    assert x.min() == -1.0 and x.max() == 1.0


def _cifar_batch(n, seed):
    rng = np.random.default_rng(seed)
    return {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}


def _write_cifar(root: Path):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for i in range(1, 6):
        (d / f"data_batch_{i}").write_bytes(pickle.dumps(_cifar_batch(4, i)))
    (d / "test_batch").write_bytes(pickle.dumps(_cifar_batch(3, 9)))
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    return d


@pytest.mark.parametrize("as_archive", [False, True])
def test_cifar10_folder_and_archive(tmp_path, as_archive):
    d = _write_cifar(tmp_path / "src")
    src = d
    if as_archive:
        src = tmp_path / "cifar-10-python.tar.gz"
        with tarfile.open(src, "w:gz") as tf:
            tf.add(d, arcname="cifar-10-batches-py")
    m = write_shards(f"cifar10:{src}", tmp_path / "out", "train", samples_per_shard=7)
    assert m["total"] == 20 and [s["count"] for s in m["shards"]] == [7, 7, 6]
    assert m["channels"] == 3 and m["image_size"] == [32, 32] and m["class_names"][3] == "c3"
    images, labels, keys, _ = _eval_all(tmp_path / "out" / "train.manifest.json", resolution=32, channels=3)
    x = np.concatenate([i.numpy() for i in images])[np.argsort(keys)]
    first = _cifar_batch(4, 1)
    want = first[b"data"].reshape(-1, 3, 32, 32)
    np.testing.assert_array_equal(np.rint((x[:4] + 1) * 127.5).astype(np.uint8), want)
    y = np.concatenate([l.numpy() for l in labels])[np.argsort(keys)]
    assert list(y[:4]) == [int(v) for v in first[b"labels"]]


def test_cifar10_refuses_code_in_pickles(tmp_path):
    d = _write_cifar(tmp_path / "src")

    marker = tmp_path / "pwned"

    class Evil:  # unpickled, it creates the marker file
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (d / "data_batch_2").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(DataError, match=r"data_batch_2.*refusing to load io.open"):
        write_shards(f"cifar10:{d}", tmp_path / "out", "train")
    assert not marker.exists()
    pickle.loads((d / "data_batch_2").read_bytes())[b"data"].close()  # the payload does run when unpickled
    assert marker.exists()


def test_folder_with_classes_and_flat(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ["cats", "dogs"]:
        (tmp_path / "cls" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "cls" / cls / f"{i}.png")
    m = write_shards(f"folder:{tmp_path / 'cls'}", tmp_path / "o1", "train")
    assert m["total"] == 6 and m["class_names"] == ["cats", "dogs"] and m["channels"] == 3
    _, labels, keys, _ = _eval_all(tmp_path / "o1" / "train.manifest.json", resolution=16, channels=3)
    assert sorted(np.concatenate([l.numpy() for l in labels]).tolist()) == [0, 0, 0, 1, 1, 1]

    (tmp_path / "flat").mkdir()
    for i, size in enumerate([(20, 30), (30, 20)]):
        Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(tmp_path / "flat" / f"{i}.png")
    m = write_shards(f"folder:{tmp_path / 'flat'}", tmp_path / "o2", "train")
    assert m["total"] == 2 and m["num_classes"] == 0 and m["image_size"] is None and m["channels"] == 1
    images, labels, _, _ = _eval_all(tmp_path / "o2" / "train.manifest.json", resolution=8)
    assert images[0].shape == (2, 1, 8, 8) and labels == [None]


def test_npz_nhw_and_nhwc(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", x=x, y=np.array([0, 1, 2, 1, 0]))
    m = write_shards(f"npz:{tmp_path / 'a.npz'}", tmp_path / "o", "train")
    assert m["total"] == 5 and m["num_classes"] == 3 and m["channels"] == 3
    images, _, keys, _ = _eval_all(tmp_path / "o" / "train.manifest.json", resolution=8, channels=3)
    got = np.rint((images[0].numpy()[np.argsort(keys)] + 1) * 127.5).astype(np.uint8)
    np.testing.assert_array_equal(got, x.transpose(0, 3, 1, 2))
    np.savez(tmp_path / "b.npz", x=x[..., 0])
    m = write_shards(f"npz:{tmp_path / 'b.npz'}", tmp_path / "o2", "train")
    assert m["channels"] == 1 and m["num_classes"] == 0


@pytest.mark.parametrize("spec,match", [
    ("nope:x", "unknown source"),
    ("fashion-mnist:/nonexistent", r"/nonexistent/t10k-images-idx3-ubyte.gz: not found"),
    ("npz:/nonexistent.npz", r"/nonexistent.npz: not found"),
    ("cifar10:", "cifar10 needs a path"),
])
def test_bad_sources_name_the_problem(tmp_path, spec, match):
    with pytest.raises(DataError, match=match):
        write_shards(spec, tmp_path, "test")


def test_bad_npz_and_idx(tmp_path):
    np.savez(tmp_path / "f.npz", x=np.zeros((2, 4, 4), np.float32))
    with pytest.raises(DataError, match=r"f.npz: 'x' must be uint8"):
        write_shards(f"npz:{tmp_path / 'f.npz'}", tmp_path / "o", "train")
    d = tmp_path / "fm"
    d.mkdir()
    with gzip.open(d / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x03\x00\x00\x00\x02")  # claims 3 dims, truncated
    with gzip.open(d / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x01\x00\x00\x00\x00")
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz: not a valid idx image file"):
        write_shards(f"fashion-mnist:{d}", tmp_path / "o", "test")

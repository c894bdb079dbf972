"""Image-to-image translation data: paired and domain shards, their sources, decoding and the unpaired stream."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from distgen.cli import main as cli_main
from distgen.config import DataConfig
from distgen.data import (
    DataError, Loader, UnpairedLoader, make_loader, make_train_loader, read_layout, resolve_shards, shard_source,
    write_shards,
)
from distgen.data.decode import random_flip
from distgen.data.sources.base import Source
from distgen.data.sources.fashion_mnist import FASHION_MNIST_DIR, _read_idx, edge_map

RNG = np.random.default_rng(0)


def save(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, np.uint8)).save(path)
    return path


def png(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(arr, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def cfg(**kw) -> DataConfig:
    return DataConfig(**{"resolution": 8, "channels": 1, "workers": 0, **kw})


def eval_batches(inputs, **kw) -> tuple[list[dict], Loader]:
    loader = make_loader(inputs, cfg(**kw), batch_size=4, mode="eval", as_float=False)
    return list(loader), loader


def cat(batches, key):
    return np.concatenate([b[key].numpy() for b in batches])


def keys(batches, name="key"):
    return [k for b in batches for k in b[name]]


@pytest.fixture(scope="module")
def fm_small(tmp_path_factory) -> Path:
    """The first 600 Fashion-MNIST test images (real data, fewer of them) as an idx folder: fashion-mnist:DIR."""
    d = tmp_path_factory.mktemp("fm_small")
    x = _read_idx(Path(FASHION_MNIST_DIR) / "t10k-images-idx3-ubyte.gz", "image")[:600]
    y = _read_idx(Path(FASHION_MNIST_DIR) / "t10k-labels-idx1-ubyte.gz", "label")[:600]
    (d / "t10k-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, *x.shape) + x.tobytes())
    (d / "t10k-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, len(y)) + y.tobytes())
    return d


# --------------------------------------------------------------------------- sources and layouts
def test_pix2pix_side_by_side_images_become_paired_shards(tmp_path):
    root = tmp_path / "facades"
    pairs = [RNG.integers(0, 256, (8, 16, 3), dtype=np.uint8) for _ in range(5)]
    for i, img in enumerate(pairs):
        save(root / "val" / f"{i}.png", img)
    save(root / "train" / "0.jpg", pairs[0])  # pix2pix's own sets are jpg
    ms = shard_source(f"pix2pix:{root}", tmp_path / "out", "val", samples_per_shard=2)
    assert len(ms) == 1
    m = ms[0]
    assert (m["layout"], m["split"], m["total"], m["image_size"], m["channels"], m["task"]) == \
        ("paired", "val", 5, [8, 8], 3, "facades")
    assert [s["count"] for s in m["shards"]] == [2, 2, 1]
    assert json.loads((tmp_path / "out" / "val.manifest.json").read_text()) == m
    batches, loader = eval_batches(str(tmp_path / "out" / "val.manifest.json"), channels=3)
    order = np.argsort(keys(batches))
    a, b = cat(batches, "a")[order], cat(batches, "b")[order]
    want = np.stack(pairs).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(a, want[:, :, :, :8])  # A: the left half
    np.testing.assert_array_equal(b, want[:, :, :, 8:])  # B: the right half
    assert "image" not in batches[0] and "label" not in batches[0] and loader.count == 5
    assert write_shards(f"pix2pix:{root}", tmp_path / "out", "train")["total"] == 1


def test_pix2pix_refuses_odd_widths_mixed_kinds_and_missing_splits(tmp_path):
    root = tmp_path / "p"
    save(root / "train" / "a.png", RNG.integers(0, 256, (8, 16), dtype=np.uint8))
    save(root / "train" / "b.png", RNG.integers(0, 256, (8, 15), dtype=np.uint8))
    with pytest.raises(DataError, match=r"p/train/b.png: 15 pixels wide, an odd width"):
        shard_source(f"pix2pix:{root}", tmp_path / "out", "train")
    save(root / "train" / "b.png", RNG.integers(0, 256, (8, 16, 3), dtype=np.uint8))
    with pytest.raises(DataError, match=r"p/train: images mix grey and colour"):
        shard_source(f"pix2pix:{root}", tmp_path / "out", "train")
    with pytest.raises(DataError, match=r"p/test: not a directory"):
        shard_source(f"pix2pix:{root}", tmp_path / "out", "test")
    assert not (tmp_path / "out").exists()


def test_a_paired_source_with_grey_a_and_colour_b_is_refused(tmp_path):
    def items():
        yield (np.zeros((4, 4), np.uint8), np.zeros((4, 4, 3), np.uint8)), None

    src = Source("pairs.npz", 1, (), items, (4, 4), 3, labelled=False, layout="paired")
    with pytest.raises(DataError, match=r"pairs.npz: sample 0: 'a' is 4x4x1 but 'b' is 4x4x3"):
        write_shards(src, tmp_path / "out", "train")
    assert not (tmp_path / "out" / "train.manifest.json").exists()


def _cyclegan_tree(root: Path) -> dict[str, list[np.ndarray]]:
    """trainA: 3 colour images; trainB: 2 colour and one grey (as horse2zebra has); testA/testB: 2 each."""
    made = {}
    for folder, n in (("trainA", 3), ("trainB", 3), ("testA", 2), ("testB", 2)):
        made[folder] = [RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(n)]
        for i, img in enumerate(made[folder]):
            save(root / folder / f"{i:02d}.png", img)
    grey = RNG.integers(0, 256, (8, 8), dtype=np.uint8)
    save(root / "trainB" / "99.png", grey)
    made["trainB"].append(np.repeat(grey[:, :, None], 3, 2))
    return made


def test_cyclegan_folders_become_two_domain_splits(tmp_path, capsys):
    root = tmp_path / "horse2zebra"
    made = _cyclegan_tree(root)
    out = tmp_path / "out"
    assert cli_main(["data", "shard", f"cyclegan:{root}", str(out), "--samples-per-shard", "3"]) == 0
    printed = capsys.readouterr().out
    assert f"3 samples in 1 shard(s), 8x8x3, 0 classes, domain A -> {out / 'trainA.manifest.json'}" in printed
    assert f"4 samples in 2 shard(s), 8x8x3, 0 classes, domain B -> {out / 'trainB.manifest.json'}" in printed
    assert sorted(p.name for p in out.iterdir()) == [
        "trainA-000000.tar", "trainA.manifest.json", "trainB-000000.tar", "trainB-000001.tar", "trainB.manifest.json"]
    for dom, n in (("A", 3), ("B", 4)):
        m = json.loads((out / f"train{dom}.manifest.json").read_text())
        assert (m["layout"], m["domain"], m["task"], m["split"], m["total"], m["channels"]) == \
            ("domain", dom, "horse2zebra", f"train{dom}", n, 3)
        batches, _ = eval_batches(str(out / f"train{dom}.manifest.json"), channels=3)
        images = cat(batches, "image")[np.argsort(keys(batches))]
        # the grey photo of trainB comes back as RGB: CycleGAN's loader reads its sets that way
        np.testing.assert_array_equal(images, np.stack(made[f"train{dom}"]).transpose(0, 3, 1, 2))
        assert all(k.startswith(f"train{dom}_") for k in keys(batches))
    ms = shard_source(f"cyclegan:{root}", out, "test")
    assert [(m["split"], m["domain"], m["total"]) for m in ms] == [("testA", "A", 2), ("testB", "B", 2)]


def test_cyclegan_empty_or_missing_domain_folder_is_named_and_nothing_written(tmp_path):
    root = tmp_path / "c"
    _cyclegan_tree(root)
    for p in (root / "trainB").iterdir():
        p.unlink()
    with pytest.raises(DataError, match=r"c/trainB: no images found \(domain B"):
        shard_source(f"cyclegan:{root}", tmp_path / "out", "train")
    assert not (tmp_path / "out").exists()  # domain A is not written either
    with pytest.raises(DataError, match=r"c/valA: domain A folder not found"):
        shard_source(f"cyclegan:{root}", tmp_path / "out", "val")
    assert cli_main(["data", "shard", f"cyclegan:{root}", str(tmp_path / "out"), "--domain", "A"]) == 2


def test_any_source_with_domain_becomes_a_domain_split(tmp_path, capsys):
    imgs = [RNG.integers(0, 256, (8, 8), dtype=np.uint8) for _ in range(3)]
    for i, img in enumerate(imgs):
        save(tmp_path / "zebras" / f"{i}.png", img)
    out = tmp_path / "out"
    assert cli_main(["data", "shard", f"folder:{tmp_path / 'zebras'}", str(out), "--split", "test", "--domain",
                     "B"]) == 0
    assert f"3 samples in 1 shard(s), 8x8x1, 0 classes, domain B -> {out / 'testB.manifest.json'}" in \
        capsys.readouterr().out
    m = json.loads((out / "testB.manifest.json").read_text())
    assert (m["layout"], m["domain"], m["split"]) == ("domain", "B", "testB") and "task" in m
    meta = read_layout(str(out / "testB.manifest.json"))
    assert (meta["layout"], meta["domain"]) == ("domain", "B")
    batches, _ = eval_batches(str(out / "testB.manifest.json"))
    np.testing.assert_array_equal(cat(batches, "image")[:, 0], np.stack(imgs))
    # shards without a manifest, and old manifests without a layout, are image shards
    assert read_layout(str(out / "testB-000000.tar"))["layout"] == "images"
    write_shards(f"folder:{tmp_path / 'zebras'}", out, "plain")
    assert read_layout(str(out / "plain.manifest.json"))["layout"] == "images"


# --------------------------------------------------------------------------- Fashion-MNIST tasks
def test_fashion_mnist_edges_are_deterministic_line_drawings(tmp_path, fm_small, capsys):
    for run in ("one", "two"):
        assert cli_main(["data", "shard", f"fashion-mnist:{fm_small}:edges", str(tmp_path / run), "--split", "test",
                         "--samples-per-shard", "250"]) == 0
    assert f"600 samples in 3 shard(s), 28x28x1, 10 classes, paired -> {tmp_path / 'one' / 'test.manifest.json'}" \
        in capsys.readouterr().out
    for name in ("test-000000.tar", "test-000002.tar", "test.manifest.json"):
        one, two = (tmp_path / r / name for r in ("one", "two"))
        assert hashlib.sha256(one.read_bytes()).hexdigest() == hashlib.sha256(two.read_bytes()).hexdigest(), name
    m = json.loads((tmp_path / "one" / "test.manifest.json").read_text())
    assert (m["layout"], m["task"], m["image_size"], m["channels"]) == \
        ("paired", "Fashion-MNIST edges -> images", [28, 28], 1)

    batches, loader = eval_batches(str(tmp_path / "one" / "test.manifest.json"), resolution=28)
    assert batches[0]["a"].shape == batches[0]["b"].shape == (4, 1, 28, 28) and loader.count == 600
    order = np.argsort(keys(batches))
    a, b, y = cat(batches, "a")[order, 0], cat(batches, "b")[order, 0], cat(batches, "label")[order]
    x = _read_idx(fm_small / "t10k-images-idx3-ubyte", "image")
    np.testing.assert_array_equal(b, x)  # B: the image itself
    np.testing.assert_array_equal(y, _read_idx(fm_small / "t10k-labels-idx1-ubyte", "label"))
    np.testing.assert_array_equal(a, edge_map(x))
    # A: a line drawing, dark lines on white, not the image
    assert set(np.unique(a)) == {0, 255}
    assert 0.03 < (a == 0).mean() < 0.3
    assert (a[:, 0, 0] == 255).mean() > 0.9  # the background is white
    assert not np.array_equal(a, b)
    # lines lie where the image changes: around the silhouette, not in the empty background
    near_object = np.zeros_like(x, bool)
    for dy, dx in itertools.product((-2, -1, 0, 1, 2), repeat=2):
        near_object |= np.roll(x > 0, (dy, dx), axis=(1, 2))
    assert ((a == 0) & ~near_object).sum() == 0


def test_fashion_mnist_classes_make_one_domain_per_class(tmp_path, fm_small, capsys):
    out = tmp_path / "out"
    labels = _read_idx(fm_small / "t10k-labels-idx1-ubyte", "label")
    # "T-shirt/top" holds a slash itself; names are matched in any case
    assert cli_main(["data", "shard", f"fashion-mnist:{fm_small}:classes=t-shirt/TOP/Ankle boot", str(out), "--split",
                     "test"]) == 0
    printed = capsys.readouterr().out
    assert "domain A (T-shirt/top) -> " in printed and "domain B (Ankle boot) -> " in printed
    for dom, c in (("A", 0), ("B", 9)):
        m = json.loads((out / f"test{dom}.manifest.json").read_text())
        assert m["source_class"] == {"index": c, "name": ["T-shirt/top", "Ankle boot"][dom == "B"]}
        assert (m["layout"], m["domain"], m["task"]) == ("domain", dom, "Fashion-MNIST T-shirt/top <-> Ankle boot")
        assert m["total"] == int((labels == c).sum()) > 0
        batches, _ = eval_batches(str(out / f"test{dom}.manifest.json"), resolution=28)
        assert set(cat(batches, "label").tolist()) == {c}  # domain A holds only class A
    ms = shard_source(f"fashion-mnist:{fm_small}:classes=7/5", out, "test")  # indices work too
    assert [m["source_class"]["name"] for m in ms] == ["Sneaker", "Sandal"]


@pytest.mark.parametrize("classes,match", [
    ("Sneaker/Boot", r"unknown Fashion-MNIST class 'Boot'; the classes are 0 'T-shirt/top', .* 9 'Ankle boot'"),
    ("Sneaker", r"takes two Fashion-MNIST classes NAME_A/NAME_B"),
    ("Bag/Bag", r"domains A and B are both class 'Bag'"),
    ("1/2/3", r"takes two Fashion-MNIST classes"),
])
def test_fashion_mnist_bad_class_names_are_refused(tmp_path, fm_small, classes, match):
    with pytest.raises(DataError, match=match):
        shard_source(f"fashion-mnist:{fm_small}:classes={classes}", tmp_path, "test")
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- bad paired samples
def _paired_shard(tmp_path, name, samples, size=(8, 8)):
    tar = tmp_path / f"{name}.tar"
    with wds.TarWriter(str(tar), encoder=False, mtime=0) as w:
        for s in samples:
            w.write(s)
    m = {"format": "distgen-shards/1", "layout": "paired", "total": len(samples), "image_size": list(size),
         "channels": 1, "num_classes": 0, "class_names": [], "shards": [{"name": tar.name, "count": len(samples)}]}
    path = tmp_path / f"{name}.manifest.json"
    path.write_text(json.dumps(m))
    return str(path)


def _pair(i, a_shape=(8, 8), b_shape=(8, 8), sides="ab"):
    s = {"__key__": f"k{i:03d}"}
    for side, shape in zip("ab", (a_shape, b_shape)):
        if side in sides:
            s[f"{side}.png"] = png(np.full(shape, 10 * i, np.uint8))
    return s


@pytest.mark.parametrize("bad,match", [
    (_pair(2, sides="a"), r"shard .*bad.tar, key k002: paired sample has no 'b' image"),
    (_pair(2, sides="b"), r"shard .*bad.tar, key k002: paired sample has no 'a' image"),
    (_pair(2, b_shape=(9, 8)), r"shard .*bad.tar, key k002: 'a' is 8x8 but 'b' is 9x8"),
    (_pair(2, a_shape=(9, 8), b_shape=(9, 8)), r"shard .*bad.tar, key k002: 'a' image is 9x8, expected 8x8"),
    ({"__key__": "k002", "a.png": b"junk", "b.png": png(np.zeros((8, 8)))},
     r"shard .*bad.tar, key k002: 'a.png' is not a decodable image"),
])
def test_bad_pairs_are_named_or_skipped_and_counted(tmp_path, bad, match):
    manifest = _paired_shard(tmp_path, "bad", [_pair(0), _pair(1), bad, _pair(3), _pair(4)])
    with pytest.raises(DataError, match=match):
        eval_batches(manifest)
    batches, loader = eval_batches(manifest, on_error="skip")
    assert keys(batches) == ["k000", "k001", "k003", "k004"]
    assert loader.skipped == 1 and loader.count == 4
    np.testing.assert_array_equal(cat(batches, "a")[:, 0, 0, 0], [0, 10, 30, 40])


def test_paired_shards_without_their_manifest_say_so(tmp_path):
    _paired_shard(tmp_path, "p", [_pair(0)])
    with pytest.raises(DataError, match=r"key k000: no image member .*a paired sample .*layout paired"):
        eval_batches(str(tmp_path / "p.tar"))


def test_a_list_of_shards_holds_one_layout(tmp_path):
    paired = _paired_shard(tmp_path, "p", [_pair(0)])
    save(tmp_path / "imgs" / "0.png", np.zeros((8, 8)))
    write_shards(f"folder:{tmp_path / 'imgs'}", tmp_path, "plain")
    with pytest.raises(DataError, match=r"plain.manifest.json: images shards, but .*p.manifest.json holds paired"):
        resolve_shards([paired, str(tmp_path / "plain.manifest.json")])


# --------------------------------------------------------------------------- flips
def test_random_flip_flips_both_images_of_a_pair_together():
    base = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    samples = [{"key": str(i), "a": base, "b": base + 100} for i in range(64)]
    out = list(random_flip(samples, random.Random(0)))
    flipped = [not np.array_equal(s["a"], base) for s in out]
    assert 10 < sum(flipped) < 54
    for s, f in zip(out, flipped):
        np.testing.assert_array_equal(s["a"], base[:, :, ::-1] if f else base)
        np.testing.assert_array_equal(s["b"], s["a"] + 100)


def test_training_flips_keep_pairs_aligned(tmp_path):
    # b = 255 - a, asymmetric left to right: a flip of one side only would break b == 255 - a
    samples = []
    for i in range(12):
        a = RNG.integers(0, 256, (8, 8), dtype=np.uint8)
        samples.append({"__key__": f"k{i:03d}", "a.png": png(a), "b.png": png(255 - a)})
    manifest = _paired_shard(tmp_path, "flip", samples)
    loader = make_loader(manifest, cfg(flip=True, shuffle_buffer=4), batch_size=6, mode="train", as_float=False)
    stored = {s["__key__"]: np.asarray(Image.open(io.BytesIO(s["a.png"]))) for s in samples}
    flips = []
    for batch in itertools.islice(loader, 8):
        a, b = batch["a"].numpy()[:, 0], batch["b"].numpy()[:, 0]
        np.testing.assert_array_equal(b, 255 - a)
        for k, img in zip(batch["key"], a):
            flips.append(not np.array_equal(img, stored[k]))
            assert np.array_equal(img, stored[k][:, ::-1] if flips[-1] else stored[k])
    assert 0 < sum(flips) < len(flips)


# --------------------------------------------------------------------------- unpaired training
@pytest.fixture(scope="module")
def domains(tmp_path_factory, fm_small):
    """Domain shards of Sneaker (A) and Ankle boot (B) from the small Fashion-MNIST set, 20 per shard."""
    out = tmp_path_factory.mktemp("domains")
    shard_source(f"fashion-mnist:{fm_small}:classes=Sneaker/Ankle boot", out, "test", samples_per_shard=20)
    return out


def _unpaired(domains, n=4, seed=0, rank=0, world=1, start_step=0, **kw):
    c = cfg(train=(str(domains / "testA.manifest.json"),), train_b=(str(domains / "testB.manifest.json"),),
            resolution=28, shuffle_buffer=50, flip=True, **kw)
    loader = make_train_loader(c, batch_size=8, seed=seed, rank=rank, world=world, start_step=start_step)
    return list(itertools.islice(loader, n)), loader


def test_unpaired_loader_reads_two_streams(domains):
    batches, loader = _unpaired(domains)
    assert isinstance(loader, UnpairedLoader)
    for b in batches:
        assert set(b) == {"a", "b", "key_a", "key_b", "index_a", "index_b", "label_a", "label_b"}
        assert b["a"].shape == b["b"].shape == (8, 1, 28, 28) and b["a"].dtype == b["b"].dtype
        assert -1 <= float(b["a"].min()) and float(b["a"].max()) <= 1 and b["a"].is_floating_point()
        assert all(k.startswith("testA_") for k in b["key_a"]) and all(k.startswith("testB_") for k in b["key_b"])
        assert set(b["label_a"].tolist()) == {7} and set(b["label_b"].tolist()) == {9}
    assert loader.count == 32 and loader.skipped == 0


def test_unpaired_loader_is_deterministic_and_seeded_per_stream(domains):
    def trace(**kw):
        batches, _ = _unpaired(domains, **kw)
        return keys(batches, "key_a"), keys(batches, "key_b"), np.concatenate([b["a"].numpy() for b in batches])

    first = trace()
    again = trace()
    assert first[:2] == again[:2]
    np.testing.assert_array_equal(first[2], again[2])  # flips too
    for other in (dict(seed=1), dict(rank=1, world=2), dict(start_step=5)):
        assert trace(**other)[:2] != first[:2], other
    assert trace(workers=2)[:2] == trace(workers=2)[:2]  # across worker processes too


def test_the_two_streams_never_share_a_random_stream(domains, fm_small, tmp_path):
    # the same shards as both domains: their own seeds still give two different sequences
    same = str(domains / "testA.manifest.json")
    c = cfg(train=(same,), train_b=(same,), resolution=28, shuffle_buffer=50)
    with pytest.raises(DataError, match=r"testA.manifest.json: data.train_b should hold domain B"):
        make_train_loader(c, batch_size=8)
    plain = tmp_path / "plain"
    write_shards(f"fashion-mnist:{fm_small}", plain, "test", samples_per_shard=150)
    c = cfg(train=(str(plain / "test.manifest.json"),), train_b=(str(plain / "test.manifest.json"),), resolution=28)
    batches = list(itertools.islice(make_train_loader(c, batch_size=8), 3))
    assert keys(batches, "key_a") != keys(batches, "key_b")
    # and neither is the single stream make_loader gives for the same seed
    single = list(itertools.islice(make_train_loader(cfg(train=c.train, resolution=28), batch_size=8), 3))
    assert keys(single) not in (keys(batches, "key_a"), keys(batches, "key_b"))


def test_without_train_b_the_train_loader_is_the_usual_one(domains, tmp_path):
    loader = make_train_loader(cfg(train=(str(domains / "testB.manifest.json"),), resolution=28), batch_size=8)
    assert isinstance(loader, Loader) and next(iter(loader))["image"].shape == (8, 1, 28, 28)
    paired = _paired_shard(tmp_path, "p", [_pair(i) for i in range(4)])
    assert set(next(iter(make_train_loader(cfg(train=(paired,)), batch_size=2)))) >= {"a", "b", "key"}


def test_inconsistent_domains_are_refused_naming_the_manifest(domains, tmp_path):
    a, b = str(domains / "testA.manifest.json"), str(domains / "testB.manifest.json")
    with pytest.raises(DataError, match=r"testB.manifest.json: data.train should hold domain A, but its manifest "
                                        r"says domain B"):
        make_train_loader(cfg(train=(b,), train_b=(b,), resolution=28), batch_size=8)
    paired = _paired_shard(tmp_path, "p", [_pair(0)])
    with pytest.raises(DataError, match=r"p.manifest.json: data.train holds paired shards"):
        make_train_loader(cfg(train=(paired,), train_b=(b,)), batch_size=8)
    root = tmp_path / "rgb"
    _cyclegan_tree(root)
    shard_source(f"cyclegan:{root}", tmp_path / "rgb_shards", "train")
    rgb_b = str(tmp_path / "rgb_shards" / "trainB.manifest.json")
    with pytest.raises(DataError, match=r"trainB.manifest.json: data.train_b holds 3-channel images but "
                                        r"data.channels is 1"):
        make_train_loader(cfg(train=(a,), train_b=(rgb_b,), resolution=28), batch_size=8)

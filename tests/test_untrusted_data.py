"""Data read back is untrusted: crafted tars, manifests, pixels, labels and latents are refused by name (or read
exactly), never looped on, allocated blindly or trained on silently."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from distgen.cli import main as cli
from distgen.config import DataConfig
from distgen.data import DataError, make_loader, resolve_shards, write_shards
from distgen.data.pixels import to_8bit
from distgen.data.manifest import read_manifest
from distgen.data.shard import write_samples
from distgen.data.tario import MAX_HEADER, TarFormatError, iter_entries, iter_members

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- tars built by hand
def header(name: bytes, size: int, kind: bytes = b"0", size_field: bytes | None = None) -> bytes:
    """A ustar header with a valid checksum (so only the field under test is wrong)."""
    h = bytearray(512)
    h[0:len(name)] = name
    h[100:108] = b"0000644\x00"
    h[108:116] = h[116:124] = b"0000000\x00"
    h[124:136] = size_field if size_field is not None else b"%011o\x00" % size
    h[136:148] = b"00000000000\x00"
    h[156:157] = kind
    h[257:265] = b"ustar\x0000"
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\x00 " % sum(h)
    return bytes(h)


def member(name: bytes, data: bytes, kind: bytes = b"0", size_field: bytes | None = None) -> bytes:
    return header(name, len(data), kind, size_field) + data + b"\0" * (-len(data) % 512)


def tar(*members: bytes) -> bytes:
    return b"".join(members) + b"\0" * 1024


def pax(*records: bytes) -> bytes:
    return member(b"././@PaxHeader", b"".join(records), b"x")


class Stream(io.BytesIO):
    """A tar stream that records the largest read asked of it; ``pipe=True``: not seekable, like a pipe: command."""

    def __init__(self, data: bytes, pipe: bool = False):
        super().__init__(data)
        self.pipe, self.largest = pipe, 0

    def read(self, n=-1):
        self.largest = max(self.largest, n if n >= 0 else 1 << 62)
        return super().read(n)

    def seekable(self):
        return not self.pipe


def entries(data: bytes, pipe: bool = False) -> list[tuple[str, bytes]]:
    return [(name, d) for name, d, _ in iter_entries(Stream(data, pipe))]


def test_a_zero_length_pax_record_fails_at_once(tmp_path):
    """The 3 KB tar that sent the reader into an endless loop at 100% CPU (tarfile refuses it too)."""
    evil = tar(pax(b"0 path=x\n"), member(b"k.png", b"x" * 10))
    assert len(evil) == 3072
    (tmp_path / "evil.tar").write_bytes(evil)
    with pytest.raises(tarfile.ReadError):
        tarfile.open(tmp_path / "evil.tar").getmembers()
    # In a child process, so that a regression fails on the timeout instead of hanging the suite.
    code = ("import sys, time; from distgen.data.tario import TarFormatError, iter_members\n"
            "t = time.perf_counter()\n"
            "try:\n    list(iter_members(open(sys.argv[1], 'rb')))\n"
            "except TarFormatError as e:\n    print(f'{time.perf_counter() - t:.3f}', e)\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "evil.tar")], cwd=REPO, capture_output=True,
                       text=True, timeout=30)
    seconds, _, message = r.stdout.partition(" ")
    assert r.returncode == 0 and float(seconds) < 1.0, r.stdout + r.stderr
    assert "PAX header: a record length of 0 at byte 0" in message
    # Through the loader: a DataError naming the shard.
    with pytest.raises(DataError, match=r"shard .*evil.tar: corrupt.*PAX header: a record length of 0"):
        list(make_loader([str(tmp_path / "evil.tar")], DataConfig(resolution=8, channels=1, workers=0),
                         batch_size=2, mode="eval"))


@pytest.mark.parametrize("bad,match", [
    (pax(b"x path=a\n"), r"PAX header: a record without a decimal length"),
    (pax(b"+9 path=a\n"), r"PAX header: a record without a decimal length"),
    (pax(b"99 path=a\n"), r"PAX header: a record length of 99 at byte 0"),  # beyond the header's data
    (pax(b"4 a=\n"), r"PAX header: a record length of 4"),  # shorter than "4 k=\n" can be
    (pax(b"11 path=abX"), r"the record at byte 0 is not 'key=value\\n'"),
    (pax(b"9 pathab\n"), r"the record at byte 0 is not 'key=value\\n'"),
    (pax(b"7 =abc\n"), r"the record at byte 0 is not 'key=value\\n'"),
    (pax(b"12 size=1x2\n"), r"PAX size '1x2' is not the header's 10"),
    (pax(b"12 size=-10\n"), r"PAX size '-10' is not the header's 10"),
    (pax(b"12 size=999\n"), r"PAX size '999' is not the header's 10"),
    (member(b"g", b"1 x\n", b"g"), r"PAX header: a record length of 1"),  # a global header is checked too
])
def test_malformed_pax_headers_are_refused(bad, match):
    with pytest.raises(TarFormatError, match=match):
        entries(tar(bad, member(b"k.png", b"x" * 10)))


@pytest.mark.parametrize("field,match", [
    (b"\xff" * 12, r"a negative number in a header field"),  # base-256, negative
    (b"-0000000012\x00", r"invalid number field"),  # int(..., 8) would take these four
    (b"0o000000012\x00", r"invalid number field"),
    (b"00000_00012\x00", r"invalid number field"),
    (b"\t0000000012\x00", r"invalid number field"),
    (b"00000000019\x00", r"invalid number field"),  # not octal
])
def test_bad_number_fields_are_tar_format_errors(field, match):
    with pytest.raises(TarFormatError, match=match):
        entries(tar(member(b"k.png", b"x" * 10, size_field=field)))


def test_numbers_as_tarfile_reads_them_still_read():
    """NUL-terminated with garbage after the NUL, space-padded and GNU base-256 fields are valid."""
    for field in (b"12\x00garbage!!", b"     12    \x00", b"\x80" + (10).to_bytes(11, "big")):
        assert entries(tar(member(b"k.png", b"x" * 10, size_field=field))) == [("k.png", b"x" * 10)]


@pytest.mark.parametrize("kind", [b"x", b"g", b"L", b"K"])
def test_oversized_extended_headers_are_refused_before_they_are_read(kind):
    size = 2 * MAX_HEADER
    stream = Stream(header(b"././@LongLink", size, kind) + b"a" * 4096, pipe=True)
    with pytest.raises(TarFormatError, match=rf"a '{kind.decode()}' header of {size} bytes, more than {MAX_HEADER}"):
        list(iter_entries(stream))
    assert stream.largest <= 512


def test_a_member_larger_than_its_stream_is_refused_before_any_read():
    data = tar(member(b"a.png", b"a" * 10), header(b"b.png", 1 << 30))  # 1 GiB claimed, 2.5 KB there
    stream = Stream(data)
    with pytest.raises(TarFormatError, match=r"member 'b.png': a size of 1073741824 bytes, but only 1024 bytes "
                                             r"follow its header \(truncated\?\)"):
        list(iter_entries(stream))
    assert stream.largest <= 512
    # A pipe cannot say what it holds: a member over the bound of any shard member is refused as such.
    stream = Stream(tar(header(b"b.png", 3 << 30, size_field=b"\x80" + (3 << 30).to_bytes(11, "big"))), pipe=True)
    with pytest.raises(TarFormatError, match=r"a size of 3221225472 bytes, more than a shard member may have"):
        list(iter_entries(stream))
    assert stream.largest <= 512


def test_tars_of_python_tarfile_with_long_names_read_as_tarfile_reads_them(tmp_path):
    """PAX (long and non-ASCII names, a PAX size) and GNU (long names and link names) tars, folders and
    links among the members: the same regular files, names and bytes as tarfile reads."""
    rng = np.random.default_rng(0)
    files = {"short.png": b"", "d" * 120 + "/x.png": rng.bytes(700), "é" * 60 + ".cls": b"3",
             "/".join(["deep"] * 40) + "/k.npy": rng.bytes(5000)}
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.pax_headers = {"size": str(len(data))} if fmt == tarfile.PAX_FORMAT else {}
                t.addfile(info, io.BytesIO(data))
            folder = tarfile.TarInfo("f" * 150)
            folder.type = tarfile.DIRTYPE
            t.addfile(folder)
            link = tarfile.TarInfo("link")
            link.type, link.linkname = tarfile.SYMTYPE, "t" * 200
            t.addfile(link)
        raw = buf.getvalue()
        with tarfile.open(fileobj=io.BytesIO(raw)) as t:
            want = [(m.name, t.extractfile(m).read()) for m in t.getmembers() if m.isfile()]
        assert want == list(files.items())
        assert entries(raw) == want and entries(raw, pipe=True) == want
        assert list(iter_members(io.BytesIO(raw))) == want


# --------------------------------------------------------------------------- manifests
def png(arr, mode=None, **save) -> bytes:
    im = Image.fromarray(np.asarray(arr))
    if mode is not None and im.mode != mode:
        im = Image.frombytes(mode, im.size, np.ascontiguousarray(arr).tobytes())
    buf = io.BytesIO()
    im.save(buf, format="PNG", **save)
    return buf.getvalue()


def sample(i: int, label: int | bytes | None = 3, image: bytes | None = None) -> dict:
    s = {"__key__": f"k{i:03d}", "png": image if image is not None else png(np.full((4, 4), 10 * i, np.uint8))}
    if label is not None:
        s["cls"] = label if isinstance(label, bytes) else str(label).encode()
    return s


def shards(tmp_path, samples, per_shard=10, **manifest) -> Path:
    """Shards and a manifest as write_shards writes them (counts, sizes, hashes), of the given samples."""
    meta = {"image_size": [4, 4], "channels": 1, "num_classes": 10, "class_names": [str(i) for i in range(10)],
            **manifest}
    write_samples(iter(samples), tmp_path, "train", per_shard, None, name="test", manifest=meta)
    return tmp_path / "train.manifest.json"


def edit(path: Path, **changes) -> Path:
    m = json.loads(path.read_text())
    for k, v in changes.items():
        if k.startswith("shard0_"):
            m["shards"][0][k[len("shard0_"):]] = v
        else:
            m[k] = v
    path.write_text(json.dumps(m))
    return path


@pytest.mark.parametrize("changes,match", [
    ({"num_classes": "ten"}, r"num_classes: expected an integer, got a string 'ten'"),
    ({"num_classes": 10 ** 9}, r"num_classes: 1000000000 is out of range \[0, 100000\]"),
    ({"shard0_count": -5}, r"shards\[0\].count: -5 is out of range"),
    ({"shard0_count": 4, "total": 4}, None),  # consistent, but a lie: the loader finds it (counts test)
    ({"total": 11}, r": total 11 is not the sum of the shards' counts \(10\)"),
    ({"class_names": ["a"]}, r"num_classes is 10 but class_names lists 1"),
    ({"shard0_sha256": "abc"}, r"shards\[0\].sha256: 'abc' does not have the expected form"),
    ({"image_size": [28]}, r"image_size: a list of 1 items"),
    ({"image_size": ["28", 28]}, r"image_size\[0\]: expected an integer"),
    ({"image_size": [0, 28]}, r"image_size\[0\]: 0 is out of range"),
    ({"channels": 2}, r"channels: 2 is not a channel count"),
    ({"layout": "stacked"}, r"layout: 'stacked' is not one of"),
    ({"kind": "latents"}, r"latent shards \(kind latents\) need their latent_shape"),
    ({"layout": "domain"}, r"layout domain needs a domain"),
    ({"source_class": {"index": 12, "name": "x"}}, r"source_class.index 12 is not one of the 10 classes"),
    ({"latent_shape": [4, 8]}, r"latent_shape: a list of 2 items"),
    ({"shards": []}, r"shards: a list of 0 items"),
    ({"colour": "blue"}, r"colour: unknown key"),
    ({"format": "webdataset"}, r"not a distgen manifest \(format distgen-shards/1\)"),
    ({"shard0_name": "x/../../etc/passwd"}, r"shards\[0\].name .*relative to its own folder"),
])
def test_a_manifest_is_read_through_its_schema(tmp_path, changes, match):
    path = edit(shards(tmp_path, [sample(i) for i in range(10)]), **changes)
    if match is None:
        resolve_shards(str(path))
        return
    with pytest.raises(DataError, match=match) as e:
        resolve_shards(str(path))
    assert str(e.value).startswith(f"{path}: ")
    assert cli(["data", "verify", str(path)]) == 2


def test_a_shard_listed_twice_or_linked_out_of_the_folder_is_refused(tmp_path):
    path = shards(tmp_path / "d", [sample(i) for i in range(10)], per_shard=5)
    m = json.loads(path.read_text())
    edit(path, shards=[m["shards"][0], m["shards"][0]])
    with pytest.raises(DataError, match=r"shards\[1\].name 'train-000000.tar' is listed twice"):
        read_manifest(path)
    outside = tmp_path / "elsewhere.tar"
    os.replace(tmp_path / "d" / "train-000001.tar", outside)
    os.symlink(outside, tmp_path / "d" / "train-000001.tar")
    edit(path, shards=m["shards"])
    with pytest.raises(DataError, match=r"shards\[1\].name: 'train-000001.tar' is a link that leads out of"):
        resolve_shards(str(path))


def test_demo_reads_its_manifests_through_the_schema(tmp_path):
    from distgen.demo import ensure_shards

    (tmp_path / "train.manifest.json").write_text(json.dumps({"format": "distgen-shards/1", "total": 1,
                                                              "shards": [{"name": "/etc/passwd", "count": 1}]}))
    with pytest.raises(DataError, match=r"train.manifest.json: shards\[0\].name '/etc/passwd'"):
        ensure_shards(tmp_path)


# --------------------------------------------------------------------------- counts
def keys_of(loader) -> list[str]:
    return [k for b in loader for k in b["key"]]


def test_a_lowered_manifest_count_is_found_not_trusted(tmp_path, capsys):
    path = shards(tmp_path, [sample(i) for i in range(20)])  # two shards of 10
    cfg = DataConfig(resolution=4, channels=1, workers=0)
    assert len(keys_of(make_loader(str(path), cfg, batch_size=4, mode="eval"))) == 20
    edit(path, shard0_count=5, total=15)
    shard = tmp_path / "train-000000.tar"
    lowered = rf"shard {shard}: holds more than the 5 samples its manifest records \(key k005 follows them\)"
    for world in (1, 2):  # the slice that ends at the shard's count is one rank's
        with pytest.raises(DataError, match=lowered):
            for rank in range(world):
                keys_of(make_loader(str(path), cfg, batch_size=4, mode="eval", rank=rank, world=world))
    with pytest.raises(DataError, match=lowered):  # training: resampled slices end at the count too
        it = iter(make_loader(str(path), DataConfig(resolution=4, channels=1, workers=0, shuffle_buffer=2),
                              batch_size=4, mode="train"))
        for _ in range(50):
            next(it)
    capsys.readouterr()
    assert cli(["data", "verify", str(path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"distgen: error: {path}: 1 of 2 shard(s) do not match the manifest:"
    assert err[1] == f"  {shard}: holds 10 samples, the manifest records 5"


def test_verify_counts_and_decodes_and_says_what_it_checked(tmp_path, capsys):
    bad = [sample(0), sample(1), sample(2, image=b"not a png"), sample(3), sample(4, label=10), sample(5)]
    path = shards(tmp_path, [sample(i) for i in range(10, 20)] + bad, per_shard=10)
    assert cli(["data", "verify", str(path)]) == 0  # hashes and counts as recorded
    out = capsys.readouterr().out
    assert out == (f"{path}: 2 shard(s), 16 samples, {sum(f.stat().st_size for f in tmp_path.glob('*.tar')) / 2**20:.1f}"
                   f" MiB: sizes, sha256 and sample counts as recorded (total = the sum of the counts); samples not "
                   f"decoded (--decode decodes them)\n")
    assert cli(["data", "verify", str(path), "--decode"]) == 2
    err = capsys.readouterr().err.splitlines()
    shard = tmp_path / "train-000001.tar"
    assert len(err) == 2 and err[0] == f"distgen: error: {path}: 1 of 2 shard(s) do not match the manifest:"
    assert err[1].startswith(f"  {shard}: 2 bad sample(s), the first: shard {shard}, key k002: 'png' is not a "
                             f"decodable image (cannot identify image file")
    assert cli(["data", "verify", str(shards(tmp_path / "good", [sample(i) for i in range(3)])), "--decode"]) == 0
    assert capsys.readouterr().out.endswith("every sample decoded (images 4x4x1, labels in [0, 10))\n")


@contextlib.contextmanager
def deadline(seconds: float):
    """A TimeoutError in the test instead of a test that spins for ever."""
    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_empty_shards_stop_training_instead_of_spinning(tmp_path):
    (tmp_path / "empty.tar").write_bytes(tar())
    cfg = DataConfig(resolution=4, channels=1, workers=0, on_error="skip")
    with deadline(30), pytest.raises(DataError, match=r"the last 1000 shard reads of this stream gave no sample"):
        next(iter(make_loader([str(tmp_path / "empty.tar")], cfg, batch_size=2, mode="train")))
    with pytest.raises(DataError, match=r"empty.tar: holds no samples \(an empty tar\)"):
        keys_of(make_loader([str(tmp_path / "empty.tar")], DataConfig(resolution=4, channels=1, workers=0),
                            batch_size=2, mode="eval"))
    # A manifest shard counted 0: left out of training; a rank holding only such shards is told so.
    path = shards(tmp_path / "m", [sample(i) for i in range(3)])
    m = json.loads(path.read_text())
    (tmp_path / "m" / "empty.tar").write_bytes(tar())
    edit(path, shards=m["shards"] + [{"name": "empty.tar", "count": 0}])
    train = DataConfig(resolution=4, channels=1, workers=0, shuffle_buffer=2)
    assert len(next(iter(make_loader(str(path), train, batch_size=2, mode="train", rank=0, world=2)))["key"]) == 2
    with deadline(30), pytest.raises(DataError, match=r"every shard of this stream holds no samples"):
        next(iter(make_loader(str(path), train, batch_size=2, mode="train", rank=1, world=2)))


# --------------------------------------------------------------------------- labels
@pytest.mark.parametrize("cls,match", [
    (b"10", r"'cls' 10 is out of range: the manifest lists 10 classes \(0 to 9\)"),  # the guidance null class
    (b"1000", r"'cls' 1000 is out of range"),
    (b"-1", r"'cls' is not a class number: b'-1'"),
    (b"1e3", r"'cls' is not a class number"),
    (b"3.0", r"'cls' is not a class number"),
    (b"1234567", r"'cls' is not a class number"),
    ("٣".encode(), r"'cls' is not a class number"),  # a digit to str.isdigit, not to a class number
    (b"", r"'cls' is not a class number"),
])
def test_labels_are_class_numbers_in_range(tmp_path, cls, match):
    path = shards(tmp_path, [sample(0), sample(1, label=cls), sample(2)])
    for labels in (True, False):
        with pytest.raises(DataError, match=rf"shard .*train-000000.tar, key k001: {match}"):
            keys_of(make_loader(str(path), DataConfig(resolution=4, channels=1, workers=0, labels=labels),
                                batch_size=2, mode="eval"))
    loader = make_loader(str(path), DataConfig(resolution=4, channels=1, workers=0, on_error="skip"),
                         batch_size=2, mode="eval")
    assert keys_of(loader) == ["k000", "k002"] and loader.skipped == 1


def test_labels_without_a_manifest_are_bounded_too(tmp_path):
    with wds.TarWriter(str(tmp_path / "s.tar"), encoder=False) as w:
        for s in (sample(0, label=b" 7\n"), sample(1, label=99_999), sample(2, label=100_000)):
            w.write(s)
    loader = make_loader([str(tmp_path / "s.tar")], DataConfig(resolution=4, channels=1, workers=0, labels=True),
                         batch_size=2, mode="eval")
    it = iter(loader)
    assert next(it)["label"].tolist() == [7, 99_999]
    with pytest.raises(DataError, match=r"key k002: 'cls' 100000 is out of range: distgen takes at most 100000"):
        next(it)


# --------------------------------------------------------------------------- latents
def npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def npy_header(shape) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buf.getvalue()


def latent_shards(tmp_path, latents) -> str:
    samples = [{"__key__": f"k{i:03d}", "latent.npy": raw, "cls": b"1"} for i, raw in enumerate(latents)]
    path = shards(tmp_path, samples, kind="latents", latent_shape=[2, 4, 4])
    return str(path)


GOOD_LATENT = np.random.default_rng(0).standard_normal((4, 4, 4)).astype(np.float32)


@pytest.mark.parametrize("raw,match", [
    (npy(GOOD_LATENT[:2]), r"'latent.npy' is float32 \[2, 4, 4\], expected float32 \[4, 4, 4\] \(the manifest's "
                           r"latent_shape \[2, 4, 4\]"),
    (npy(GOOD_LATENT.astype(np.float64)), r"'latent.npy' is float64 \[4, 4, 4\]"),
    (npy(np.where(GOOD_LATENT > 1, np.nan, GOOD_LATENT)), r"'latent.npy' holds \d+ non-finite values"),
    (npy(GOOD_LATENT)[:-4], r"'latent.npy' holds 252 bytes of values, its header says 256"),
    (npy(np.array([{"a": 1}], dtype=object)), r"'latent.npy' is object \[1\]"),
    # a header claiming 16 TB of floats: refused from the header, nothing allocated
    (npy_header((4, 4, 10 ** 12)) + GOOD_LATENT.tobytes(), r"'latent.npy' is float32 \[4, 4, 1000000000000\]"),
    (b"\x93NUMPY\x03\x00" + npy(GOOD_LATENT)[8:], r"'latent.npy' is not a numpy array \(npy format version 3.0"),
    (b"not numpy", r"'latent.npy' is not a numpy array"),
])
def test_latents_are_checked_against_the_manifest(tmp_path, raw, match):
    path = latent_shards(tmp_path, [npy(GOOD_LATENT), raw, npy(GOOD_LATENT)])
    cfg = DataConfig(resolution=16, channels=1, workers=0)
    with pytest.raises(DataError, match=rf"shard .*train-000000.tar, key k001: {match}"):
        keys_of(make_loader(path, cfg, batch_size=2, mode="eval"))
    loader = make_loader(path, DataConfig(resolution=16, channels=1, workers=0, on_error="skip"), batch_size=4,
                         mode="eval")
    batch = next(iter(loader))
    assert batch["key"] == ["k000", "k002"] and loader.skipped == 1
    np.testing.assert_array_equal(batch["latent"][0].numpy(), GOOD_LATENT)


# --------------------------------------------------------------------------- pixels
def png16(arr: np.ndarray) -> bytes:
    """A 16-bit PNG written with numpy and zlib (Pillow writes 16-bit grey only): HxW, HxWx2, x3 or x4 uint16."""
    h, w = arr.shape[:2]
    c = 1 if arr.ndim == 2 else arr.shape[2]
    rows = arr.reshape(h, w * c).astype(">u2")
    raw = b"".join(b"\x00" + rows[y].tobytes() for y in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))

    colour = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def composite(c, a):
    """Straight alpha over white, rounded: the rule docs/data.md states, in floating point."""
    c, a = np.asarray(c, np.float64), np.asarray(a, np.float64)
    if c.ndim == 3:
        a = a[..., None]
    return np.round((c * a + 255 * (255 - a)) / 255).astype(np.uint8)


RNG = np.random.default_rng(1)
G16 = RNG.integers(0, 65536, (6, 6), dtype=np.uint16)
G16[0, :4] = [0, 65535, 128, 32895]  # 128 / 257 = 0.498 -> 0 and 32895 / 257 = 127.996 -> 128: rounding, not flooring
L8 = RNG.integers(0, 256, (6, 6), dtype=np.uint8)
A8 = RNG.integers(0, 256, (6, 6), dtype=np.uint8)
A8[0, :3] = [0, 255, 128]
RGB8 = RNG.integers(0, 256, (6, 6, 3), dtype=np.uint8)
PALETTE = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
INDEX = RNG.integers(0, 256, (6, 6), dtype=np.uint8)
PALETTE_ALPHA = RNG.integers(0, 256, 256, dtype=np.uint8)
C16 = RNG.integers(0, 65536, (6, 6, 3), dtype=np.uint16)
KEYED = L8.copy()
KEYED[2:4, 2:4] = 77


def palette_png(**save) -> bytes:
    im = Image.fromarray(INDEX, "P")
    im.putpalette(PALETTE.tobytes())
    buf = io.BytesIO()
    im.save(buf, format="PNG", **save)
    return buf.getvalue()


# stored image -> what distgen must make of it, computed from the formulas of docs/data.md
PIXEL_CASES = {
    "I;16 (16-bit grey)": (png(G16), np.round(G16 * 255.0 / 65535).astype(np.uint8)),
    "I;16 with a colour key": (png(G16, transparency=int(G16[1, 1])),
                               np.where(G16 == G16[1, 1], 255, np.round(G16 * 255.0 / 65535)).astype(np.uint8)),
    "1 (bilevel)": (png(L8 > 127), np.where(L8 > 127, 255, 0).astype(np.uint8)),
    "L": (png(L8), L8),
    "L with a colour key": (png(KEYED, transparency=77), np.where(KEYED == 77, 255, KEYED).astype(np.uint8)),
    "LA": (png(np.stack([L8, A8], -1), "LA"), composite(L8, A8)),
    "RGB with a colour key": (png(RGB8, transparency=tuple(int(v) for v in RGB8[0, 0])),
                              np.where((RGB8 == RGB8[0, 0]).all(-1, keepdims=True), 255, RGB8).astype(np.uint8)),
    "RGBA": (png(np.dstack([RGB8, A8]), "RGBA"), composite(RGB8, A8)),
    "P": (palette_png(), PALETTE[INDEX]),
    "P with an alpha per entry": (palette_png(transparency=PALETTE_ALPHA.tobytes()),
                                  composite(PALETTE[INDEX], PALETTE_ALPHA[INDEX])),
    "P with a transparent index": (palette_png(transparency=int(INDEX[0, 0])),
                                   composite(PALETTE[INDEX], np.where(INDEX == INDEX[0, 0], 0, 255))),
    # Pillow reads 16-bit colour as its high byte: what distgen can see of it
    "16-bit RGB": (png16(C16), (C16 >> 8).astype(np.uint8)),
}


@pytest.mark.parametrize("case", PIXEL_CASES)
def test_every_pixel_format_is_converted_exactly_on_both_paths(tmp_path, case):
    data, want = PIXEL_CASES[case]
    channels = 1 if want.ndim == 2 else 3
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.png").write_bytes(data)
    # Sharding a folder
    write_shards(f"folder:{tmp_path / 'in'}", tmp_path / "out", "train")
    cfg = DataConfig(resolution=6, channels=channels, workers=0)
    got = next(iter(make_loader(str(tmp_path / "out" / "train.manifest.json"), cfg, batch_size=1, mode="eval",
                                as_float=False)))["image"][0].numpy()
    np.testing.assert_array_equal(got.transpose(1, 2, 0).squeeze(-1) if channels == 1 else got.transpose(1, 2, 0),
                                  want)
    # Decoding the stored bytes from a tar, as they came
    with wds.TarWriter(str(tmp_path / "raw.tar"), encoder=False) as w:
        w.write({"__key__": "x", "png": data})
    got = next(iter(make_loader([str(tmp_path / "raw.tar")], cfg, batch_size=1, mode="eval",
                                as_float=False)))["image"][0].numpy()
    np.testing.assert_array_equal(got.transpose(1, 2, 0).squeeze(-1) if channels == 1 else got.transpose(1, 2, 0),
                                  want)


def test_sixteen_bit_grey_is_not_clipped():
    """The bug: convert("L") clipped 16-bit values, 99.7% of a 16-bit photo's pixels became 255."""
    photo = np.random.default_rng(2).integers(0, 65536, (64, 64), dtype=np.uint16)
    got = np.asarray(to_8bit(Image.open(io.BytesIO(png(photo))), "x.png"))
    assert (got == 255).mean() < 0.01
    np.testing.assert_array_equal(got, np.round(photo / 257).astype(np.uint8))


def test_premultiplied_alpha_and_pixels_without_a_range(tmp_path):
    rgba = np.dstack([RGB8, A8])
    premul = np.round(RGB8 * (A8[..., None] / 255)).astype(np.uint8)  # what an RGBa image stores
    got = np.asarray(to_8bit(Image.fromarray(np.dstack([premul, A8]), "RGBa"), "x"))
    np.testing.assert_array_equal(got, np.minimum(premul.astype(int) + 255 - A8[..., None], 255))
    assert np.abs(got.astype(int) - composite(RGB8, A8)).max() <= 1  # the same picture as straight alpha
    assert to_8bit(Image.fromarray(rgba, "RGBA"), "x").mode == "RGB"
    (tmp_path / "f").mkdir()
    for arr, mode in ((np.full((4, 4), 70000, np.int32), "I"), (np.full((4, 4), 0.5, np.float32), "F")):
        Image.fromarray(arr).save(tmp_path / "f" / "x.tif")
        kind = "32-bit integer" if mode == "I" else "floating-point"
        with pytest.raises(DataError, match=rf"x.tif: {kind} pixels \(mode {mode}\) have no range distgen can know"):
            write_shards(f"folder:{tmp_path / 'f'}", tmp_path / "out", "train")


# --------------------------------------------------------------------------- sources
def test_raw_sources_with_labels_out_of_range_or_mismatched_are_refused(tmp_path):
    # Fashion-MNIST idx files with a label 12
    d = tmp_path / "fm"
    d.mkdir()
    images = np.zeros((3, 4, 4), np.uint8)
    with gzip.open(d / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 0x0803, 3, 4, 4) + images.tobytes())
    with gzip.open(d / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 0x0801, 3) + bytes([1, 12, 3]))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: label 12 at index 1; Fashion-MNIST has 10"):
        write_shards(f"fashion-mnist:{d}", tmp_path / "out", "test")
    # npz labels past the class bound (a label of 10^9 named 10^9 classes, one string each)
    np.savez(tmp_path / "big.npz", x=np.zeros((2, 4, 4), np.uint8), y=np.array([0, 200_000]))
    with pytest.raises(DataError, match=r"big.npz: 'y' holds label 200000; distgen takes at most 100000"):
        write_shards(f"npz:{tmp_path / 'big.npz'}", tmp_path / "out", "train")
    # CIFAR-10 batches: a label past the class names, values a cast would wrap, unmatched lengths
    c = tmp_path / "cifar"
    c.mkdir()
    (c / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    x = np.zeros((2, 3072), np.uint8)
    for batch, match in [({b"data": x, b"labels": [1, 10]}, r"labels must lie in \[0, 10\), found 1 to 10"),
                         ({b"data": x.astype(np.int64) + 300, b"labels": [1, 2]}, r"'data' must be uint8 N x 3072"),
                         ({b"data": x, b"labels": [1]}, r"'labels' must be 2 integers")]:
        (c / "test_batch").write_bytes(pickle.dumps(batch))
        with pytest.raises(DataError, match=rf"cifar/test_batch: {match}"):
            write_shards(f"cifar10:{c}", tmp_path / "out", "test")

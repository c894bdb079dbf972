"""Property: whatever a file distgen reads back holds, the reader names the file and field, or takes a documented
safe fallback; it never deletes, writes or changes a file outside the folder it owns, and it ends in bounded time
and memory.

Each file kind starts from what distgen itself writes; Hypothesis then mutates it as a careless user or an
attacker would: a value anywhere in the tree replaced by a path with ``..`` or ``/``, a link's target, a huge,
negative, fractional or non-finite number, a value of the wrong type, deep nesting; keys dropped or added; the
bytes truncated or flipped. Every example runs under an address-space limit (an allocation sized by the file
fails, and the failure is not a named error) and a per-example deadline (a loop that does not end fails).
"""

from __future__ import annotations

import copy
import json
import math
import os
import resource
import signal
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import REPO
from distgen import checkpoint as ckpt
from distgen import ownership, phema, readback
from distgen.config import load_config, to_dict
from distgen.errors import CheckpointError, ConfigError, SampleError

EXAMPLES = int(os.environ.get("DISTGEN_PROPERTY_EXAMPLES", "60"))
PROPERTY = settings(max_examples=EXAMPLES, deadline=timedelta(seconds=10), derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
HEADROOM = 2 << 30  # address space an example may add to what the process already maps


@pytest.fixture(scope="module")
def memory_limit():
    """A soft address-space limit of what the process maps now plus HEADROOM, lifted after the module."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    mapped = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (mapped + HEADROOM, hard))
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# ----------------------------------------------------------------------------- mutations
class World:
    """A scratch root: ``owned/`` (the folder the reader may act in) beside ``sentinel/`` (files that no reader may
    touch). Paths into the sentinel are among the values mutations plant."""

    def __init__(self, root: Path):
        self.root, self.owned, self.sentinel = root, root / "owned", root / "sentinel"
        self.sentinel.mkdir(parents=True, exist_ok=True)
        (self.sentinel / "keep.txt").write_text("a user's file")
        (self.sentinel / "sub").mkdir(exist_ok=True)
        (self.sentinel / "sub" / "thesis.tex").write_text("\\documentclass{article}")
        self.before = self.snapshot()

    def snapshot(self) -> dict:
        return {str(p.relative_to(self.sentinel)): (p.read_bytes() if p.is_file() else None)
                for p in sorted(self.sentinel.rglob("*"))}

    def reset_owned(self) -> Path:
        import shutil

        if self.owned.exists() or self.owned.is_symlink():
            shutil.rmtree(self.owned) if self.owned.is_dir() and not self.owned.is_symlink() else self.owned.unlink()
        self.owned.mkdir()
        return self.owned

    def check_untouched(self) -> None:
        assert self.snapshot() == self.before, "a file outside the reader's folder was created, changed or deleted"


def nasty_values(world: World):
    s = str(world.sentinel)
    return st.one_of(
        st.sampled_from([
            "..", ".", "", "../sentinel/keep.txt", "../../sentinel", f"{s}/keep.txt", s, "/", "a/b", "\\..\\x",
            "pipe:touch /tmp/distgen-pwned", "x" * 5000, "ema-000000000001.safetensors", "\x00", "ten",
            -1, 0, 1, -(2 ** 63), 2 ** 63, 10 ** 30, -10 ** 30, 10 ** 400, 1.5, -0.5, 1e308, math.nan, math.inf,
            -math.inf, True, False, None, [], {}, [None], {"": None},
        ]),
        st.integers(), st.floats(), st.text(max_size=40), st.booleans(),
        st.recursive(st.none() | st.integers() | st.text(max_size=5),
                     lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                     max_leaves=20),
        st.integers(50, 300).map(lambda d: json.loads("[" * d + "]" * d)),  # deep nesting
    )


def path_strings(world: World):
    """Strings that point out of a folder: what a name field planted by an attacker would hold."""
    s = str(world.sentinel)
    return st.sampled_from(["../sentinel/keep.txt", "../../sentinel/keep.txt", f"{s}/keep.txt", s, "../sentinel",
                            "..", ".", "/", "sub/../../sentinel", "../" * 8 + s.lstrip("/")])


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:50]):
            yield from _paths(v, prefix + (i,))


def _get(obj, path):
    for p in path:
        obj = obj[p]
    return obj


def _set(obj, path, value):
    if not path:
        return value
    parent = obj
    for p in path[:-1]:
        parent = parent[p]
    parent[path[-1]] = value
    return obj


def mutated_data(base, world: World):
    """A strategy: ``base`` with one to three of its values replaced, dropped, or a key added."""

    @st.composite
    def strategy(draw):
        obj = copy.deepcopy(base)
        for _ in range(draw(st.integers(1, 3))):
            paths = list(_paths(obj))
            strings = [p for p in paths if isinstance(_get(obj, p), str)]
            action = draw(st.sampled_from(["replace", "replace", "name", "name", "drop", "add"]))
            if action == "name" and strings:  # a string field (a file name, most often) pointing out of its folder
                obj = _set(obj, draw(st.sampled_from(strings)), draw(path_strings(world)))
                continue
            path = draw(st.sampled_from(paths))
            if action in ("replace", "name") or not path:
                obj = _set(obj, path, draw(nasty_values(world)))
                continue
            parent = obj
            for p in path[:-1]:
                parent = parent[p]
            if action == "drop" and isinstance(parent, dict):
                del parent[path[-1]]
            elif action == "drop" and isinstance(parent, list):
                parent.pop(path[-1])
            elif isinstance(parent, dict):
                parent[draw(st.text(max_size=8))] = draw(nasty_values(world))
        return obj

    return strategy()


def json_bytes(base, world: World):
    """Mutated data serialised as JSON (NaN and Infinity allowed, as Python writes them), or the original bytes
    truncated or with one byte flipped."""
    raw = json.dumps(base).encode()
    return st.one_of(
        mutated_data(base, world).map(lambda o: json.dumps(o).encode()),
        st.integers(0, len(raw)).map(lambda n: raw[:n]),
        st.tuples(st.integers(0, len(raw) - 1), st.integers(1, 255)).map(
            lambda t: raw[:t[0]] + bytes([raw[t[0]] ^ t[1]]) + raw[t[0] + 1:]),
    )


class TookTooLong(BaseException):  # not an Exception: no reader's `except Exception` may swallow it
    pass


def _alarm(signum, frame):
    raise TookTooLong(f"a reader ran past {SECONDS} s: a loop that does not advance?")


SECONDS = 5.0


def outcome(fn, allowed: tuple, where: str):
    """Run ``fn`` for at most SECONDS: it returns (a documented fallback or good data) or raises one of ``allowed``
    (distgen's named errors) whose message starts with ``where``. Anything else fails the property."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, SECONDS)
    try:
        return fn()
    except allowed as e:
        assert str(e).startswith(where), f"the error does not name {where} first: {e}"
        return e
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(tmp_path_factory.mktemp("property"))


def _config_dict() -> dict:
    return to_dict(load_config(REPO / "configs" / "fashion_mnist_dcgan.yaml"))


# ----------------------------------------------------------------------------- the file kinds
def test_checkpoint_meta_json(world, memory_limit):
    from distgen.train import TrainState

    cfg = _config_dict()
    base = {"format": ckpt.FORMAT, **TrainState(step=4, nimg=32, counters={"nonfinite_total": 0},
                                                interval={"train/loss": [1.5, 3]}).to_meta(),
            "world_size": 2, "reason": "periodic", "ema_steps": {"G": [4, 4]}, "family_state": {"pl_mean": 0.0},
            "family": "gan", "data_info": {"resolution": 32, "channels": 1, "num_classes": 10}, "config": cfg}

    @PROPERTY
    @given(raw=json_bytes(base, world))
    def prop(raw):
        folder = world.reset_owned() / "step-00000004"
        folder.mkdir()
        (folder / "meta.json").write_bytes(raw)

        def use():
            meta = ckpt.read_meta(folder, ckpt.RESUME_KEYS)
            TrainState.from_meta(meta)  # what resume does with it
            from distgen.config import model_changes, build_config
            model_changes(meta["config"], build_config(cfg))
            return meta

        outcome(use, (CheckpointError,), str(folder / "meta.json"))
        world.check_untouched()

    prop()


def test_checkpoint_rng_json(world, memory_limit):
    folder = world.reset_owned()
    ckpt.save_rng(folder, 0)
    base = json.loads((folder / "rng-0.json").read_text())

    @PROPERTY
    @given(raw=json_bytes(base, world))
    def prop(raw):
        (folder / "rng-0.json").write_bytes(raw)
        outcome(lambda: ckpt.read_rng(folder, 0), (CheckpointError,), str(folder / "rng-0.json"))
        world.check_untouched()

    prop()


def test_snapshot_index_json(world, memory_limit):
    """The index names files a resume deletes: no mutation may delete or change anything outside the folder."""
    entries = [{"file": phema.snapshot_name(n), "step": n // 8, "nimg": n, "stds": [0.05, 0.1], "size": 3,
                "sha256": "0" * 64, "dtype": "fp16"} for n in (800, 1600, 2400)]

    @PROPERTY
    @given(raw=json_bytes({"snapshots": entries}, world), at=st.sampled_from([0, 800, 1600]))
    def prop(raw, at):
        run = world.reset_owned()
        folder = run / phema.SNAPSHOT_DIR
        folder.mkdir()
        for e in entries:
            (folder / e["file"]).write_bytes(b"abc")
        (folder / phema.INDEX).write_bytes(raw)
        outcome(lambda: phema.drop_snapshots_after(run, at), (SampleError,), str(folder / phema.INDEX))
        world.check_untouched()

    prop()


def _export_meta() -> dict:
    from distgen.export.meta import EXPORT_FORMAT

    return {"format": EXPORT_FORMAT, "family": "gan", "data_info": {"resolution": 32, "channels": 1, "num_classes": 0},
            "config": _config_dict(), "source": {"checkpoint": "runs/x/checkpoints/step-00000010", "step": 10}}


def test_export_distgen_json_and_force(world, memory_limit):
    """distgen.json decides whether `export --force` may replace a folder: read, and the decision, are checked."""
    from distgen.export.meta import read_export_meta

    @PROPERTY
    @given(raw=json_bytes(_export_meta(), world))
    def prop(raw):
        owned = world.reset_owned()
        out = owned / "export"
        out.mkdir()
        (out / "distgen.json").write_bytes(raw)
        (out / "user.txt").write_text("mine?")
        outcome(lambda: read_export_meta(out), (SampleError,), str(out / "distgen.json"))
        decided = outcome(lambda: ownership.check_output_folder(owned / "run", out, True), (SampleError,), str(out))
        if not isinstance(decided, Exception):  # replaced only when distgen.json reads as an export's
            read_export_meta(out)
        world.check_untouched()

    prop()


def test_ema_posthoc_json_and_force(world, memory_limit):
    base = {"run": "runs/x", "kimg": 12.0, "snapshots": 6, "max_residual": 0.05,
            "widths": [{"sigma_rel": 0.05, "gamma": 16.97, "residual": 0.001}]}

    @PROPERTY
    @given(raw=json_bytes(base, world))
    def prop(raw):
        owned = world.reset_owned()
        out = owned / "ema"
        out.mkdir()
        (out / "posthoc.json").write_bytes(raw)
        outcome(lambda: ownership.check_output_folder(owned / "run", out, True, marker=ownership.EMA_MARKER),
                (SampleError,), str(out))
        world.check_untouched()

    prop()


def test_onnx_json(world, memory_limit):
    """onnx.json is read by the standalone sample_onnx.py (numpy + onnxruntime, no distgen): it exits naming the
    file, or hands back checked data."""
    from distgen.export import sample_onnx

    base = {"format": "distgen-onnx/1", "family": "diffusion", "graphs": {"unet": {
        "file": "unet.onnx", "format": "onnx", "inputs": [{"name": "x", "doc": "[batch, 1, 32, 32] float32"}],
        "outputs": [{"name": "prediction", "doc": "like x"}]}},
        "sampler": {"kind": "diffusion", "shape": [1, 32, 32], "steps": 25, "num_classes": 0,
                    "alphas_cumprod": [0.99, 0.5, 0.01], "sampler": "ddim", "guidance": 1.0}}

    @PROPERTY
    @given(raw=json_bytes(base, world))
    def prop(raw):
        path = world.reset_owned() / "onnx.json"
        path.write_bytes(raw)
        try:
            meta = sample_onnx.read_meta(path)
        except SystemExit as e:
            assert str(e.code).startswith(str(path)), e.code
        else:
            for g in meta["graphs"].values():
                assert readback.name_problem(g["file"]) is None
        world.check_untouched()

    prop()


def test_config_yaml(world, memory_limit):
    text = (REPO / "configs" / "fashion_mnist_dcgan.yaml").read_text()
    base = yaml.safe_load(text)
    bombs = st.sampled_from(["a: &a [x, x]\nb: &b [*a, *a]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("bcdefghijk", "cdefghijkl")),
        "a: " + "[" * 3000 + "]" * 3000, "a: &x [*x]", "train:\n  lr: 1\n  lr: 2\n", "!!python/object:os.system x",
        "a: !!binary " + "A" * 100, "{" * 50])
    texts = st.one_of(mutated_data(base, world).map(lambda o: yaml.safe_dump(o)), bombs,
                      st.integers(0, len(text)).map(lambda n: text[:n]))

    @PROPERTY
    @given(body=texts)
    def prop(body):
        path = world.reset_owned() / "c.yaml"
        path.write_text(body)
        r = outcome(lambda: load_config(path), (ConfigError,), "")
        if isinstance(r, ConfigError):  # names the file or the field (and then the file, in brackets)
            assert str(r).startswith(str(path)) or f"(in {path})" in str(r), r
        world.check_untouched()

    prop()


def test_metrics_jsonl(world, memory_limit):
    """A resumed run rewrites metrics.jsonl without the records after its step: whatever the lines hold, it keeps
    exactly the whole records up to that step and says how many lines it dropped."""
    from distgen.runlog import RunLog

    lines = [json.dumps({"step": s, "kimg": s * 0.008, "loss": 1.0 / s}) for s in range(1, 9)]
    line = st.one_of(st.sampled_from(lines), mutated_data(json.loads(lines[3]), world).map(json.dumps),
                     st.binary(max_size=60).map(lambda b: b.decode("latin-1")), st.just("x" * 3_000_000))

    @PROPERTY
    @given(body=st.lists(line, max_size=12), torn=st.booleans())
    def prop(body, torn):
        run = world.reset_owned()
        text = "\n".join(body) + ("" if torn else "\n")
        (run / "metrics.jsonl").write_text(text, encoding="latin-1")
        log = RunLog.__new__(RunLog)
        log.path = run / "metrics.jsonl"
        log._truncate(4)
        kept = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert all(isinstance(r["step"], int) and not isinstance(r["step"], bool) and r["step"] <= 4 for r in kept)
        world.check_untouched()

    prop()


def test_run_marker_and_lock_holder(world, memory_limit):
    """distgen-run.json decides whether `train` may write into a folder; the lock file says who holds a run."""
    base = {"format": ownership.RUN_FORMAT, "created": "2026-12-06T10:00:00+0000"}
    holder = {"pid": 12345, "host": "node1", "since": "2026-12-06T10:00:00+0000", "slurm_job": "77"}

    @PROPERTY
    @given(raw=json_bytes(base, world), lock=json_bytes(holder, world))
    def prop(raw, lock):
        run = world.reset_owned() / "run"
        run.mkdir()
        (run / ownership.RUN_MARKER).write_bytes(raw)
        (run / "user.txt").write_text("mine?")
        (run / ownership.LOCK).write_bytes(lock)
        assert isinstance(ownership.is_run_folder(run), bool)
        assert isinstance(ownership._holder(run / ownership.LOCK), str)
        world.check_untouched()

    prop()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two real shards (12 labelled Fashion-MNIST images) and their manifest, as distgen writes them."""
    import itertools

    from distgen.data import write_shards
    from distgen.data.sources import open_source

    root = tmp_path_factory.mktemp("shards")
    items = list(itertools.islice(open_source("fashion-mnist", "test").items(), 12))
    np.savez(root / "d.npz", x=np.stack([i[0] for i in items]), y=np.array([i[1] for i in items]))
    write_shards(f"npz:{root / 'd.npz'}", root / "data", "train", samples_per_shard=8)
    return root / "data"


def _read_all(manifest: Path):
    """What training and evaluation do with a manifest: resolve it, verify it, read every sample once."""
    from distgen.config import DataConfig
    from distgen.data import make_loader
    from distgen.data.verify import verify_manifest

    verify_manifest(manifest, decode=True)
    loader = make_loader(str(manifest), DataConfig(resolution=28, channels=1, workers=0), batch_size=5, mode="eval")
    return sum(len(b["key"]) for b in loader)


def test_shard_manifest(world, memory_limit, shards):
    import shutil

    from distgen.errors import DataError

    base = json.loads((shards / "train.manifest.json").read_text())

    @PROPERTY
    @given(raw=json_bytes(base, world))
    def prop(raw):
        owned = world.reset_owned()
        for p in shards.iterdir():
            shutil.copy(p, owned / p.name)
        (owned / "train.manifest.json").write_bytes(raw)
        n = outcome(lambda: _read_all(owned / "train.manifest.json"), (DataError,), "")
        if isinstance(n, DataError):  # the manifest, or the shard it named, first
            assert str(n).startswith((str(owned / "train.manifest.json"), f"shard {owned}")), n
        else:  # what it accepted, it read whole: 12 images, each once
            assert n == 12
        world.check_untouched()

    prop()


def _fix_checksum(tar: bytearray, block: int) -> None:
    hdr = tar[block:block + 512]
    hdr[148:156] = b" " * 8
    tar[block + 148:block + 156] = b"%06o\x00 " % (sum(hdr) & 0o777777)


def test_tar_shard(world, memory_limit, shards):
    """A shard's bytes flipped (its header checksum then recomputed, half the time, so the parser goes past it),
    truncated, or given a PAX header of arbitrary records: read as training and evaluation read it."""
    from distgen.data import ErrorPolicy, Slice
    from distgen.data.decode import DecodeSpec, decode
    from distgen.data.reading import read_tar
    from distgen.errors import DataError

    raw = (shards / "train-000000.tar").read_bytes()
    headers = [i for i in range(0, len(raw) - 1024, 512) if raw[i + 257:i + 262] == b"ustar"]

    def pax(records: bytes) -> bytes:
        body = records + b"\0" * (-len(records) % 512)
        hdr = bytearray(raw[:512])
        hdr[156:157], hdr[124:136] = b"x", b"%011o\0" % len(records)
        _fix_checksum(hdr, 0)
        return bytes(hdr) + body + raw

    @st.composite
    def flipped(draw):
        b = bytearray(raw)
        h = draw(st.sampled_from(headers))
        for _ in range(draw(st.integers(1, 4))):
            b[h + draw(st.integers(0, 511))] = draw(st.integers(0, 255))
        if draw(st.booleans()):
            _fix_checksum(b, h)
        return bytes(b)

    def record(kv: bytes, delta: str) -> bytes:  # "LEN key=value\n", LEN right, off by a little, or zero
        n = len(kv) + 2
        n += len(str(n))
        n = {"right": n, "zero": 0, "minus": -n, "short": n - 1, "long": n + 1, "far": n + 10 ** 6}[delta]
        return b"%d %s\n" % (n, kv)

    records = st.lists(st.tuples(st.sampled_from([b"path=x", b"size=12", b"size=-1", b"size=1e3", b"=", b"path"])
                                 | st.binary(max_size=20),
                                 st.sampled_from(["right", "right", "zero", "minus", "short", "long", "far"])),
                       min_size=1, max_size=4).map(lambda rs: b"".join(record(*r) for r in rs))
    kinds = {"flip": flipped(), "truncate": st.integers(0, len(raw)).map(lambda n: raw[:n]),
             "pax": records.map(pax), "noise": st.binary(max_size=2000)}
    data = st.sampled_from(["flip", "flip", "truncate", "pax", "pax", "pax", "noise"]).flatmap(kinds.get)

    @PROPERTY
    @given(b=data, count=st.sampled_from([None, 8]))
    def prop(b, count):
        url = world.reset_owned() / "s.tar"
        url.write_bytes(b)
        spec = DecodeSpec(28, 1, labels="optional")

        def read():
            policy = ErrorPolicy("raise")
            return sum(1 for _ in decode(read_tar([Slice(str(url), 0, count, 0, count)], policy), spec, policy))

        n = outcome(read, (DataError,), f"shard {url}")
        assert isinstance(n, DataError) or n <= 8
        world.check_untouched()

    prop()


def test_reference_statistics_npz(world, memory_limit):
    """``eval --ref FILE.npz``: arrays of other shapes, dtypes, non-finite or non-symmetric values, missing or extra
    members, the file truncated or flipped. What it accepts is FID-ready: finite, symmetric, positive semi-definite
    within the stated tolerance, of the extractor's dimension."""
    import io

    from distgen.errors import EvalError
    from distgen.evaluate.refstats import covariance_problem, read_npz

    rng = np.random.default_rng(0)
    feats = rng.standard_normal((20, 8)).astype(np.float32)
    base = {"mu": feats.mean(0), "sigma": np.cov(feats, rowvar=False), "features": feats, "num": np.array(20)}

    def mutate(arrays: dict, key: str, how: str) -> dict:
        a = dict(arrays)
        if key not in a or how == "drop":
            a.pop(key, None)
            return a
        x = np.array(a[key], copy=True)
        if how == "nan" and x.dtype.kind == "f" and x.size:
            x.flat[0] = np.nan
        elif how == "inf" and x.dtype.kind == "f" and x.size:
            x.flat[-1] = np.inf
        elif how == "transpose_skew" and x.ndim == 2 and x.size:
            x[0, -1] += 1.0
        elif how == "negative":
            x = -x
        elif how == "shape":
            x = x.reshape(-1)[:, None] if x.ndim else np.zeros((3, 3))
        elif how == "strings":
            x = x.astype(str)
        elif how == "ints":
            x = x.astype(np.int8)
        elif how == "complex":
            x = x.astype(np.complex64)
        elif how == "huge":
            x = x * 1e30 if x.dtype.kind in "fiu" else x
        elif how == "empty":
            x = x[:0] if x.ndim else np.zeros(0)
        a[key] = x
        return a

    @st.composite
    def files(draw):
        arrays = dict(base)
        for _ in range(draw(st.integers(1, 3))):
            arrays = mutate(arrays, draw(st.sampled_from(["mu", "sigma", "features", "num"])),
                            draw(st.sampled_from(["drop", "nan", "inf", "transpose_skew", "negative", "shape",
                                                  "strings", "ints", "complex", "huge", "empty"])))
        if draw(st.booleans()):
            arrays["extra"] = np.zeros(3)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        raw = buf.getvalue()
        cut = draw(st.sampled_from(["whole", "whole", "truncate", "flip"]))
        if cut == "truncate":
            raw = raw[:draw(st.integers(0, len(raw)))]
        elif cut == "flip":
            i = draw(st.integers(0, len(raw) - 1))
            raw = raw[:i] + bytes([raw[i] ^ draw(st.integers(1, 255))]) + raw[i + 1:]
        return raw

    @PROPERTY
    @given(raw=files())
    def prop(raw):
        path = world.reset_owned() / "ref.npz"
        path.write_bytes(raw)
        got = outcome(lambda: read_npz(path, 8, log=lambda msg: None), (EvalError,), str(path))
        if not isinstance(got, EvalError):
            num, stats, f = got
            if stats is not None:
                assert stats["mu"].shape == (8,) and np.isfinite(stats["sigma"]).all()
                assert covariance_problem(stats["sigma"]) is None
            if f is not None:
                assert f.shape[1] == 8 and np.isfinite(f).all()
        world.check_untouched()

    prop()

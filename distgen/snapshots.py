"""The post-hoc EMA snapshots' index, ``RUN_DIR/ema-snapshots/index.json``, read and checked (no torch, no numpy:
``distgen status`` reads it; :mod:`distgen.phema` writes the snapshots and reconstructs from them)."""

from __future__ import annotations

from pathlib import Path

from distgen import readback as rb
from distgen.errors import SampleError

SNAPSHOT_DIR = "ema-snapshots"
INDEX = "index.json"
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
# The widest power profile with gamma >= 0 (the uniform average) has sigma_rel = 1/sqrt(12).
MAX_SIGMA_REL = 12 ** -0.5


def snapshot_name(nimg: int) -> str:
    return f"ema-{nimg:012d}.safetensors"


SNAPSHOT_RE = r"ema-\d{12}\.safetensors"
_ENTRY = rb.Check(rb.Obj({
    "file": rb.Name(SNAPSHOT_RE), "step": rb.Int(0, rb.MAX_COUNT), "nimg": rb.Int(1, rb.MAX_COUNT),
    "stds": rb.List(rb.Num(0, MAX_SIGMA_REL), min_len=1, max_len=100), "size": rb.Int(0, rb.MAX_BYTES),
    "sha256": rb.Str(pattern="[0-9a-f]{64}"), "dtype": rb.Str(choices=tuple(DTYPES))}, optional=("dtype",)),
    # the name distgen gives a snapshot is its sample count: any other pairing is not distgen's index
    lambda e: None if e["file"] == snapshot_name(e["nimg"]) else f"file {e['file']!r} is not the snapshot of nimg "
                                                                 f"{e['nimg']} ({snapshot_name(e['nimg'])})")
INDEX_SCHEMA = rb.Check(rb.Obj({"snapshots": rb.List(_ENTRY, max_len=1_000_000)}),
                        lambda d: "lists one sample count twice" if len({e["nimg"] for e in d["snapshots"]})
                        != len(d["snapshots"]) else None)


def read_index(run_dir: Path, must_exist: bool = True) -> list[dict]:
    """The snapshots listed in ``run_dir/ema-snapshots/index.json``, oldest first: every entry checked (a file
    name of distgen's own form, bounded numbers), or a SampleError naming the index and entry."""
    path = Path(run_dir) / SNAPSHOT_DIR / INDEX
    if not path.is_file():
        if must_exist:
            raise SampleError(f"{path}: no EMA snapshots in this run folder; train with ema.kind=power and "
                              f"ema.snapshot_kimg set to take them")
        return []
    entries = rb.read_json(path, INDEX_SCHEMA, error=SampleError, max_bytes=256 * rb.MiB,
                           what="snapshot index")["snapshots"]
    return sorted(entries, key=lambda e: e["nimg"])

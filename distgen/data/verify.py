"""``distgen data verify``: every shard of a manifest against what the manifest records (size, sha256, sample
count) and, with ``--decode``, every sample decoded as training decodes it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from distgen.data.decode import DecodeSpec, decode
from distgen.data.errors import DataError
from distgen.data.manifest import manifest_shard_path, read_manifest
from distgen.data.policy import ErrorPolicy
from distgen.data.reading import read_tar, sample_key
from distgen.data.shard import file_sha256
from distgen.data.split import Slice
from distgen.data.tario import count_samples


def manifest_spec(meta: dict) -> DecodeSpec:
    """How ``distgen data verify --decode`` decodes the shards of a manifest: as training does, at the stored
    size, every check the manifest allows (size, channels, labels required when it lists classes, latents'
    shape)."""
    kind = "paired" if meta.get("layout") == "paired" else meta.get("kind", "images")
    n = meta.get("num_classes") or None
    return DecodeSpec(None, meta.get("channels") or 0, labels="required" if n else "none",
                      expect_size=tuple(meta["image_size"]) if meta.get("image_size") else None,
                      expect_channels=meta.get("channels"), kind=kind, num_classes=n,
                      latent_shape=tuple(meta["latent_shape"]) if meta.get("latent_shape") else None)


class _Tally(ErrorPolicy):
    """A policy that keeps the first error and counts the samples lost, quietly."""

    def __init__(self):
        super().__init__("skip")
        self.first: Optional[str] = None

    def __call__(self, err: DataError, lost: Optional[int] = 1) -> None:
        self.first = self.first or str(err)
        self.skipped += 1 if lost is None else max(lost, 1)


def check_shard(url: str, count: Optional[int], shard: int, spec: DecodeSpec) -> tuple[int, Optional[str]]:
    """Decode every sample of one shard as training does: (bad samples, the first one's error or None)."""
    policy = _Tally()
    for _ in decode(read_tar([Slice(url, 0, count, shard, count)], policy), spec, policy):
        pass
    return policy.skipped, policy.first


@dataclass
class Verified:
    """What ``distgen data verify`` checked and found as recorded."""

    shards: int
    bytes: int
    samples: int  # counted in the tar headers: equal to the manifest's total
    decoded: Optional[str] = None  # with decode: what decoding checked, in words


def verify_manifest(manifest: str | Path, decode: bool = False) -> Verified:
    """Check every shard of ``manifest`` against the manifest (``distgen data verify``): size, sha256 and
    sample count (from the tar headers) of each, and with ``decode`` every sample decoded as training decodes
    it (images against the recorded size and channels, labels against the classes, latents against their shape).

    The manifest itself is checked as every reader checks it (:func:`read_manifest`: total = the sum of the
    counts). Returns what was checked when all match; else a DataError whose first line names the manifest
    and whose next lines name every shard that is missing or differs, and the first bad sample of each.
    """
    path = Path(manifest)
    m = read_manifest(path)
    spec = manifest_spec(m) if decode else None
    problems, size_total, samples, failed = [], 0, 0, 0
    for i, s in enumerate(m["shards"]):
        shard = manifest_shard_path(path, i, s["name"])
        before = len(problems)
        if not shard.is_file():
            problems.append(f"{shard}: missing")
            failed += 1
            continue
        size = shard.stat().st_size
        size_total += size
        if "sha256" not in s:
            problems.append(f"{shard}: the manifest records no sha256 to check it against")
        elif "size" in s and s["size"] != size:
            problems.append(f"{shard}: {size} bytes, the manifest records {s['size']}")
        elif file_sha256(shard) != s["sha256"]:
            problems.append(f"{shard}: sha256 differs from the manifest's (the shard changed or is corrupt)")
        try:
            with open(shard, "rb") as f:
                n = count_samples(f, sample_key)
        except (OSError, ValueError) as e:  # TarFormatError, and a member name without an extension
            n = None
            problems.append(f"{shard}: not a readable tar ({e})")
        if n is not None:
            samples += n
            if n != s["count"]:
                problems.append(f"{shard}: holds {n} samples, the manifest records {s['count']}")
            elif decode:
                bad, first = check_shard(str(shard), s["count"], i, spec)
                if bad:
                    problems.append(f"{shard}: {bad} bad sample(s), the first: {first}")
        failed += len(problems) > before
    if problems:
        raise DataError(f"{path}: {failed} of {len(m['shards'])} shard(s) do not match the manifest:\n  "
                        + "\n  ".join(problems))
    return Verified(len(m["shards"]), size_total, samples, spec.describe() if decode else None)

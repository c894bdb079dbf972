"""Reference statistics read back from disk: ``--ref STATS.npz`` files and distgen's own reference cache.

Both are untrusted: a statistics file may come from anywhere (pytorch-fid, torch-fidelity, another lab), and
a cache file may be truncated, stale or edited. What they hold goes straight into FID's matrix square root and
KID's kernels, where a NaN, a non-symmetric or indefinite "covariance" gives a number (nan, a negative FID)
rather than an error. So every array is checked before use:

- sizes first, from the zip and ``.npy`` headers, before anything is decompressed or allocated (an npz is a
  zip archive, and a few bytes can declare terabytes);
- ``mu`` a finite real vector [D]; ``sigma`` finite [D, D], symmetric and positive semi-definite up to
  float rounding (:func:`covariance_problem`); ``features`` finite [N, D]; ``num`` a positive integer equal
  to N when both are given; D that of the extractor's features.

A bad ``--ref`` file is an :class:`EvalError` naming the file and member; a bad cache file is only a
:class:`CacheInvalid` (the caller says so in one line and recomputes).
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from distgen import readback
from distgen.errors import EvalError

GiB = 1 << 30
MAX_DIM = 16384  # features per image (InceptionV3 2048, DINOv2-g 1536, a domain ResNet of width 512 4096)
# Arrays read from one statistics file or cache (uncompressed): ImageNet's 1.28M InceptionV3 pool features in
# float32 are 10.5 GB. Members distgen does not read (ADM's reference batches carry 50,000 images) only count
# towards the file's size.
MAX_STATS_BYTES = 16 * GiB
MAX_FILE_BYTES = 64 * GiB
MAX_MEMBERS = 64
KNOWN = ("mu", "sigma", "features", "num")
# sigma's tolerance per dimension (see covariance_problem): float32's machine epsilon
EPS32 = float(np.finfo(np.float32).eps)
# the largest covariance entry of float32 features: beyond it, FID's product sigma1 @ sigma2 could overflow float64
MAX_SIGMA = float(np.finfo(np.float32).max) ** 2


class CacheInvalid(Exception):
    """A reference cache that must not be used (the reason is the message)."""


# --------------------------------------------------------------------------- the checks
def covariance_tolerance(d: int) -> float:
    """The relative tolerance of :func:`covariance_problem` for a D x D matrix: ``D * eps32``.

    Features are float32, so a covariance is known to float32 precision at best (and some files store it in
    float32). Rounding each entry of a PSD matrix to a relative ``u = eps/2`` moves its eigenvalues by at most
    ``u * ||sigma||_F <= u * sqrt(D) * lambda_max`` (Weyl) and makes ``sigma_ij`` and ``sigma_ji`` differ by at
    most ``eps * max|sigma|``; ``D * eps`` covers both with a margin of ``2 sqrt(D)``, and the float64 summation
    error of distgen's own statistics.
    """
    return d * EPS32


def covariance_problem(sigma: np.ndarray) -> Optional[str]:
    """Why a finite float64 [D, D] ``sigma`` is not a covariance (None if it is one up to float rounding):
    not symmetric within ``tol * max|sigma|``, or an eigenvalue below ``-tol * max|eigenvalue|``."""
    tol = covariance_tolerance(sigma.shape[0])
    scale = float(np.abs(sigma).max()) if sigma.size else 0.0
    asym = float(np.abs(sigma - sigma.T).max()) if sigma.size else 0.0
    if asym > tol * scale:
        return (f"not symmetric: |sigma - sigma^T| reaches {asym:.3g}, more than {tol:.2g} x max|sigma| "
                f"({scale:.3g}) that float rounding allows")
    try:
        w = np.linalg.eigvalsh((sigma + sigma.T) / 2)
    except np.linalg.LinAlgError as e:
        return f"its eigenvalues cannot be computed ({e})"
    top = float(np.abs(w).max()) if w.size else 0.0
    if w.size and w[0] < -tol * top:
        return (f"not positive semi-definite: smallest eigenvalue {w[0]:.4g} against a largest of {top:.4g} (a "
                f"covariance's are >= 0, and float rounding allows -{tol:.2g} x the largest)")
    return None


def _kind_problem(a: np.ndarray, kinds: str) -> Optional[str]:
    if a.dtype.kind not in kinds:
        return f"expected real numbers, got dtype {a.dtype}"
    return None


def check_arrays(arrays: dict[str, np.ndarray], where: Optional[str], dim: Optional[int], error: type
                 ) -> tuple[Optional[int], Optional[dict], Optional[np.ndarray]]:
    """``(num, stats, features)`` from a statistics file's arrays, each checked (see the module's docstring);
    ``num`` None when the file records no image count. ``dim``: the extractor's feature dimension. Errors
    start with ``where`` (the file) when given."""
    def say(msg: str) -> str:
        return f"{where}: {msg}" if where else msg

    def fail(key: str, msg: str):
        raise error(say(f"{key}: {msg}"))

    present = [k for k in KNOWN if k in arrays]
    if ("mu" in arrays) != ("sigma" in arrays):
        have, lack = ("mu", "sigma") if "mu" in arrays else ("sigma", "mu")
        raise error(say(f"holds {have!r} without {lack!r} (FID's statistics are the pair)"))
    if not any(k in arrays for k in ("mu", "features")):
        raise error(say(f"holds neither 'mu' and 'sigma' nor 'features' (its arrays: {', '.join(present) or 'none'})"))
    stats, feats, num = None, None, None
    if "mu" in arrays:
        mu, sigma = arrays["mu"], arrays["sigma"]
        for key, a, kinds in (("mu", mu, "fiu"), ("sigma", sigma, "f")):
            problem = _kind_problem(a, kinds)
            if problem:
                fail(key, problem)
        if sigma.dtype.itemsize < 4:
            fail("sigma", f"dtype {sigma.dtype} cannot hold a covariance to the precision FID needs (float32 or "
                          f"float64)")
        if mu.ndim != 1 or not 1 <= mu.shape[0] <= MAX_DIM:
            fail("mu", f"expected a vector [D] of 1 to {MAX_DIM} numbers, got shape {list(mu.shape)}")
        d = mu.shape[0]
        if sigma.shape != (d, d):
            fail("sigma", f"expected [D, D] = [{d}, {d}] for mu of {d}, got shape {list(sigma.shape)}")
        with np.errstate(over="ignore"):  # beyond float32's range becomes inf, refused below
            mu, sigma = mu.astype(np.float32), sigma.astype(np.float64)  # as torch-fidelity's statistics are
        for key, a in (("mu", mu), ("sigma", sigma)):
            if not np.isfinite(a).all():
                fail(key, f"{int((~np.isfinite(a)).sum())} value(s) not finite (NaN or beyond float32's range)")
        if np.abs(sigma).max() > MAX_SIGMA:
            fail("sigma", f"values up to {np.abs(sigma).max():.3g}, more than a covariance of float32 features "
                          f"holds ({MAX_SIGMA:.3g})")
        problem = covariance_problem(sigma)
        if problem:
            fail("sigma", problem)
        stats = {"mu": mu, "sigma": sigma}
    if "features" in arrays:
        f = arrays["features"]
        problem = _kind_problem(f, "fiu")
        if problem:
            fail("features", problem)
        if f.ndim != 2 or f.shape[0] < 1 or not 1 <= f.shape[1] <= MAX_DIM:
            fail("features", f"expected [N, D] (N >= 1 images, D <= {MAX_DIM}), got shape {list(f.shape)}")
        if stats is not None and f.shape[1] != stats["mu"].shape[0]:
            fail("features", f"{f.shape[1]} per image, but mu has {stats['mu'].shape[0]}")
        with np.errstate(over="ignore"):
            feats = f.astype(np.float32)
        if not np.isfinite(feats).all():
            fail("features", f"{int((~np.isfinite(feats)).sum())} value(s) not finite (NaN or beyond float32's "
                             f"range)")
    if "num" in arrays:
        n = arrays["num"]
        if n.dtype.kind not in "iu" or n.size != 1 or n.ndim > 1:
            fail("num", f"expected one integer, got dtype {n.dtype} of shape {list(n.shape)}")
        num = int(n.reshape(()))
        if not 1 <= num <= readback.MAX_COUNT:
            fail("num", f"{num} is out of range [1, {readback.MAX_COUNT}]")
        if feats is not None and num != len(feats):
            fail("num", f"{num} images, but 'features' holds {len(feats)}")
    elif feats is not None:
        num = len(feats)
    d = stats["mu"].shape[0] if stats is not None else feats.shape[1]
    if dim is not None and d != dim:
        raise error(say(f"statistics of dimension {d}, but the extractor's features have {dim} (made with "
                        f"another extractor or layer?)"))
    return num, stats, feats


# --------------------------------------------------------------------------- .npz statistics files
def _npy_header(f, name: str, where: Path) -> tuple[tuple, np.dtype, int]:
    """(shape, dtype, header bytes) of a ``.npy`` member, read without reading its data."""
    from numpy.lib import format as npy

    try:
        version = npy.read_magic(f)
        if version == (1, 0):
            shape, _fortran, dtype = npy.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _fortran, dtype = npy.read_array_header_2_0(f)
        else:
            raise ValueError(f".npy format version {version[0]}.{version[1]} (distgen reads 1.0 and 2.0)")
    except ValueError as e:
        raise EvalError(f"{where}: {name}: not a readable .npy array ({e})") from None
    return shape, dtype, f.tell()


def read_npz(path: Path, dim: Optional[int], log=print) -> tuple[Optional[int], Optional[dict], Optional[np.ndarray]]:
    """A ``--ref`` statistics file: ``(num, stats, features)`` as :func:`check_arrays` gives them, or an
    :class:`EvalError` naming the file and member."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise EvalError(f"{path}: reference statistics file not found") from None
    except OSError as e:
        raise EvalError(f"{path}: unreadable ({e.strerror or e})") from None
    if not path.is_file():
        raise EvalError(f"{path}: not a file (a .npz statistics file was expected)")
    if size > MAX_FILE_BYTES:
        raise EvalError(f"{path}: {size} bytes, more than a statistics file may hold ({MAX_FILE_BYTES})")
    try:
        z = zipfile.ZipFile(path)
    except Exception as e:  # BadZipFile, OSError, struct.error ...: a file that is not a whole zip archive
        raise EvalError(f"{path}: not a readable .npz statistics file (a zip archive of .npy arrays: {e})") from None
    with z:
        infos = z.infolist()
        if len(infos) > MAX_MEMBERS:
            raise EvalError(f"{path}: {len(infos)} members, more than a statistics file has ({MAX_MEMBERS})")
        members, other = {}, []
        for info in infos:
            key = info.filename[:-4] if info.filename.endswith(".npy") else None
            if key not in KNOWN:
                other.append(info.filename)
                continue
            if key in members:
                raise EvalError(f"{path}: holds {info.filename!r} twice")
            members[key] = info
        total = sum(i.file_size for i in members.values())
        if total > MAX_STATS_BYTES:  # the zip header's sizes: nothing decompressed yet
            big = max(members.values(), key=lambda i: i.file_size)
            raise EvalError(f"{path}: its arrays unpack to {total} bytes ({big.filename}: {big.file_size}), more "
                            f"than distgen reads from a statistics file ({MAX_STATS_BYTES})")
        arrays = {}
        try:
            for key, info in members.items():
                with z.open(info) as f:
                    shape, dtype, header = _npy_header(f, info.filename, path)
                if dtype.hasobject:
                    raise EvalError(f"{path}: {info.filename}: holds Python objects (dtype {dtype}); distgen does "
                                    f"not unpickle them")
                nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
                if header + nbytes != info.file_size:  # before numpy allocates what the header declares
                    raise EvalError(f"{path}: {info.filename}: its header declares {list(shape)} of {dtype} "
                                    f"({nbytes} bytes), but the member holds {info.file_size - header}")
                with z.open(info) as f:
                    arrays[key] = np.lib.format.read_array(f, allow_pickle=False)
        except EvalError:
            raise
        except Exception as e:  # a corrupt deflate stream (zlib.error), an encrypted member, a short read ...
            raise EvalError(f"{path}: not a readable .npz statistics file ({type(e).__name__}: {e})") from None
    if other:
        log(f"distgen eval: {path}: ignoring member(s) {', '.join(other[:8])}{' ...' if len(other) > 8 else ''} "
            f"(distgen reads {', '.join(KNOWN)})")
    return check_arrays(arrays, str(path), dim, EvalError)


# --------------------------------------------------------------------------- the reference cache
CACHE_FORMAT = "distgen-refstats/1"
_FEATURES = "features/"


_ST_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I32": np.int32, "I64": np.int64}
_ST_TENSOR = readback.Obj({"dtype": readback.Str(16),
                           "shape": readback.List(readback.Int(0, readback.MAX_COUNT), max_len=8),
                           "data_offsets": readback.List(readback.Int(0, MAX_STATS_BYTES), min_len=2, max_len=2)})


def read_safetensors(path: Path, error: type = CacheInvalid) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """``(metadata, arrays)`` of a safetensors file read whole into memory (no memory map, which a file
    truncated meanwhile would turn into a crash) and checked: header, dtypes, and shapes that fit their bytes."""
    try:
        size = path.stat().st_size
        if size > MAX_STATS_BYTES:
            raise error(f"{size} bytes, more than distgen writes ({MAX_STATS_BYTES})")
        with open(path, "rb") as f:
            data = f.read(MAX_STATS_BYTES + 1)
    except OSError as e:
        raise error(f"unreadable ({e.strerror or e})") from None
    if len(data) > MAX_STATS_BYTES:
        raise error(f"more than {MAX_STATS_BYTES} bytes")
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if not 0 <= n <= min(len(data) - 8, 100 * readback.MiB):  # safetensors' own header limit
        raise error(f"not a safetensors file (header of {n} bytes in a file of {len(data)})")
    header = readback.parse_json(data[8:8 + n], "header", error)
    if not isinstance(header, dict):
        raise error("header: not a JSON object")
    meta = readback.Map(readback.Str(1 << 24)).check(header.pop("__metadata__", {}), readback.Where("metadata"), error)
    base, arrays = 8 + n, {}
    for name, t in readback.Map(_ST_TENSOR, max_len=64).check(header, readback.Where("header"), error).items():
        if t["dtype"] not in _ST_DTYPES:
            raise error(f"{name}: dtype {t['dtype']!r}, not one distgen writes here")
        dtype = np.dtype(_ST_DTYPES[t["dtype"]])
        begin, end = t["data_offsets"]
        count = int(np.prod(t["shape"], dtype=object))
        if end - begin != count * dtype.itemsize or base + end > len(data):
            raise error(f"{name}: {t['shape']} of {dtype} does not fit its bytes {begin} to {end} (of "
                        f"{len(data) - base})")
        arrays[name] = np.frombuffer(data, dtype, count, base + begin).reshape(t["shape"])
    return meta, arrays


def read_cache(path: Path, desc: dict, dim: int, feature_layer: Optional[str], need_stats: bool,
               need_feats: bool, expected: Optional[int]) -> tuple[int, Optional[dict], dict[str, torch.Tensor]]:
    """``(num, stats, {layer: features})`` from a cache file :func:`write_cache` wrote for ``desc``, or
    :class:`CacheInvalid` saying why it cannot be used. ``expected``: the image count the shards' manifests
    record, if they do."""
    meta, tensors = read_safetensors(path)
    if meta.get("format") != CACHE_FORMAT:
        raise CacheInvalid(f"format {str(meta.get('format'))[:40]!r}, not {CACHE_FORMAT}")
    allowed = {"mu", "sigma"} | ({_FEATURES + feature_layer} if feature_layer else set())
    unknown = sorted(set(tensors) - allowed)
    if unknown:
        raise CacheInvalid(f"holds tensors distgen does not write here ({', '.join(unknown[:4])})")
    num = meta.get("num")
    if not isinstance(num, str) or not re.fullmatch(r"[0-9]{1,13}", num) or not 2 <= int(num) <= readback.MAX_COUNT:
        raise CacheInvalid(f"num {str(num)[:40]!r} is not an image count of at least 2")
    num = int(num)
    stored = readback.parse_json(meta.get("description", ""), "description", CacheInvalid)
    if stored != json.loads(json.dumps(desc)):
        raise CacheInvalid("written for other shards, extractor or settings (its description differs)")
    if expected is not None and num != expected:
        raise CacheInvalid(f"holds statistics of {num} images, the manifest records {expected}")
    # distgen writes mu float32, sigma float64 and features float32
    for key, dtype in (("mu", np.float32), ("sigma", np.float64)) + (
            ((_FEATURES + feature_layer, np.float32),) if feature_layer else ()):
        if key in tensors and tensors[key].dtype != dtype:
            raise CacheInvalid(f"{key}: dtype {tensors[key].dtype}, distgen writes {np.dtype(dtype)}")
    arrays = {k: v for k, v in tensors.items() if k in ("mu", "sigma")}
    feat_key = _FEATURES + feature_layer if feature_layer else None
    if feat_key in tensors:
        arrays["features"] = tensors[feat_key]
    arrays["num"] = np.array(num)
    if need_stats and "mu" not in arrays:
        raise CacheInvalid("holds no mu and sigma, which FID needs")
    if need_feats and "features" not in arrays:
        raise CacheInvalid("holds no features, which KID and precision/recall need")
    num, stats, feats = check_arrays(arrays, None, dim, CacheInvalid)
    return num, stats, ({feature_layer: torch.from_numpy(feats)} if feats is not None else {})


def write_cache(path: Path, num: int, stats: Optional[dict], features: dict[str, torch.Tensor], desc: dict) -> None:
    """Write a cache file atomically (a temporary file renamed over ``path``)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {_FEATURES + k: v.contiguous() for k, v in features.items()}
    if stats is not None:
        tensors["mu"] = torch.from_numpy(np.ascontiguousarray(stats["mu"]))
        tensors["sigma"] = torch.from_numpy(np.ascontiguousarray(stats["sigma"]))
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={"format": CACHE_FORMAT, "num": str(num),
                                               "description": json.dumps(desc)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

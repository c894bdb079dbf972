"""Post-hoc EMA (EDM2, Karras et al. 2024): snapshots of power-function EMAs during training, and the
reconstruction of an EMA of any other width from them afterwards.

A power-function EMA of relative width sigma_rel, read at time t (samples seen), averages the weights with
the profile p(t') = (gamma + 1) / t * (t' / t) ** gamma on [0, t] (gamma from sigma_rel, distgen.ema). Every
snapshot i holds such averages for the tracked widths, so it is a known profile p_i; the weights of a
profile are linear in it. The reconstruction of a target profile q is the combination sum_i x_i p_i closest
to q in L2: the normal equations A x = b with A_ij = <p_i, p_j>, b_i = <p_i, q>, in closed form for power
profiles (EDM2's eq. 151, :func:`correlation`). The same inner products give the fit's residual
||q - sum_i x_i p_i|| / ||q||, printed for every width; widths the snapshots cannot fit are refused.

Snapshots live in ``RUN_DIR/ema-snapshots/``: one safetensors file per snapshot (every network's tracked
EMAs and its buffers), written atomically, and ``index.json`` listing them with their step, samples seen,
widths, size and sha256.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np

from distgen import checkpoint as ckpt
from distgen import readback as rb
from distgen.durable import fsync_path, write_text_durably
from distgen.ema import std_to_exp
from distgen.data.shard import file_sha256
from distgen.errors import SampleError

# the index's names and reader live in distgen.snapshots (light: `distgen status` reads it); re-exported here
from distgen.snapshots import DTYPES, INDEX, MAX_SIGMA_REL, SNAPSHOT_DIR, read_index, snapshot_name


# --------------------------------------------------------------------------- the maths
def correlation(a_t, a_std, b_t, b_std) -> np.ndarray:
    """<p_a, p_b> of power profiles read at times a_t, b_t with widths a_std, b_std (broadcast; EDM2 eq. 151):
    for a_t <= b_t, (ga + 1)(gb + 1) / (ga + gb + 1) * (a_t / b_t) ** gb / b_t, and symmetrically."""
    a_t, a_std, b_t, b_std = (np.asarray(v, dtype=np.float64) for v in (a_t, a_std, b_t, b_std))
    ga, gb = np.vectorize(std_to_exp)(a_std), np.vectorize(std_to_exp)(b_std)
    ratio = a_t / b_t
    exp = np.where(a_t < b_t, gb, -ga)
    return (ga + 1) * (gb + 1) * ratio ** exp / ((ga + gb + 1) * np.maximum(a_t, b_t))


def solve(in_t, in_std, out_t, out_std) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients X [inputs, outputs] of the least-squares fit of each output profile by the input ones
    (columns summing to 1, as an average's weights must), and each fit's relative residual."""
    in_t, in_std = (np.asarray(v, dtype=np.float64).reshape(-1) for v in np.broadcast_arrays(in_t, in_std))
    out_t, out_std = (np.asarray(v, dtype=np.float64).reshape(-1) for v in np.broadcast_arrays(out_t, out_std))
    A = correlation(in_t[:, None], in_std[:, None], in_t[None, :], in_std[None, :])
    B = correlation(in_t[:, None], in_std[:, None], out_t[None, :], out_std[None, :])
    # lstsq, not solve: neighbouring snapshots' profiles are close to collinear
    X = np.linalg.lstsq(A, B, rcond=None)[0]
    X = X / X.sum(axis=0, keepdims=True)
    qq = correlation(out_t, out_std, out_t, out_std)
    err2 = qq - 2 * np.einsum("io,io->o", X, B) + np.einsum("io,ij,jo->o", X, A, X)
    return X, np.sqrt(np.maximum(err2, 0) / qq)


def representable(in_t, in_std, out_t: float, max_residual: float) -> Optional[tuple[float, float]]:
    """The range of widths at ``out_t`` the inputs fit within ``max_residual`` (on a fine log grid), or None."""
    grid = np.geomspace(0.005, MAX_SIGMA_REL * 0.999, 400)
    _, res = solve(in_t, in_std, np.full_like(grid, out_t), grid)
    ok = grid[res <= max_residual]
    return (float(ok.min()), float(ok.max())) if len(ok) else None


# --------------------------------------------------------------------------- snapshots during training
def snapshot_due(nimg: int, batch: int, snapshot_kimg: Optional[float]) -> bool:
    """Did this step (ending at ``nimg`` samples, ``batch`` of them new) cross a multiple of snapshot_kimg?"""
    if not snapshot_kimg:
        return False
    every = max(round(snapshot_kimg * 1000), 1)  # in whole samples
    return nimg // every > (nimg - batch) // every


def _write_index(folder: Path, entries: list[dict]) -> None:
    write_text_durably(folder / INDEX, json.dumps({"snapshots": entries}, indent=1) + "\n")


def write_snapshot(run_dir: Path, emas: dict, step: int, nimg: int, dtype: str) -> Path:
    """Rank 0: every network's tracked EMAs (in ``dtype``) and buffers into one file, atomically, then listed
    in the index (a snapshot of the same sample count, from a run resumed before it, is replaced)."""
    import torch

    from safetensors.torch import save_file

    folder = Path(run_dir) / SNAPSHOT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    cast = getattr(torch, DTYPES[dtype])
    tensors, stds = {}, None
    for net, e in emas.items():
        states, _ = e.state()
        params = {n for n, _ in e.module.named_parameters()}
        for k, state in enumerate(states):
            for name, t in state.items():
                if name in params:
                    tensors[f"{net}/{k}/{name}"] = t.detach().to("cpu", cast).contiguous()
                elif k == 0:
                    tensors[f"{net}/buffers/{name}"] = t.detach().cpu().contiguous()
        net_stds = [ema.sigma_rel for ema in e.emas]
        if stds is not None and stds != net_stds:
            raise ValueError("every network's power EMAs must have the same widths")
        stds = net_stds
    path = folder / snapshot_name(nimg)
    tmp = folder / f".{path.name}.tmp"
    save_file(tensors, str(tmp), metadata={"step": str(step), "nimg": str(nimg), "stds": json.dumps(stds),
                                           "networks": json.dumps(sorted(emas)), "dtype": dtype})
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(folder)
    entries = [e for e in read_index(run_dir, must_exist=False) if e["nimg"] != nimg]
    entries.append({"file": path.name, "step": step, "nimg": nimg, "stds": stds, "size": path.stat().st_size,
                    "sha256": file_sha256(path), "dtype": dtype})
    _write_index(folder, sorted(entries, key=lambda e: e["nimg"]))
    return path


def drop_snapshots_after(run_dir: Path, nimg: int) -> int:
    """Rank 0, at a resume from ``nimg`` samples: forget (and delete) the snapshots a stopped run took after
    that point; the resumed run takes them again. Returns how many."""
    folder = Path(run_dir) / SNAPSHOT_DIR
    entries = read_index(run_dir, must_exist=False)
    later = [e for e in entries if e["nimg"] > nimg]
    if later:
        _write_index(folder, [e for e in entries if e["nimg"] <= nimg])
        for e in later:
            # distgen's own snapshot files: read_index let through only names of its form, inside the folder
            # (a link there is removed, never what it points to)
            (folder / e["file"]).unlink(missing_ok=True)
    return len(later)


# --------------------------------------------------------------------------- reconstruction
def check_snapshots(run_dir: Path, entries: list[dict]) -> None:
    """Every listed snapshot present, of its recorded size and hash: a SampleError naming the first that is not."""
    folder = Path(run_dir) / SNAPSHOT_DIR
    if not entries:
        raise SampleError(f"{folder / INDEX}: lists no snapshots")
    for e in entries:
        path = rb.inside(folder, e["file"], folder / INDEX, SampleError)
        if not path.is_file():
            raise SampleError(f"{path}: listed in {folder / INDEX} but missing")
        size = path.stat().st_size
        if size != e["size"]:
            raise SampleError(f"{path}: {size} bytes, the index recorded {e['size']} (truncated or replaced)")
        if file_sha256(path) != e["sha256"]:
            raise SampleError(f"{path}: its sha256 differs from the one the index recorded (damaged)")


class Reconstruction:
    """The fit of the requested widths from a run's snapshots (read at the last snapshot's time)."""

    def __init__(self, run_dir: Path, sigmas: list[float], max_residual: float, up_to: Optional[int] = None):
        self.run_dir = Path(run_dir)
        self.entries = read_index(self.run_dir)
        if up_to is not None:  # as of a checkpoint (ema --checkpoint): the snapshots taken until its sample count
            later = self.entries
            self.entries = [e for e in self.entries if e["nimg"] <= up_to]
            if later and not self.entries:
                raise SampleError(f"{self.run_dir / SNAPSHOT_DIR / INDEX}: no snapshot up to {up_to / 1000:g} kimg "
                                  f"(the checkpoint's); the first is at {later[0]['nimg'] / 1000:g} kimg")
        check_snapshots(self.run_dir, self.entries)
        self.t = self.entries[-1]["nimg"]
        self.networks = _read_networks(self.run_dir / SNAPSHOT_DIR / self.entries[-1]["file"])
        self.in_t = np.array([e["nimg"] for e in self.entries for _ in e["stds"]], dtype=np.float64)
        self.in_std = np.array([s for e in self.entries for s in e["stds"]], dtype=np.float64)
        self.range = representable(self.in_t, self.in_std, self.t, max_residual)
        self.sigmas = list(sigmas)
        bad = [s for s in self.sigmas if not 0 < s < MAX_SIGMA_REL]
        if bad:
            raise SampleError(f"--sigma-rel {bad[0]:g}: a power-function EMA's width is in (0, {MAX_SIGMA_REL:.4f})")
        self.X, self.residual = solve(self.in_t, self.in_std, np.full(len(self.sigmas), float(self.t)), self.sigmas)
        far = [(s, r) for s, r in zip(self.sigmas, self.residual) if r > max_residual]
        if far:
            s, r = far[0]
            cover = (f"they represent sigma_rel {self.range[0]:.3f} to {self.range[1]:.3f}" if self.range
                     else "they represent no width that well")
            raise SampleError(f"--sigma-rel {s:g}: the {len(self.entries)} snapshots in {self.run_dir / SNAPSHOT_DIR} "
                              f"fit it only to a relative residual of {r:.3f} (limit {max_residual:g}, "
                              f"--max-residual); {cover}")

    def weights(self, columns: Optional[list[int]] = None) -> list[dict[str, dict]]:
        """For each requested width (or ``columns`` of them): {network: state dict} of the reconstructed EMA,
        the buffers from the last snapshot. Streams over the snapshots: one is in memory at a time, beside
        one float32 sum per output."""
        import torch
        from safetensors import safe_open

        cols = list(range(len(self.sigmas))) if columns is None else columns
        outs: list[dict[str, dict]] = [{} for _ in cols]
        row = 0
        folder = self.run_dir / SNAPSHOT_DIR
        last = len(self.entries) - 1
        for i, e in enumerate(self.entries):
            path = folder / e["file"]
            try:
                with safe_open(str(path), "pt") as f:
                    for key in f.keys():  # "<net>/<EMA index>/<name>" or "<net>/buffers/<name>"
                        net, k, name = key.split("/", 2)
                        if k == "buffers":
                            if i == last:
                                for o in outs:
                                    o.setdefault(net, {})[name] = f.get_tensor(key)
                            continue
                        t, coef = f.get_tensor(key).to(torch.float32), self.X[row + int(k)]
                        for o, c in zip(outs, cols):
                            acc = o.setdefault(net, {})
                            acc[name] = acc[name] + float(coef[c]) * t if name in acc else float(coef[c]) * t
            except Exception as err:
                raise SampleError(f"{path}: not a readable snapshot ({ckpt.first_line(err)})") from None
            row += len(e["stds"])
        return outs


def _read_networks(path: Path) -> list[str]:
    """The networks a snapshot holds (its header's metadata)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            text = (f.metadata() or {}).get("networks", "")
    except Exception as err:
        raise SampleError(f"{path}: not a readable snapshot ({ckpt.first_line(err)})") from None
    return rb.List(rb.Str(max_len=64), min_len=1, max_len=100).check(
        rb.parse_json(text, f"{path}: metadata 'networks'", SampleError), rb.Where(path, "networks"), SampleError)


def parse_sigmas(text: str) -> list[float]:
    try:
        out = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SampleError(f"--sigma-rel {text!r}: expected comma-separated numbers, e.g. 0.05,0.08,0.12") from None
    if not out:
        raise SampleError("--sigma-rel: no width given")
    return out


def parse_sweep(text: str) -> list[float]:
    """``LO:HI:N`` -> N widths evenly spaced from LO to HI."""
    try:
        lo, hi, n = text.split(":")
        lo, hi, n = float(lo), float(hi), int(n)
    except ValueError:
        raise SampleError(f"--sweep {text!r}: expected LO:HI:N, e.g. 0.02:0.20:10") from None
    if n < 2 or not 0 < lo < hi:
        raise SampleError(f"--sweep {text!r}: needs 0 < LO < HI and N >= 2")
    return [float(x) for x in np.linspace(lo, hi, n)]


"""Reference statistics and features for FID / KID / PR: read from a statistics file, from distgen's cache on
disk, or computed in one exact pass over the reference shards (and cached). Reading files back, and checking
what they hold, is :mod:`distgen.evaluate.refstats`.

Reference statistics from shards are one exact pass over the data: each rank sums its features and their outer
products in float64, the sums are added across ranks, and mean and covariance follow. They are cached on disk,
keyed by the shards (manifest, sizes, mtimes), the extractor's weights, the layer and the image geometry.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from distgen import dist, readback
from distgen.errors import EvalError
from distgen.evaluate import passes, refstats
from distgen.evaluate.refstats import CACHE_FORMAT
from distgen.evaluate.spec import EvalSpec


@dataclass
class Reference:
    num: Optional[int]  # None: a statistics file of mu and sigma that records no image count
    stats: Optional[dict] = None  # {"mu", "sigma"} of the FID layer
    features: dict[str, torch.Tensor] = field(default_factory=dict)  # per layer, input order
    cache: str = "none"  # "hit", "miss" or "none"
    source: str = ""


def default_cache_dir() -> Path:
    return Path(os.environ.get("DISTGEN_CACHE", Path.home() / ".cache" / "distgen")) / "reference"


class ReferenceLoader:
    """One load of the reference of ``spec`` for the ``active`` reference metrics (those asked for and not
    skipped) with ``extractor``; metrics a statistics file rules out go to ``skipped``, saying why."""

    def __init__(self, spec: EvalSpec, extractor, device: torch.device, active: list[str], skipped: dict[str, str],
                 log: Callable[[str], None]):
        self.spec, self.extractor, self.device, self.log = spec, extractor, device, log
        self.active, self.skipped = list(active), skipped

    def _active(self, metrics) -> list[str]:
        return [m for m in metrics if m in self.active]

    def load(self, data_cfg) -> Reference:
        """Reference features/statistics for the FID/KID/PR layers (cached on disk)."""
        ref = list(self.spec.ref)
        if len(ref) == 1 and ref[0].endswith(".npz"):
            return self.from_file(Path(ref[0]))
        self.resize_path(ref, data_cfg)
        layers = {self.extractor.layers[m] for m in self.active}
        key, desc = self.cache_key(ref, data_cfg, sorted(layers))
        cache_dir = Path(self.spec.cache_dir) if self.spec.cache_dir else default_cache_dir()
        path = cache_dir / f"ref-{key[:24]}.safetensors"
        cached = self.read_cache(path, desc, ref) if path.is_file() else None
        # Every rank must agree on hit or miss: they all take part in a recomputation.
        hit = dist.all_reduce_sum(int(cached is not None)) == dist.world_size()
        if cached is not None and not hit and dist.is_main():
            self.log(f"distgen eval: reference cache {path} did not load on every process; recomputing it")
        if hit:
            cached.cache = "hit"
            cached.source = str(path)
            return cached
        reference = self.compute(ref, data_cfg)
        reference.cache, reference.source = "miss", str(path)
        if dist.is_main():
            try:
                refstats.write_cache(path, reference.num, reference.stats, reference.features, desc)
            except Exception as e:  # best effort: a full or read-only disk costs the next evaluation a recomputation
                why = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
                self.log(f"distgen eval: could not write the reference cache {path} ({why}); going on without it")
        dist.barrier()
        return reference

    def layer(self) -> str:
        """The extractor's layer of the reference statistics and features (FID, KID and PR share it)."""
        lay = self.extractor.layers
        return lay.get("fid") or lay.get("kid") or lay.get("prc")

    def resize_path(self, ref: list[str], data_cfg) -> None:
        """Say how real and generated images reach the extractor when their sizes differ.

        One resize path (clean-fid's lesson: FD of the same images moves by whole units between resize
        filters): reference images are read at the model's size exactly as training read them (``data.resize``,
        the pipeline's PIL resampling), generated images are not resampled, and both then go through the
        extractor's own input resize alike. So real images read at another size score at the floor against
        themselves. The alternative, bringing samples back to the data's stored size, is not neutral: test
        images read at 32x32 and brought back to 28x28 sit at 27x the real-vs-real floor of the bundled
        Fashion-MNIST extractor (its calibration's "via 32px" row), a handicap of every 32x32 model."""
        from distgen.data import resolve_shards

        if not dist.is_main():
            return
        size = resolve_shards(ref).meta.get("image_size")
        res = data_cfg.resolution
        if size and tuple(size) == (res, res):
            return
        stored = f"holds {size[0]}x{size[1]} images" if size else "has no single stored size"
        self.log(f"distgen eval: the reference {stored}, the model makes {res}x{res}: reference images are read at "
                 f"{res}x{res} as training read them (data.resize {data_cfg.resize}), generated images are not "
                 f"resampled, and both reach the extractor alike")

    def cache_key(self, ref: list[str], data_cfg, layers: list[str]) -> tuple[str, dict]:
        from distgen.data import resolve_shards

        shards = resolve_shards(ref)
        files = []
        for u in shards.urls:
            if u.startswith("pipe:"):
                files.append([u])
            else:
                st = os.stat(u)
                files.append([os.path.abspath(u), st.st_size, st.st_mtime_ns])
        # by hash: a cluster's manifest may be hundreds of MB, more than a safetensors header holds
        manifests = [hashlib.sha256(readback.read_bytes(Path(r), 256 * readback.MiB, EvalError, "manifest")).hexdigest()
                     for r in ref if r.endswith(".json")]
        desc = {"format": CACHE_FORMAT, "shards": files, "manifests": manifests, "extractor": self.extractor.identity,
                "layers": layers, "resolution": data_cfg.resolution, "channels": data_cfg.channels,
                "resize": data_cfg.resize, "side": self.side(ref)}
        return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest(), desc

    def read_cache(self, path: Path, desc: dict, ref: list[str]) -> Optional[Reference]:
        """The cached reference, or None (saying why in one line) when the file cannot be used as it is."""
        from distgen.data import resolve_shards

        layer = self.layer()
        try:
            num, stats, feats = refstats.read_cache(
                path, desc, self.extractor.dim(layer), layer, need_stats=bool(self._active(["fid"])),
                need_feats=bool(self._active(("kid", "prc"))), expected=resolve_shards(ref).total)
        except refstats.CacheInvalid as e:
            if dist.is_main():
                self.log(f"distgen eval: ignoring the reference cache {path}: {e}; recomputing it")
            return None
        return Reference(num=num, stats=stats, features=feats)

    def from_file(self, path: Path) -> Reference:
        """A statistics file: ``mu`` and ``sigma`` of the FID layer (pytorch-fid / torch-fidelity layout),
        optionally ``features`` for KID and PR and ``num``, each checked (:mod:`distgen.evaluate.refstats`)."""
        layer = self.layer()
        num, stats, feats = refstats.read_npz(path, self.extractor.dim(layer),
                                              log=self.log if dist.is_main() else (lambda _msg: None))
        if stats is None and self._active(["fid"]):
            raise EvalError(f"{path}: holds no 'mu' and 'sigma' (FID needs them)")
        features = {layer: torch.from_numpy(feats)} if feats is not None else {}
        if not features:
            for m in self._active(("kid", "prc")):
                self.skipped[m] = f"the statistics file {path} holds no 'features' array"
        return Reference(num=num, stats=stats, features=features, source=str(path))

    def compute(self, ref: list[str], data_cfg) -> Reference:
        from distgen.data import make_loader, resolve_shards

        # Reference images need no labels, even for a class-conditional run (a folder of unlabelled images will do).
        data_cfg = replace(data_cfg, labels=False)
        loader = make_loader(ref, data_cfg, batch_size=self.spec.batch_size, mode="eval", rank=dist.rank(),
                             world=dist.world_size(), as_float=False, pin_memory=self.device.type == "cuda")
        fid_layer = self.extractor.layers.get("fid")
        feat_layers = {self.extractor.layers[m] for m in self._active(("kid", "prc"))}
        s1 = s2 = None
        n = 0
        idx, kept = [], {k: [] for k in feat_layers}
        side = self.side(ref)
        for batch in loader:
            out = self.extractor(batch[side])
            if fid_layer is not None:  # the sums in float64 on the extractor's device, read once at the end
                f = out[fid_layer].double()
                s1 = f.sum(0) if s1 is None else s1 + f.sum(0)
                s2 = f.T @ f if s2 is None else s2 + f.T @ f
            n += len(batch["key"])
            if feat_layers:
                idx.append(np.asarray(batch["index"]))
                for k in feat_layers:
                    kept[k].append(out[k])  # left on the device until gathered
        total = int(dist.all_reduce_sum(n))
        expected = resolve_shards(ref).total
        if expected is not None and total != expected:
            # Statistics of other images than the manifest lists would be compared as if they were its.
            skipped = int(dist.all_reduce_sum(loader.skipped))
            manifests = ", ".join(r for r in ref if r.endswith(".json")) or ", ".join(ref)
            raise EvalError(f"{manifests}: the manifest records {expected} images, the reference pass read {total}"
                            + (f" ({skipped} bad sample(s) skipped: data.on_error is skip)" if skipped else "")
                            + f"; `distgen data verify {manifests}` checks the shards against it")
        if total < 2:
            raise EvalError(f"reference {ref}: {total} image(s); statistics need at least 2")
        stats = None
        if fid_layer is not None:
            if s1 is None:  # this rank's share was empty: zeros of the right size for the sums
                d = self.extractor.dim(fid_layer)
                s1 = torch.zeros(d, dtype=torch.float64, device=self.device)
                s2 = torch.zeros(d, d, dtype=torch.float64, device=self.device)
            dev = "cuda" if dist.initialized() and torch.distributed.get_backend() == "nccl" else "cpu"
            s1 = dist.all_reduce_tensor_(s1.to(dev)).cpu()
            s2 = dist.all_reduce_tensor_(s2.to(dev)).cpu()
            mu = s1 / total
            sigma = (s2 - total * torch.outer(mu, mu)) / (total - 1)
            # float32 mean as torch-fidelity keeps it; float64 covariance as np.cov gives it
            stats = {"mu": mu.numpy().astype(np.float32), "sigma": sigma.numpy()}
        feats = passes.gather_in_order(idx, kept) if feat_layers else {}
        if dist.is_main():
            self.log(f"distgen eval: reference {', '.join(ref)}: {total} images")
        return Reference(num=total, stats=stats, features=feats or {})

    def side(self, ref: list[str]) -> str:
        """The batch key of reference images: paired shards hold the target domain on the side a translation
        goes to (``b`` for AtoB)."""
        from distgen.data import resolve_shards

        if resolve_shards(ref).meta.get("layout") == "paired":
            return "b" if self.spec.direction == "AtoB" else "a"
        return "image"

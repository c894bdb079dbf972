"""Distributed evaluation: every rank extracts features of its share, rank 0 computes the metrics.

- Generated images: image ``i`` comes from the seed (seed, i) and indices are
  dealt in fixed blocks (see :mod:`distgen.sample`), so the image set, and the
  metric, do not depend on the number of processes.
- Features come from torch-fidelity's extractors; rank 0 gathers them (uneven
  shares are fine), puts them back in index order, and hands them to
  torch-fidelity's own statistics and metric functions (KID's subsets and
  IS's splits depend on that order, so it matches a one-process run).
- Reference statistics from shards are one exact pass over the data: each rank
  sums its features and their outer products in float64, the sums are added
  across ranks, and mean and covariance follow. They are cached on disk, keyed
  by the shards (manifest, sizes, mtimes), the extractor's weights, the layer
  and the image geometry.
- ``bpd``: the family supplies log p(x) per image (or a lower bound); the
  pass over the test split, the sum across ranks and the units are here.
- ``recon``: the family reconstructs the test split (a VAE); PSNR and SSIM
  (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5) per image on the
  0..255 scale, averaged over every image once.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_featuresdict_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_featuresdict_to_metric
from torch_fidelity.metric_prc import (KEY_METRIC_F_SCORE, KEY_METRIC_PRECISION, KEY_METRIC_RECALL,
                                       prc_featuresdict_to_metric)

from distgen import dist, readback
from distgen.config.schema import FOUNDATION_EXTRACTORS, METRICS, result_key, sample_count_problem
from distgen.evaluate import refstats
from distgen.evaluate.extractors import DOMAIN, EvalError, Extractor, WeightsUnavailable, describe_domain
from distgen.evaluate.refstats import CACHE_FORMAT
from distgen.families.capabilities import Classifies, Likelihood, Reconstructs, Translates, missing, offers

FEATURE_METRICS = ("fid", "kid", "isc", "prc")
REFERENCE_METRICS = ("fid", "kid", "prc")
# the keys each metric puts in the results
METRIC_KEYS = {"fid": ("fid",), "kid": ("kid_mean", "kid_std"), "isc": ("isc_mean", "isc_std"),
               "prc": ("precision", "recall", "f_score")}
# torch-fidelity's defaults, passed explicitly so a one-process torch-fidelity run with the same
# values gives the same numbers.
FIDELITY_KWARGS = dict(isc_splits=10, samples_shuffle=True, rng_seed=2020, kid_subsets=100,
                       kid_degree=3, kid_gamma=None, kid_coef0=1, kid_kernel="poly", kid_mmd_estimator="unbiased",
                       prc_neighborhood=3, prc_batch_size=10000, save_cpu_ram=False, verbose=False)


def parse_metrics(text: str | Iterable[str], where: str = "--metrics") -> tuple[str, ...]:
    items = [m.strip() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    bad = [m for m in items if m not in METRICS]
    if bad or not items:
        raise EvalError(f"{where}: unknown metric(s) {', '.join(bad) or '(none given)'}; choose from {', '.join(METRICS)}")
    return tuple(dict.fromkeys(items))


@dataclass
class EvalSpec:
    metrics: tuple[str, ...] = ("fid",)
    num_samples: int = 10000
    ref: Optional[list[str]] = None  # shards/manifest, or a .npz statistics file
    test: Optional[list[str]] = None  # shards for bpd
    batch_size: Optional[int] = None  # None: 256 on CUDA, 64 on CPU
    seed: int = 0
    feature_extractor: str = "inception"  # dinov2-vit-s-14, clip-vit-b-32, ..., or the path of a `fit-features` file
    inception_weights: Optional[str] = None
    extractor_weights: Optional[str] = None  # DINOv2 / CLIP weights; default: torch hub's cache (never downloaded)
    cache_dir: Optional[str] = None
    kid_subset_size: int = 1000
    sampling: dict = field(default_factory=dict)  # family.sample options (steps, truncation, ...)
    likelihood: dict = field(default_factory=dict)  # family.log_likelihood options (iw_samples)
    direction: str = "AtoB"  # translators: which way the test inputs are translated


@dataclass
class Reference:
    num: Optional[int]  # None: a statistics file of mu and sigma that records no image count
    stats: Optional[dict] = None  # {"mu", "sigma"} of the FID layer
    features: dict[str, torch.Tensor] = field(default_factory=dict)  # per layer, input order
    cache: str = "none"  # "hit", "miss" or "none"
    source: str = ""


def default_cache_dir() -> Path:
    return Path(os.environ.get("DISTGEN_CACHE", Path.home() / ".cache" / "distgen")) / "reference"


# --------------------------------------------------------------------------- gathering
def gather_in_order(index: list[np.ndarray], feats: dict[str, list[torch.Tensor]]) -> Optional[dict[str, torch.Tensor]]:
    """This rank's (index, features) pieces -> every rank's features on rank 0, sorted by index."""
    idx = np.concatenate(index) if index else np.zeros(0, np.int64)
    mine = {k: (torch.cat(v).cpu() if v else torch.zeros(0)) for k, v in feats.items()}  # one copy to the host
    parts = dist.gather_object((idx, mine))
    if parts is None:
        return None
    all_idx = np.concatenate([p[0] for p in parts])
    order = torch.from_numpy(np.argsort(all_idx, kind="stable"))
    if len(np.unique(all_idx)) != len(all_idx):
        raise EvalError("evaluation pass saw a sample twice (internal error in the split)")
    return {k: torch.cat([p[1][k] for p in parts if len(p[1][k])])[order] for k in feats}


def class_spread(logits: torch.Tensor) -> dict:
    """How the domain classifier spreads generated images over the classes (mode collapse shows here):
    the entropy of the predicted-class histogram over log(classes) (1: all equally often, 0: one class)
    and the share of the most frequent class."""
    k = logits.shape[1]
    counts = torch.bincount(logits.argmax(1), minlength=k).double()
    p = counts / counts.sum()
    nz = p[p > 0]
    return {"class_entropy": float(-(nz * nz.log()).sum() / math.log(k)), "class_max_share": float(p.max())}


class Evaluator:
    """Runs the metrics of an :class:`EvalSpec` on generated images, once per call, on every rank."""

    def __init__(self, spec: EvalSpec, device: str | torch.device = "cpu", log: Callable[[str], None] = print):
        self.spec, self.device, self.log = spec, torch.device(device), log
        if spec.batch_size is None:
            # InceptionV3 at 299x299 runs ~1.9x faster per image at 256 than at 64 on an H100 (issue 21);
            # on CPU the per-image cost is flat and 64 keeps the activations small.
            spec.batch_size = 256 if self.device.type == "cuda" else 64
        self.skipped: dict[str, str] = {}  # metric -> why
        self.extractor: Optional[Extractor] = None
        self._reference: Optional[Reference] = None
        feature_metrics = [m for m in spec.metrics if m in FEATURE_METRICS]
        if "target_class" in spec.metrics and (spec.feature_extractor in ("inception", "inception-v3-compat")
                                               or spec.feature_extractor in FOUNDATION_EXTRACTORS):
            self.skipped["target_class"] = ("needs a domain classifier (--feature-extractor FILE from distgen eval "
                                            "fit-features), whose classes include the target domain's")
        if feature_metrics or self._active(["target_class"]):
            try:
                self.extractor = Extractor(spec.feature_extractor, {m: None for m in feature_metrics},
                                           inception_weights_path=spec.inception_weights,
                                           extractor_weights_path=spec.extractor_weights, device=self.device)
            except WeightsUnavailable as e:
                for m in feature_metrics + self._active(["target_class"]):
                    self.skipped[m] = str(e)
        if "isc" in spec.metrics and self.extractor is not None and self.extractor.name != "inception-v3-compat":
            # The domain classifier's logits would give a number, but not the Inception Score; DINOv2 and CLIP
            # features are no class probabilities at all.
            self.skipped["isc"] = f"the Inception Score needs the InceptionV3 extractor, not {self.extractor.name}"
        needs_ref = self._active(REFERENCE_METRICS)
        if needs_ref and not spec.ref:
            raise EvalError(f"metrics {', '.join(needs_ref)} need a reference (--ref SHARDS|MANIFEST|STATS_FILE "
                            "or eval.ref)")

    def _active(self, metrics: Iterable[str]) -> list[str]:
        """Those of ``metrics`` that were asked for and are not skipped."""
        return [m for m in metrics if m in self.spec.metrics and m not in self.skipped]

    # ---- features of batches
    def _extract(self, batches: Iterable[tuple[np.ndarray, torch.Tensor]]):
        idx, feats = [], {k: [] for k in self.extractor.features}
        for index, images in batches:
            out = self.extractor(images)
            idx.append(np.asarray(index, dtype=np.int64))
            for k in feats:
                feats[k].append(out[k])  # left on the device until gathered
        return idx, feats

    # ---- reference
    def reference(self, data_cfg) -> Reference:
        """Reference features/statistics for the FID/KID/PR layers (cached on disk)."""
        if self._reference is not None:  # later evaluations of a training run: kept in memory
            self._reference.cache = "hit"
            return self._reference
        ref = list(self.spec.ref)
        if len(ref) == 1 and ref[0].endswith(".npz"):
            self._reference = self._reference_from_file(Path(ref[0]))
            return self._reference
        self._resize_path(ref, data_cfg)
        layers = {self.extractor.layers[m] for m in self._active(REFERENCE_METRICS)}
        key, desc = self._cache_key(ref, data_cfg, sorted(layers))
        cache_dir = Path(self.spec.cache_dir) if self.spec.cache_dir else default_cache_dir()
        path = cache_dir / f"ref-{key[:24]}.safetensors"
        cached = self._read_cache(path, desc, ref) if path.is_file() else None
        # Every rank must agree on hit or miss: they all take part in a recomputation.
        hit = dist.all_reduce_sum(int(cached is not None)) == dist.world_size()
        if cached is not None and not hit and dist.is_main():
            self.log(f"distgen eval: reference cache {path} did not load on every process; recomputing it")
        if hit:
            self._reference = cached
            self._reference.cache = "hit"
            self._reference.source = str(path)
            return self._reference
        self._reference = self._compute_reference(ref, data_cfg)
        self._reference.cache, self._reference.source = "miss", str(path)
        if dist.is_main():
            try:
                refstats.write_cache(path, self._reference.num, self._reference.stats, self._reference.features, desc)
            except Exception as e:  # best effort: a full or read-only disk costs the next evaluation a recomputation
                why = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
                self.log(f"distgen eval: could not write the reference cache {path} ({why}); going on without it")
        dist.barrier()
        return self._reference

    def _ref_layer(self) -> str:
        """The extractor's layer of the reference statistics and features (FID, KID and PR share it)."""
        lay = self.extractor.layers
        return lay.get("fid") or lay.get("kid") or lay.get("prc")

    def _resize_path(self, ref: list[str], data_cfg) -> None:
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

    def _cache_key(self, ref: list[str], data_cfg, layers: list[str]) -> tuple[str, dict]:
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
                "resize": data_cfg.resize, "side": self._ref_side(ref)}
        return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest(), desc

    def _read_cache(self, path: Path, desc: dict, ref: list[str]) -> Optional[Reference]:
        """The cached reference, or None (saying why in one line) when the file cannot be used as it is."""
        from distgen.data import resolve_shards

        layer = self._ref_layer()
        try:
            num, stats, feats = refstats.read_cache(
                path, desc, self.extractor.dim(layer), layer, need_stats=bool(self._active(["fid"])),
                need_feats=bool(self._active(("kid", "prc"))), expected=resolve_shards(ref).total)
        except refstats.CacheInvalid as e:
            if dist.is_main():
                self.log(f"distgen eval: ignoring the reference cache {path}: {e}; recomputing it")
            return None
        return Reference(num=num, stats=stats, features=feats)

    def _reference_from_file(self, path: Path) -> Reference:
        """A statistics file: ``mu`` and ``sigma`` of the FID layer (pytorch-fid / torch-fidelity layout),
        optionally ``features`` for KID and PR and ``num``, each checked (:mod:`distgen.evaluate.refstats`)."""
        layer = self._ref_layer()
        num, stats, feats = refstats.read_npz(path, self.extractor.dim(layer),
                                              log=self.log if dist.is_main() else (lambda _msg: None))
        if stats is None and self._active(["fid"]):
            raise EvalError(f"{path}: holds no 'mu' and 'sigma' (FID needs them)")
        features = {layer: torch.from_numpy(feats)} if feats is not None else {}
        if not features:
            for m in self._active(("kid", "prc")):
                self.skipped[m] = f"the statistics file {path} holds no 'features' array"
        return Reference(num=num, stats=stats, features=features, source=str(path))

    def _compute_reference(self, ref: list[str], data_cfg) -> Reference:
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
        side = self._ref_side(ref)
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
        feats = gather_in_order(idx, kept) if feat_layers else {}
        if dist.is_main():
            self.log(f"distgen eval: reference {', '.join(ref)}: {total} images")
        return Reference(num=total, stats=stats, features=feats or {})

    def _ref_side(self, ref: list[str]) -> str:
        """The batch key of reference images: paired shards hold the target domain on the side a translation
        goes to (``b`` for AtoB)."""
        from distgen.data import resolve_shards

        if resolve_shards(ref).meta.get("layout") == "paired":
            return "b" if self.spec.direction == "AtoB" else "a"
        return "image"

    # ---- translated (translators: pix2pix, CycleGAN)
    def translated(self, family, nets, data_cfg) -> tuple[Optional[dict[str, torch.Tensor]], dict]:
        """Features of the translations of every test input (index order, on rank 0) and, with ``paired``, their
        mean L1 (on [0, 1]), PSNR and SSIM against the ground truth: each test input once, split over ranks."""
        from distgen.translate import iter_inputs, translate_uint8

        spec = self.spec
        if not spec.test:
            raise EvalError("a translator is scored on test inputs: --test SHARDS|MANIFEST, or data.eval in the config")
        pairs = bool(self._active(["paired"]))
        idx, feats = [], {k: [] for k in (self.extractor.features if self.extractor else [])}
        sums = [0.0, 0.0, 0.0, 0.0]  # L1, PSNR, SSIM, images
        with torch.no_grad():
            for index, _names, x, target in iter_inputs(spec.test, data_cfg, spec.direction,
                                                        batch_size=spec.batch_size, rank=dist.rank(),
                                                        world=dist.world_size(), want_targets=pairs):
                y = translate_uint8(family, nets, x, spec.direction, self.device)
                if self.extractor is not None:
                    out = self.extractor(y)
                    idx.append(np.asarray(index, dtype=np.int64))
                    for k in feats:
                        feats[k].append(out[k])
                if pairs:
                    if target is None:
                        raise EvalError(f"paired: the test shards {spec.test} are not paired shards (layout paired), "
                                        f"so there is no ground truth to compare the translations with")
                    yc = y.cpu()
                    sums[0] += float((yc.double() - target.double()).abs().flatten(1).mean(1).sum()) / 255
                    sums[1] += float(psnr(target, yc).sum())
                    sums[2] += float(ssim(target, yc).sum())
                sums[3] += len(index)
        sums = dist.all_reduce_floats(sums)
        if sums[3] == 0:
            raise EvalError(f"the test shards {spec.test} hold no images to translate")
        res = {"translated_images": int(sums[3])}
        if pairs:
            res.update(l1=sums[0] / sums[3], psnr=sums[1] / sums[3], ssim=sums[2] / sums[3])
        return (gather_in_order(idx, feats) if self.extractor is not None else None), res

    def _target_class(self, gen: dict[str, torch.Tensor]) -> dict:
        """The share of translations the domain classifier assigns to the target domain's class (the
        reference manifest's ``source_class``: distgen data shard fashion-mnist:classes=A/B)."""
        from distgen.data import resolve_shards

        target = resolve_shards(self.spec.ref).meta.get("source_class") if self.spec.ref else None
        if not isinstance(target, dict) or not isinstance(target.get("index"), int):
            self.skipped["target_class"] = (f"the reference {self.spec.ref} names no source class (domain shards of "
                                            f"fashion-mnist:classes=A/B record one)")
            return {}
        logits = gen["logits"]
        if not 0 <= target["index"] < logits.shape[1]:
            raise EvalError(f"target_class: the reference's class {target['index']} ({target.get('name')}) is not "
                            f"among the domain classifier's {logits.shape[1]} classes")
        share = float((logits.argmax(1) == target["index"]).double().mean())
        return {"target_class_share": share, "target_class": target.get("name", target["index"])}

    # ---- generated
    def generated_features(self, family, nets) -> Optional[dict[str, torch.Tensor]]:
        """Features of ``num_samples`` generated images, in index order, on rank 0."""
        from distgen.sample import iter_blocks

        def batches():
            pending_i, pending_x = [], []
            for index, images, _labels in iter_blocks(family, nets, self.spec.num_samples, seed=self.spec.seed,
                                                      device=self.device, rank=dist.rank(),
                                                      world=dist.world_size(), options=self.spec.sampling,
                                                      on_device=True):
                pending_i += index
                pending_x.append(images)
                if len(pending_i) >= self.spec.batch_size:
                    yield np.array(pending_i), torch.cat(pending_x)
                    pending_i, pending_x = [], []
            if pending_i:
                yield np.array(pending_i), torch.cat(pending_x)

        idx, feats = self._extract(batches())
        return gather_in_order(idx, feats)

    # ---- everything
    def run(self, family=None, nets=None, data_cfg=None, features: Optional[dict] = None) -> dict:
        """Metrics (rank 0 gets the numbers; every rank gets the same dict back)."""
        spec = self.spec
        res: dict = {}
        t0 = time.time()
        todo = self._active(FEATURE_METRICS)
        ref = self.reference(data_cfg) if any(m in REFERENCE_METRICS for m in todo) else None
        if ref is not None:
            todo = self._active(todo)  # a stats file can rule out KID / PR
            # a statistics file of mu and sigma alone records no count: FID takes them as they are
            few = sample_count_problem([m for m in todo if m in REFERENCE_METRICS], ref.num) \
                if ref.num is not None else None
            if few:  # before any image is generated
                raise EvalError(f"reference {ref.source or ', '.join(spec.ref)}: {few}")
        if offers(family, Translates) and features is None:
            if todo or self._active(["paired", "target_class"]):
                gen, extra = self.translated(family, nets, data_cfg)
                res.update(extra)
                if dist.is_main():
                    res.update(self._metrics(todo, gen, ref) if todo else {})
                    if self._active(["target_class"]):
                        res.update(self._target_class(gen))
        elif todo:
            gen = features if features is not None else self.generated_features(family, nets)
            if dist.is_main():
                res.update(self._metrics(todo, gen, ref))
        for m in ("paired", "target_class"):
            if m in spec.metrics and not offers(family, Translates):
                self.skipped[m] = missing(family, Translates)
        if "bpd" in spec.metrics:
            res.update(self.bpd(family, nets, data_cfg))
        if "recon" in spec.metrics:
            res.update(self.recon(family, nets, data_cfg))
        if "accuracy" in spec.metrics:
            res.update(self.accuracy(family, nets, data_cfg))
        if ref is not None:
            res["ref_cache"] = ref.cache
            res["ref_images"] = ref.num
        if self.skipped:
            res["skipped"] = dict(self.skipped)
        res["num_samples"] = spec.num_samples
        res["extractor"] = self.extractor.name if self.extractor is not None else None
        if self.extractor is not None and self.extractor.name == DOMAIN:
            # so a reader can judge the numbers: the classifier's accuracy and how its FD sees known degradations
            res["extractor_about"] = describe_domain(self.extractor.module.info)
        res["seconds"] = round(time.time() - t0, 2)
        return dist.all_gather_object(res)[0]

    def _metrics(self, todo: list[str], gen: dict[str, torch.Tensor], ref: Optional[Reference]) -> dict:
        lay = self.extractor.layers
        out: dict = {}
        kw = dict(FIDELITY_KWARGS)
        for layer, f in gen.items():  # an extractor whose weights overflow: no figure, rather than nan or a traceback
            bad = int((~torch.isfinite(f)).flatten(1).any(1).sum()) if f.is_floating_point() else 0
            if bad:
                for m in todo:
                    self.skipped[m] = (f"the extractor {self.extractor.name} ({self.extractor.weights}) gave NaN or "
                                       f"infinite values in its {layer!r} output for {bad} of {len(f)} images")
                return {}
        if "isc" in todo:
            r = isc_featuresdict_to_metric(gen, lay["isc"], **kw)
            out.update(isc_mean=r[KEY_METRIC_ISC_MEAN], isc_std=r[KEY_METRIC_ISC_STD])
        n = len(next(iter(gen.values())))
        if "fid" in todo:
            dim = gen[lay["fid"]].shape[1]
            if n <= dim:
                self.log(f"distgen eval: warning: FID from {n} images, no more than the feature dimension {dim}: "
                         f"their covariance is rank-deficient and FID is biased high (compare only figures from the "
                         f"same count; published ones use 50,000)")
            stats = fid_features_to_statistics(gen[lay["fid"]])
            if ref.stats["mu"].shape != stats["mu"].shape:
                raise EvalError(f"reference {ref.source}: statistics of dimension {ref.stats['mu'].shape[0]}, "
                                f"the extractor gives {stats['mu'].shape[0]}")
            try:
                out["fid"] = fid_statistics_to_metric(stats, ref.stats, False)[KEY_METRIC_FID]
            except np.linalg.LinAlgError as e:  # finite inputs, but the eigenvalues of their product did not converge
                out["fid"] = math.nan
                self.log(f"distgen eval: FID: {e}")
        if "kid" in todo:
            size = min(self.spec.kid_subset_size, len(gen[lay["kid"]]), len(ref.features[lay["kid"]]))
            if size < self.spec.kid_subset_size:
                self.log(f"distgen eval: warning: KID from subsets of {size} images, not {self.spec.kid_subset_size} "
                         f"(too few images): an unbiased estimate, but a noisy one")
            r = kid_featuresdict_to_metric(gen, ref.features, lay["kid"], **{**kw, "kid_subset_size": size})
            out.update(kid_mean=r[KEY_METRIC_KID_MEAN], kid_std=r[KEY_METRIC_KID_STD], kid_subset_size=size)
        if "prc" in todo:
            r = prc_featuresdict_to_metric(gen, ref.features, lay["prc"], **kw)
            out.update(precision=r[KEY_METRIC_PRECISION], recall=r[KEY_METRIC_RECALL], f_score=r[KEY_METRIC_F_SCORE])
        if self.extractor.name == DOMAIN and "logits" in gen:
            out.update(class_spread(gen["logits"]))
        for m, keys in METRIC_KEYS.items():  # never a nan or inf figure: the metric is skipped, saying why
            bad = [f"{k} {out[k]}" for k in keys if k in out and not math.isfinite(out[k])]
            if bad:
                for k in keys:
                    out.pop(k, None)
                self.skipped[m] = (f"came out {', '.join(bad)} (not finite) against the reference "
                                   f"{ref.source if ref is not None and ref.source else self.spec.ref}: the "
                                   f"extractor's features or the reference statistics are out of range")
        return {result_key(k, self.extractor.name): v for k, v in out.items()}  # fid -> fd_dinov2, ...

    # ---- bits per dimension
    def bpd(self, family, nets, data_cfg) -> dict:
        """Bits per dimension of the test split: -log2 p(x) / (C H W), summed over every image once."""
        if not offers(family, Likelihood):
            self.skipped["bpd"] = missing(family, Likelihood)
            return {}
        nll, n = 0.0, 0
        with torch.no_grad():
            # One generator per image, seeded by (seed, index): a stochastic bound (dequantisation,
            # a VAE's posterior sample) is then the same at any world size.
            for x, labels, gens in self._test_batches(data_cfg, "bpd"):
                logp = family.log_likelihood(nets, x, labels.to(self.device) if labels is not None else None, gens,
                                             **self.spec.likelihood)
                nll -= float(logp.double().sum())
                n += x.shape[0]
        nll = dist.all_reduce_sum(float(nll))
        total = int(dist.all_reduce_sum(n))
        if total == 0:
            raise EvalError(f"bpd: the test shards {self.spec.test} hold no images")
        dims = data_cfg.channels * data_cfg.resolution ** 2
        out = {"bpd": nll / (total * dims * math.log(2)), "bpd_images": total, "bpd_kind": family.likelihood}
        out.update({f"bpd_{k}": v for k, v in self.spec.likelihood.items()})
        return out

    def _test_batches(self, data_cfg, what: str):
        """(uint8 images, labels, one generator per image) of one exact pass over the test split."""
        from distgen.data import make_loader

        if not self.spec.test:
            raise EvalError(f"{what} needs test shards (--test SHARDS|MANIFEST, or data.eval in the config)")
        loader = make_loader(self.spec.test, data_cfg, batch_size=self.spec.batch_size, mode="eval",
                             rank=dist.rank(), world=dist.world_size(), as_float=False)
        for batch in loader:
            gens = [torch.Generator(device=self.device).manual_seed(dist.derive_seed(self.spec.seed, int(i)))
                    for i in batch["index"]]
            yield batch["image"].to(self.device), batch.get("label"), gens

    # ---- reconstructions
    def recon(self, family, nets, data_cfg) -> dict:
        """Mean PSNR and SSIM of the family's reconstructions of the test split."""
        from distgen.sample import to_uint8

        if not offers(family, Reconstructs):
            self.skipped["recon"] = missing(family, Reconstructs)
            return {}
        psnr_sum, ssim_sum, n = 0.0, 0.0, 0
        with torch.no_grad():
            for x, _labels, gens in self._test_batches(data_cfg, "recon"):
                rec = torch.from_numpy(to_uint8(family.reconstruct(nets, x, gens))).permute(0, 3, 1, 2)
                p, q = psnr(x.cpu(), rec), ssim(x.cpu(), rec)
                psnr_sum += float(p.sum())
                ssim_sum += float(q.sum())
                n += x.shape[0]
        psnr_sum, ssim_sum, n = dist.all_reduce_floats([psnr_sum, ssim_sum, float(n)])
        if n == 0:
            raise EvalError(f"recon: the test shards {self.spec.test} hold no images")
        return {"psnr": psnr_sum / n, "ssim": ssim_sum / n, "recon_images": int(n)}


    # ---- classification (JEM)
    def accuracy(self, family, nets, data_cfg) -> dict:
        """Top-1 accuracy of the family's classifier on the labelled test split, every image once."""
        if not offers(family, Classifies):
            self.skipped["accuracy"] = missing(family, Classifies)
            return {}
        right, n = 0, 0
        with torch.no_grad():
            for x, labels, _gens in self._test_batches(replace(data_cfg, labels=True), "accuracy"):
                logits = family.classify(nets, x.float() / 127.5 - 1)
                right += int((logits.argmax(1).cpu() == labels).sum())
                n += x.shape[0]
        right, n = dist.all_reduce_floats([float(right), float(n)])
        if n == 0:
            raise EvalError(f"accuracy: the test shards {self.spec.test} hold no images")
        return {"accuracy": right / n, "accuracy_images": int(n)}


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of uint8 NCHW images (peak 255); identical images give +inf."""
    mse = (a.double() - b.double()).square().flatten(1).mean(1)
    return 10 * torch.log10(255.0 ** 2 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor, size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) of uint8 NCHW images: Gaussian-weighted local statistics over the
    window positions that fit inside the image, averaged over positions and channels. Images smaller
    than the window use the largest odd window that fits."""
    import torch.nn.functional as F

    x, y = a.double(), b.double()
    c = x.shape[1]
    size = min(size, (min(x.shape[2:]) - 1) // 2 * 2 + 1)
    g = torch.exp(-(torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    w = (g[:, None] * g[None, :]).expand(c, 1, size, size)
    f = lambda t: F.conv2d(t, w, groups=c)  # noqa: E731
    mx, my = f(x), f(y)
    vx, vy, cxy = f(x * x) - mx ** 2, f(y * y) - my ** 2, f(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    m = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return m.flatten(1).mean(1)

"""Distributed evaluation: every rank extracts features of its share, rank 0 computes the metrics.

:class:`Evaluator` decides which metrics run (and which are skipped, saying why) and puts the results together;
each computation is its own module:

- :mod:`~distgen.evaluate.passes`: passes over generated or test images split over ranks, features gathered on
  rank 0 in index order (so a metric does not depend on the number of processes);
- :mod:`~distgen.evaluate.reference`: reference statistics and features (cached on disk), read back and checked
  by :mod:`~distgen.evaluate.refstats`;
- :mod:`~distgen.evaluate.fidelity`: FID, KID, IS and precision / recall from features (torch-fidelity's own
  functions);
- :mod:`~distgen.evaluate.likelihood`: ``bpd``; :mod:`~distgen.evaluate.recon`: ``recon`` (PSNR / SSIM);
  :mod:`~distgen.evaluate.classify`: ``accuracy``; :mod:`~distgen.evaluate.translation`: translators'
  features, ``paired`` and ``target_class``.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Optional

import torch

from distgen import dist
from distgen.config.schema import FOUNDATION_EXTRACTORS, METRICS, sample_count_problem
from distgen.errors import EvalError
from distgen.evaluate import classify, likelihood, passes, recon, translation
from distgen.evaluate.extractors import DOMAIN, Extractor, describe_domain
from distgen.evaluate.fidelity import FEATURE_METRICS, REFERENCE_METRICS, fidelity_metrics
from distgen.evaluate.reference import Reference, ReferenceLoader
from distgen.evaluate.spec import EvalSpec
from distgen.evaluate.weights import WeightsUnavailable
from distgen.families.capabilities import Classifies, Likelihood, Reconstructs, Translates, missing, offers

__all__ = ["METRICS", "TEST_SPLIT_METRICS", "EvalSpec", "Evaluator"]

# Metrics of a pass over the test split, each computed by the family's capability (skipped, saying why, when
# the family lacks it): metric -> (capability, computation)
TEST_SPLIT_METRICS = {"bpd": (Likelihood, likelihood.bpd), "recon": (Reconstructs, recon.recon),
                      "accuracy": (Classifies, classify.accuracy)}


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

    def reference(self, data_cfg) -> Reference:
        """Reference features/statistics for the FID/KID/PR layers (cached on disk)."""
        if self._reference is not None:  # later evaluations of a training run: kept in memory
            self._reference.cache = "hit"
            return self._reference
        loader = ReferenceLoader(self.spec, self.extractor, self.device, self._active(REFERENCE_METRICS),
                                 self.skipped, self.log)
        self._reference = loader.load(data_cfg)
        return self._reference

    def _metrics(self, todo: list[str], gen: dict[str, torch.Tensor], ref: Optional[Reference]) -> dict:
        return fidelity_metrics(todo, gen, ref, self.extractor, self.spec.kid_subset_size, self.spec.ref,
                                self.skipped, self.log)

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
        translator = family is not None and offers(family, Translates)
        if translator and features is None:
            if todo or self._active(["paired", "target_class"]):
                gen, extra = translation.translated(family, nets, data_cfg, spec, self.extractor, self.device,
                                                    pairs=bool(self._active(["paired"])))
                res.update(extra)
                if dist.is_main():
                    res.update(self._metrics(todo, gen, ref) if todo else {})
                    if self._active(["target_class"]):
                        share, why = translation.target_class(spec.ref, gen)
                        res.update(share)
                        if why:
                            self.skipped["target_class"] = why
        elif todo:
            gen = features if features is not None else passes.generated_features(family, nets, spec,
                                                                                   self.extractor, self.device)
            if features is None and family.last_nfe is not None:  # the figures' cost: network evaluations an image
                res["nfe"] = family.last_nfe
            if dist.is_main():
                res.update(self._metrics(todo, gen, ref))
        for m in ("paired", "target_class"):
            if m in spec.metrics and not translator:
                self.skipped[m] = _lacking(family, Translates)
        for m, (capability, compute) in TEST_SPLIT_METRICS.items():
            if m in spec.metrics:
                if family is not None and offers(family, capability):
                    res.update(compute(family, nets, data_cfg, spec, self.device))
                else:
                    self.skipped[m] = _lacking(family, capability)
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


def _lacking(family, capability) -> str:
    """Why ``family`` cannot give ``capability``'s metric; None: only features were given (``run(features=...)``)."""
    return missing(family, capability) if family is not None else "no model was given, only features"

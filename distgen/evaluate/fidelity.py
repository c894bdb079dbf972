"""Fidelity metrics from features: FID, KID, the Inception Score and precision / recall, by torch-fidelity's own
statistics and metric functions on features in index order (so the numbers match a one-process torch-fidelity
run), and the domain classifier's class spread of generated images."""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_featuresdict_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_featuresdict_to_metric
from torch_fidelity.metric_prc import (KEY_METRIC_F_SCORE, KEY_METRIC_PRECISION, KEY_METRIC_RECALL,
                                       prc_featuresdict_to_metric)

from distgen.config.schema import result_key
from distgen.errors import EvalError
from distgen.evaluate.extractors import DOMAIN
from distgen.evaluate.reference import Reference

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


def class_spread(logits: torch.Tensor) -> dict:
    """How the domain classifier spreads generated images over the classes (mode collapse shows here):
    the entropy of the predicted-class histogram over log(classes) (1: all equally often, 0: one class)
    and the share of the most frequent class."""
    k = logits.shape[1]
    counts = torch.bincount(logits.argmax(1), minlength=k).double()
    p = counts / counts.sum()
    nz = p[p > 0]
    return {"class_entropy": float(-(nz * nz.log()).sum() / math.log(k)), "class_max_share": float(p.max())}


def fidelity_metrics(todo: list[str], gen: dict[str, torch.Tensor], ref: Optional[Reference], extractor,
                     kid_subset_size: int, ref_spec, skipped: dict[str, str], log: Callable[[str], None]) -> dict:
    """``todo``'s figures (of FEATURE_METRICS) of generated features ``gen`` against ``ref``, by the names of the
    extractor's feature space (fid only for InceptionV3; fd_dinov2, fd_domain, kid_domain_mean, ...). A figure that
    cannot be given goes to ``skipped``, saying why (``ref_spec``: the --ref the message names when the reference
    records no source)."""
    lay = extractor.layers
    out: dict = {}
    kw = dict(FIDELITY_KWARGS)
    for layer, f in gen.items():  # an extractor whose weights overflow: no figure, rather than nan or a traceback
        bad = int((~torch.isfinite(f)).flatten(1).any(1).sum()) if f.is_floating_point() else 0
        if bad:
            for m in todo:
                skipped[m] = (f"the extractor {extractor.name} ({extractor.weights}) gave NaN or "
                              f"infinite values in its {layer!r} output for {bad} of {len(f)} images")
            return {}
    if "isc" in todo:
        r = isc_featuresdict_to_metric(gen, lay["isc"], **kw)
        out.update(isc_mean=r[KEY_METRIC_ISC_MEAN], isc_std=r[KEY_METRIC_ISC_STD])
    n = len(next(iter(gen.values())))
    if "fid" in todo:
        dim = gen[lay["fid"]].shape[1]
        if n <= dim:
            fd = "FID" if result_key("fid", extractor.name) == "fid" else "FD"  # FID is InceptionV3's alone
            log(f"distgen eval: warning: {fd} from {n} images, no more than the feature dimension {dim}: "
                f"their covariance is rank-deficient and {fd} is biased high (compare only figures from the "
                f"same count; published ones use 50,000)")
        stats = fid_features_to_statistics(gen[lay["fid"]])
        if ref.stats["mu"].shape != stats["mu"].shape:
            raise EvalError(f"reference {ref.source}: statistics of dimension {ref.stats['mu'].shape[0]}, "
                            f"the extractor gives {stats['mu'].shape[0]}")
        try:
            out["fid"] = fid_statistics_to_metric(stats, ref.stats, False)[KEY_METRIC_FID]
        except np.linalg.LinAlgError as e:  # finite inputs, but the eigenvalues of their product did not converge
            out["fid"] = math.nan
            log(f"distgen eval: FID: {e}")
    if "kid" in todo:
        size = min(kid_subset_size, len(gen[lay["kid"]]), len(ref.features[lay["kid"]]))
        if size < kid_subset_size:
            log(f"distgen eval: warning: KID from subsets of {size} images, not {kid_subset_size} "
                f"(too few images): an unbiased estimate, but a noisy one")
        r = kid_featuresdict_to_metric(gen, ref.features, lay["kid"], **{**kw, "kid_subset_size": size})
        out.update(kid_mean=r[KEY_METRIC_KID_MEAN], kid_std=r[KEY_METRIC_KID_STD], kid_subset_size=size)
    if "prc" in todo:
        r = prc_featuresdict_to_metric(gen, ref.features, lay["prc"], **kw)
        out.update(precision=r[KEY_METRIC_PRECISION], recall=r[KEY_METRIC_RECALL], f_score=r[KEY_METRIC_F_SCORE])
    if extractor.name == DOMAIN and "logits" in gen:
        out.update(class_spread(gen["logits"]))
    for m, keys in METRIC_KEYS.items():  # never a nan or inf figure: the metric is skipped, saying why
        bad = [f"{result_key(k, extractor.name)} {out[k]}" for k in keys if k in out and not math.isfinite(out[k])]
        if bad:
            for k in keys:
                out.pop(k, None)
            skipped[m] = (f"came out {', '.join(bad)} (not finite) against the reference "
                          f"{ref.source if ref is not None and ref.source else ref_spec}: the "
                          f"extractor's features or the reference statistics are out of range")
    return {result_key(k, extractor.name): v for k, v in out.items()}  # fid -> fd_dinov2, fd_domain, ...

"""Evaluation: torch-fidelity metrics across ranks, reference caches, bits/dim, domain features."""

from distgen.evaluate.core import METRICS, EvalSpec, Evaluator, parse_metrics
from distgen.evaluate.extractors import EvalError, WeightsUnavailable

__all__ = ["METRICS", "EvalError", "EvalSpec", "Evaluator", "WeightsUnavailable", "parse_metrics", "spec_from_config"]


def spec_from_config(cfg, **overrides) -> EvalSpec:
    """An :class:`EvalSpec` from a run's Config (its eval section; reference default data.train)."""
    e = cfg.eval
    spec = EvalSpec(metrics=tuple(e.metrics), num_samples=e.num_samples, ref=list(e.ref or cfg.data.train) or None,
                    test=list(cfg.data.eval) or None, batch_size=e.batch_size, seed=e.seed,
                    feature_extractor=e.feature_extractor, inception_weights=e.inception_weights,
                    cache_dir=e.cache_dir, kid_subset_size=e.kid_subset_size)
    for k, v in overrides.items():
        if v is not None:
            setattr(spec, k, v)
    return spec

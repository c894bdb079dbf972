"""Evaluation: torch-fidelity metrics across ranks, reference caches, bits/dim, domain features."""

from distgen.errors import EvalError
from distgen.evaluate.core import METRICS, Evaluator
from distgen.evaluate.spec import EvalSpec, parse_metrics
from distgen.evaluate.weights import WeightsUnavailable

__all__ = ["METRICS", "EvalError", "EvalSpec", "Evaluator", "WeightsUnavailable", "parse_metrics", "spec_from_config"]


def spec_from_config(cfg, **overrides) -> EvalSpec:
    """An :class:`EvalSpec` from a run's Config (its eval section; reference default data.train)."""
    from distgen.families import FAMILIES
    from distgen.families.capabilities import Translates, offers

    e = cfg.eval
    ref, test = list(e.ref or cfg.data.train), list(cfg.data.eval)
    if offers(FAMILIES[cfg.model.family], Translates):
        # Translations of the test inputs against the target domain's test images: for a paired set its other
        # side (the same shards), for an unpaired one the other domain's shards
        a, b = list(cfg.data.eval), list(cfg.data.eval_b)
        backwards = overrides.get("direction") == "BtoA"
        if cfg.data.train_b:
            test, default_ref = (b, a) if backwards else (a, b)
        else:
            test, default_ref = a, a
        ref = list(e.ref) or default_ref
    spec = EvalSpec(metrics=tuple(e.metrics), num_samples=e.num_samples, ref=ref or None,
                    test=test or None, batch_size=e.batch_size, seed=e.seed,
                    feature_extractor=e.feature_extractor, inception_weights=e.inception_weights,
                    extractor_weights=e.extractor_weights,
                    cache_dir=e.cache_dir, kid_subset_size=e.kid_subset_size)
    for k, v in overrides.items():
        if v is not None:
            setattr(spec, k, v)
    return spec

"""What an evaluation is asked for: the metrics and their settings (:class:`EvalSpec`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

from distgen.config.schema import METRICS
from distgen.errors import EvalError


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

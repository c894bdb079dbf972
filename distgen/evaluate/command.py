"""``distgen eval``: metrics of a run's EMA weights or an export, with one process or many."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from distgen import dist
from distgen.config.schema import FEATURE_SPACES, TAGGED_RESULTS, feature_space, tagged
from distgen.errors import EvalError
from distgen.evaluate import EvalSpec, Evaluator, parse_metrics, spec_from_config
from distgen.families.capabilities import Translates, offers

NAMES = {"fid": "FID", "kid_mean": "KID", "kid_std": "KID std", "isc_mean": "IS", "isc_std": "IS std",
         "precision": "precision", "recall": "recall", "f_score": "F-score", "bpd": "bits/dim",
         "class_entropy": "class entropy", "class_max_share": "top class share", "psnr": "PSNR (dB)",
         "ssim": "SSIM", "l1": "L1 (0..1)", "target_class_share": "target class share", "accuracy": "accuracy",
         "translated_images": "translated", "nfe": "NFE / image"}
# FID is InceptionV3's alone: in any other feature space the same maths is an FD, and every figure is labelled
# with its space (FD_DINOv2, KID_CLIP, precision_fashion-mnist), as its key is (distgen.config.schema.result_key)
SPACE_LABELS = {"dinov2": "DINOv2", "clip": "CLIP", "domain": "domain"}
_TAGGED_LABELS = {"fid": "FD_{}", "kid_mean": "KID_{}", "kid_std": "KID_{} std", "precision": "precision_{}",
                  "recall": "recall_{}", "f_score": "F-score_{}"}


def space_label(feature_extractor: Optional[str]) -> Optional[str]:
    """How the table names ``feature_extractor``'s space: DINOv2, CLIP, a domain classifier by its name
    (fashion-mnist) or its file's (fm for features/fm.safetensors); None for InceptionV3."""
    tag = feature_space(feature_extractor)
    if tag == "domain" and feature_extractor not in (None, "distgen-domain"):
        return Path(feature_extractor).name.removesuffix(".safetensors")
    return SPACE_LABELS.get(tag) if tag else None


def labels(feature_extractor: Optional[str] = None) -> dict[str, str]:
    """Result key -> its label in the table, every feature space's keys included (each beside InceptionV3's)."""
    out = {}
    for key, label in NAMES.items():
        out[key] = label
        for tag in FEATURE_SPACES if key in TAGGED_RESULTS else ():
            shown = space_label(feature_extractor) if tag == feature_space(feature_extractor) else SPACE_LABELS[tag]
            out[tagged(key, tag)] = _TAGGED_LABELS[key].format(shown)
    return out


def format_results(res: dict, feature_extractor: Optional[str] = None) -> str:
    names = {k: v for k, v in labels(feature_extractor).items() if k in res}
    width = max([15, *map(len, names.values())])
    lines = [f"  {v:<{width}s} {res[k]:.6g}" for k, v in names.items()]
    if "ref_cache" in res:
        count = "image count not recorded" if res["ref_images"] is None else f"{res['ref_images']} images"
        lines.append(f"  reference: {count} (cache {res['ref_cache']})")
    by_reason: dict[str, list[str]] = {}
    for m, why in res.get("skipped", {}).items():
        by_reason.setdefault(why, []).append(m)
    for why, ms in by_reason.items():
        lines.append(f"  skipped {', '.join(ms)}: {why}")
    return "\n".join(lines)


def eval_command(path: str, metrics: str, num_samples: int, *, ref: Optional[list[str]] = None,
                 test: Optional[list[str]] = None, batch_size: Optional[int] = None, seed: Optional[int] = None,
                 feature_extractor: Optional[str] = None, inception_weights: Optional[str] = None,
                 extractor_weights: Optional[str] = None, cache_dir: Optional[str] = None, options: Optional[dict] = None,
                 likelihood: Optional[dict] = None, out: Optional[str] = None,
                 direction: Optional[str] = None, checkpoint: Optional[str] = None) -> int:
    from accelerate import PartialState

    from distgen.export.meta import EXPORT_META
    from distgen.sample import likelihood_options, load_ema, sampling_options

    state = PartialState(cpu=dist.cpu_only())  # joins the process group under accelerate launch / torchrun
    family, nets, cfg = load_ema(path, state.device, checkpoint)
    spec: EvalSpec = spec_from_config(cfg, metrics=parse_metrics(metrics), num_samples=num_samples, ref=ref,
                                      test=test, batch_size=batch_size, seed=seed,
                                      feature_extractor=feature_extractor, inception_weights=inception_weights,
                                      extractor_weights=extractor_weights,
                                      cache_dir=cache_dir, direction=direction)
    if offers(family, Translates):
        try:
            spec.direction = family.check_direction(direction)
        except ValueError as e:
            raise EvalError(str(e)) from None
    elif direction is not None:
        raise EvalError(f"--direction: the {family.name} family translates nothing (pix2pix and CycleGAN do)")
    if (Path(path) / EXPORT_META).is_file():
        # An export may come from anywhere: the shards its stored config names are data to read, never
        # shell commands to run. pipe: runs only when the user types it (--ref / --test, or their config).
        for flag, given, stored, key in (("--ref", ref, spec.ref, "eval.ref or data.train"),
                                         ("--test", test, spec.test, "data.eval")):
            piped = [u for u in (stored or []) if str(u).startswith("pipe:")] if given is None else []
            if piped:
                raise EvalError(f"{Path(path) / EXPORT_META}: its stored config's {key} is a pipe: command "
                                f"({piped[0]!r}), which distgen does not run from a stored config; "
                                f"pass {flag} SHARDS|MANIFEST")
    spec.sampling = sampling_options(family, options or {})
    spec.likelihood = likelihood_options(family, likelihood or {})
    res = Evaluator(spec, state.device).run(family, nets, cfg.data)
    if dist.is_main():
        what = f"{spec.num_samples} samples, extractor {res['extractor']}, " if res["extractor"] else ""
        if "translated_images" in res:
            what = (f"{res['translated_images']} test inputs translated {spec.direction}"
                    + (f", extractor {res['extractor']}, " if res["extractor"] else ", "))
        from distgen import threads

        source = f"{path} ({checkpoint})" if checkpoint else path
        print(f"distgen eval: {source}: {what}seed {spec.seed}, {dist.world_size()} process(es), "
              f"{threads.describe()}, {res['seconds']:.1f}s")
        if res.get("extractor_about"):
            print(f"  extractor: {spec.feature_extractor}: {res['extractor_about']}")
        print(format_results(res, spec.feature_extractor))
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps({"path": path, "checkpoint": checkpoint, "seed": spec.seed,
                                             **res}, indent=2) + "\n")
    dist.barrier()
    # Asked-for metrics that could not be computed make the command fail (after saying why).
    return 1 if res.get("skipped") else 0

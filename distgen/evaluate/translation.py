"""Translators (pix2pix, CycleGAN: :class:`distgen.families.capabilities.Translates`) are scored on their
translations of the test inputs: feature metrics of the translations, ``paired`` (mean L1, PSNR and SSIM against
the ground truth of paired shards) and ``target_class`` (the share the domain classifier assigns to the target
domain's class)."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from distgen import dist
from distgen.errors import EvalError
from distgen.evaluate import passes
from distgen.evaluate.recon import psnr, ssim
from distgen.evaluate.spec import EvalSpec


def translated(family, nets, data_cfg, spec: EvalSpec, extractor, device: torch.device, pairs: bool
               ) -> tuple[Optional[dict[str, torch.Tensor]], dict]:
    """Features of the translations of every test input (index order, on rank 0) and, with ``pairs``, their
    mean L1 (on [0, 1]), PSNR and SSIM against the ground truth: each test input once, split over ranks."""
    from distgen.translate import iter_inputs, translate_uint8

    if not spec.test:
        raise EvalError("a translator is scored on test inputs: --test SHARDS|MANIFEST, or data.eval in the config")
    idx, feats = [], {k: [] for k in (extractor.features if extractor else [])}
    sums = [0.0, 0.0, 0.0, 0.0]  # L1, PSNR, SSIM, images
    with torch.no_grad():
        for index, _names, x, target in iter_inputs(spec.test, data_cfg, spec.direction,
                                                    batch_size=spec.batch_size, rank=dist.rank(),
                                                    world=dist.world_size(), want_targets=pairs):
            y = translate_uint8(family, nets, x, spec.direction, device)
            if extractor is not None:
                out = extractor(y)
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
    return (passes.gather_in_order(idx, feats) if extractor is not None else None), res


def target_class(ref: Optional[list[str]], gen: dict[str, torch.Tensor]) -> tuple[dict, Optional[str]]:
    """The share of translations the domain classifier assigns to the target domain's class (the
    reference manifest's ``source_class``: distgen data shard fashion-mnist:classes=A/B), or why it is skipped."""
    from distgen.data import resolve_shards

    target = resolve_shards(ref).meta.get("source_class") if ref else None
    if not isinstance(target, dict) or not isinstance(target.get("index"), int):
        return {}, (f"the reference {ref} names no source class (domain shards of "
                    f"fashion-mnist:classes=A/B record one)")
    logits = gen["logits"]
    if not 0 <= target["index"] < logits.shape[1]:
        raise EvalError(f"target_class: the reference's class {target['index']} ({target.get('name')}) is not "
                        f"among the domain classifier's {logits.shape[1]} classes")
    share = float((logits.argmax(1) == target["index"]).double().mean())
    return {"target_class_share": share, "target_class": target.get("name", target["index"])}, None

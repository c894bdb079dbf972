"""``accuracy``: top-1 accuracy of a family that classifies (JEM, :class:`distgen.families.capabilities.Classifies`)
on the labelled test split, every image once."""

from __future__ import annotations

from dataclasses import replace

import torch

from distgen import dist
from distgen.errors import EvalError
from distgen.evaluate.passes import batches_of_test_split
from distgen.evaluate.spec import EvalSpec


def accuracy(family, nets, data_cfg, spec: EvalSpec, device: torch.device) -> dict:
    """Top-1 accuracy of the family's classifier on the labelled test split, every image once."""
    right, n = 0, 0
    with torch.no_grad():
        for x, labels, _gens in batches_of_test_split(spec, replace(data_cfg, labels=True), "accuracy", device):
            logits = family.classify(nets, x.float() / 127.5 - 1)
            right += int((logits.argmax(1).cpu() == labels).sum())
            n += x.shape[0]
    right, n = dist.all_reduce_floats([float(right), float(n)])
    if n == 0:
        raise EvalError(f"accuracy: the test shards {spec.test} hold no images")
    return {"accuracy": right / n, "accuracy_images": int(n)}

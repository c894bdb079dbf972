"""``bpd``: bits per dimension of the test split. The family supplies log p(x) per image (or a lower bound,
:class:`distgen.families.capabilities.Likelihood`); the pass over the test split, the sum across ranks and the
units are here."""

from __future__ import annotations

import math

import torch

from distgen import dist
from distgen.errors import EvalError
from distgen.evaluate.passes import batches_of_test_split
from distgen.evaluate.spec import EvalSpec


def bpd(family, nets, data_cfg, spec: EvalSpec, device: torch.device) -> dict:
    """Bits per dimension of the test split: -log2 p(x) / (C H W), summed over every image once."""
    nll, n = 0.0, 0
    with torch.no_grad():
        # One generator per image, seeded by (seed, index): a stochastic bound (dequantisation,
        # a VAE's posterior sample) is then the same at any world size.
        for x, labels, gens in batches_of_test_split(spec, data_cfg, "bpd", device):
            logp = family.log_likelihood(nets, x, labels.to(device) if labels is not None else None, gens,
                                         **spec.likelihood)
            nll -= float(logp.double().sum())
            n += x.shape[0]
    nll = dist.all_reduce_sum(float(nll))
    total = int(dist.all_reduce_sum(n))
    if total == 0:
        raise EvalError(f"bpd: the test shards {spec.test} hold no images")
    dims = data_cfg.channels * data_cfg.resolution ** 2
    out = {"bpd": nll / (total * dims * math.log(2)), "bpd_images": total, "bpd_kind": family.likelihood}
    out.update({f"bpd_{k}": v for k, v in spec.likelihood.items()})
    return out

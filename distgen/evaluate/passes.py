"""Passes over images, split over ranks: features of batches gathered on rank 0 in index order, the features of
generated images, and the exact pass over the test split that bpd, recon and accuracy take.

- Generated images: image ``i`` comes from the seed (seed, i) and indices are
  dealt in fixed blocks (see :mod:`distgen.sample`), so the image set, and the
  metric, do not depend on the number of processes.
- Features come from torch-fidelity's extractors; rank 0 gathers them (uneven
  shares are fine) and puts them back in index order: KID's subsets and IS's
  splits depend on that order, so it matches a one-process run.
"""

from __future__ import annotations

from typing import Iterable, Optional

import numpy as np
import torch

from distgen import dist
from distgen.errors import EvalError
from distgen.evaluate.spec import EvalSpec


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


def extract(extractor, batches: Iterable[tuple[np.ndarray, torch.Tensor]]):
    """This rank's (index pieces, {layer: feature pieces}) of ``batches`` of (index, uint8 images)."""
    idx, feats = [], {k: [] for k in extractor.features}
    for index, images in batches:
        out = extractor(images)
        idx.append(np.asarray(index, dtype=np.int64))
        for k in feats:
            feats[k].append(out[k])  # left on the device until gathered
    return idx, feats


def generated_features(family, nets, spec: EvalSpec, extractor, device: torch.device
                       ) -> Optional[dict[str, torch.Tensor]]:
    """Features of ``num_samples`` generated images, in index order, on rank 0."""
    from distgen.sample import iter_blocks

    def batches():
        pending_i, pending_x = [], []
        for index, images, _labels in iter_blocks(family, nets, spec.num_samples, seed=spec.seed,
                                                  device=device, rank=dist.rank(),
                                                  world=dist.world_size(), options=spec.sampling,
                                                  on_device=True):
            pending_i += index
            pending_x.append(images)
            if len(pending_i) >= spec.batch_size:
                yield np.array(pending_i), torch.cat(pending_x)
                pending_i, pending_x = [], []
        if pending_i:
            yield np.array(pending_i), torch.cat(pending_x)

    idx, feats = extract(extractor, batches())
    return gather_in_order(idx, feats)


def batches_of_test_split(spec: EvalSpec, data_cfg, what: str, device: torch.device):
    """(uint8 images, labels, one generator per image) of one exact pass over the test split."""
    from distgen.data import make_loader

    if not spec.test:
        raise EvalError(f"{what} needs test shards (--test SHARDS|MANIFEST, or data.eval in the config)")
    loader = make_loader(spec.test, data_cfg, batch_size=spec.batch_size, mode="eval",
                         rank=dist.rank(), world=dist.world_size(), as_float=False)
    for batch in loader:
        gens = [torch.Generator(device=device).manual_seed(dist.derive_seed(spec.seed, int(i)))
                for i in batch["index"]]
        yield batch["image"].to(device), batch.get("label"), gens

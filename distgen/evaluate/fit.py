"""``distgen eval fit-features``: a small classifier whose features give domain FD / KID / PR.

InceptionV3 features mean little for 28x28 greyscale images, and its weights
may not be reachable offline. A classifier trained on the labelled data
itself gives a feature space that is meaningful there (as in the Fréchet
distances used for MNIST-like data), and it is registered with torch-fidelity
like any other extractor.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from distgen.config import DataConfig
from distgen.evaluate.extractors import DOMAIN_FORMAT, DomainNet, EvalError, uint8_to_input


def _test_inputs(shards: list[str], test: Optional[list[str]]) -> list[str]:
    if test:
        return test
    if len(shards) == 1 and shards[0].endswith(".json"):
        sibling = Path(shards[0]).with_name("test.manifest.json")
        if sibling.is_file() and sibling != Path(shards[0]):
            return [str(sibling)]
    raise EvalError("fit-features: no test split to report accuracy on; pass --test SHARDS|MANIFEST")


def fit_features(shards: list[str], out: str | Path, *, test: Optional[list[str]] = None, kimg: float = 120.0,
                 batch_size: int = 128, lr: float = 2e-3, width: int = 32, seed: int = 0, workers: int = 2,
                 log: Callable[[str], None] = print) -> dict:
    """Train a :class:`DomainNet` on labelled shards, report its test accuracy, save it as safetensors."""
    from safetensors.torch import save_file

    from distgen.data import make_loader, resolve_shards

    meta = resolve_shards(shards).meta
    ncls = int(meta.get("num_classes") or 0)
    if ncls < 2:
        raise EvalError(f"fit-features: {shards[0]} is not labelled with 2 or more classes (manifest num_classes)")
    if not meta.get("image_size"):
        raise EvalError(f"fit-features: {shards[0]}: the manifest gives no image size")
    res, chans = int(meta["image_size"][0]), int(meta.get("channels") or 1)
    test = _test_inputs(shards, test)
    cfg = DataConfig(resolution=res, channels=chans, labels=True, workers=workers, flip=False)
    torch.manual_seed(seed)
    net = DomainNet(ncls, width)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    steps = math.ceil(kimg * 1000 / batch_size)
    loader = make_loader(shards, cfg, batch_size=batch_size, mode="train", seed=seed, as_float=False)
    t0 = time.time()
    net.train()
    it = iter(loader)
    for step in range(1, steps + 1):
        batch = next(it)
        x = uint8_to_input(batch["image"].expand(-1, 3, -1, -1), res)
        lr_now = lr * 0.5 * (1 + math.cos(math.pi * step / steps))  # cosine to zero
        for g in opt.param_groups:
            g["lr"] = lr_now
        loss = F.cross_entropy(net(x)[1], batch["label"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps:
            log(f"fit-features: step {step}/{steps}  loss {loss.item():.4f}  {time.time() - t0:.0f}s")
    del it
    net.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in make_loader(test, cfg, batch_size=512, mode="eval", as_float=False):
            pred = net(uint8_to_input(batch["image"].expand(-1, 3, -1, -1), res))[1].argmax(1)
            correct += int((pred == batch["label"]).sum())
            total += len(pred)
    acc = correct / max(total, 1)
    info = {"num_classes": ncls, "resolution": res, "channels": chans, "width": width, "test_accuracy": acc,
            "test_images": total, "kimg": kimg, "train": list(shards), "test": list(test),
            "class_names": meta.get("class_names")}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp),
              metadata={"format": DOMAIN_FORMAT, "info": json.dumps(info)})
    tmp.replace(out)
    log(f"fit-features: test accuracy {acc:.4f} on {total} images ({time.time() - t0:.0f}s) -> {out}")
    return info

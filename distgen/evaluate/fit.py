"""``distgen eval fit-features``: a classifier whose features give domain FD / KID / PR, and its calibration.

InceptionV3 features mean little for 28x28 greyscale images, and its weights
may not be reachable offline. A classifier trained on the labelled data
itself gives a feature space that is meaningful there (as in the Fréchet
distances used for MNIST-like data), and it is registered with torch-fidelity
like any other extractor.

A feature space is only worth its numbers if known degradations of real
images move them, so fitting ends with a calibration table: FD against the
test split of the other real split (the floor), of the test images with
noise, blurred, blocky, and of a single class. It is printed, stored in the
file's metadata, and printed again by every ``distgen eval`` that uses the file.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

from distgen import readback
from distgen.config import DataConfig
from distgen.evaluate.extractors import (DOMAIN_ARCHS, DOMAIN_FORMAT, MAX_DOMAIN_RESOLUTION, MAX_DOMAIN_WIDTH,
                                         EvalError, build_domain_net, describe_domain, uint8_to_input)

NOISE_SD = 25.0  # of 255: the heavy-noise check
# What fit-features takes from the training shards' manifest (a file that may come from anywhere): it sizes the
# network's head and the images, and its class names go into the file and every evaluation's printout. The
# resolution bound is the reader's (read_domain_file), so whatever is fitted can be read back.
MANIFEST_META = readback.Obj({
    "num_classes": readback.Int(0, readback.MAX_CLASSES),
    "image_size": readback.Opt(readback.List(readback.Int(1, MAX_DOMAIN_RESOLUTION), min_len=2, max_len=2)),
    "channels": readback.Opt(readback.Int(1, 4)),
    "class_names": readback.Opt(readback.List(readback.Str(1000), max_len=readback.MAX_CLASSES)),
}, optional=("num_classes", "image_size", "channels", "class_names"), extra=True)


def _test_inputs(shards: list[str], test: Optional[list[str]]) -> list[str]:
    if test:
        return test
    if len(shards) == 1 and shards[0].endswith(".json"):
        sibling = Path(shards[0]).with_name("test.manifest.json")
        if sibling.is_file() and sibling != Path(shards[0]):
            return [str(sibling)]
    raise EvalError("fit-features: no test split to report accuracy on; pass --test SHARDS|MANIFEST")


def _file_identity(url: str):
    """What makes two shard names one file: device and inode (a link, another spelling of the path), else the
    resolved path; a ``pipe:`` command as written."""
    if url.startswith("pipe:"):
        return url
    try:
        st = os.stat(url)
    except OSError:
        return str(Path(url).resolve())
    return (st.st_dev, st.st_ino)


def check_held_out(shards: list[str], test: list[str]) -> None:
    """Refuse ``test`` shards that are training shards (the same manifest, the same files, or links to them):
    accuracy and calibration measured on training images would flatter the extractor."""
    from distgen.data import resolve_shards

    train = {_file_identity(u): u for u in resolve_shards(shards).urls}
    held = resolve_shards(test).urls
    shared = [(u, train[_file_identity(u)]) for u in held if _file_identity(u) in train]
    if shared:
        first, as_train = shared[0]
        raise EvalError(f"fit-features: --test {' '.join(test)} overlaps the training shards {' '.join(shards)}: "
                        f"{len(shared)} of its {len(held)} shard file(s) are training shards ({first}"
                        + (f", as {as_train}" if as_train != first else "")
                        + "); test accuracy and calibration must come from images the classifier is not trained on: "
                          "pass a held-out split")


def augment(x: torch.Tensor, gen: torch.Generator, shift: int = 2) -> torch.Tensor:
    """uint8 BxCxHxW -> random translations by up to ``shift`` pixels (edge pixels repeated) and horizontal flips."""
    b, _, h, w = x.shape
    p = F.pad(x.float(), (shift,) * 4, mode="replicate")
    dy, dx = (torch.randint(0, 2 * shift + 1, (2, b), generator=gen))
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    out = p[torch.arange(b)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None], rows, cols]
    flip = torch.rand(b, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out.to(torch.uint8)


# --------------------------------------------------------------------------- degradations of real images
def add_noise(x: torch.Tensor, sd: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (x.float() + sd * torch.randn(x.shape, generator=gen)).round().clamp(0, 255).to(torch.uint8)


def blur(x: torch.Tensor) -> torch.Tensor:
    """5x5 binomial blur ([1 4 6 4 1] / 16 each way), edges repeated."""
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16
    c = x.shape[1]
    w = (k[:, None] * k[None, :]).expand(c, 1, 5, 5)
    return F.conv2d(F.pad(x.float(), (2,) * 4, mode="replicate"), w, groups=c).round().clamp(0, 255).to(torch.uint8)


def blocky(x: torch.Tensor) -> torch.Tensor:
    """Averaged down to half the size, then each pixel repeated 2x2 (the issue's 14x14 upsampled)."""
    h, w = x.shape[-2:]
    small = F.interpolate(x.float(), size=(h // 2, w // 2), mode="area")
    return F.interpolate(small, size=(h, w), mode="nearest").round().clamp(0, 255).to(torch.uint8)


def fd(a: torch.Tensor, b_stats: dict) -> float:
    return float(fid_statistics_to_metric(fid_features_to_statistics(a), b_stats, False)[KEY_METRIC_FID])


def calibrate(features: Callable[[torch.Tensor], torch.Tensor], test: torch.Tensor, labels: torch.Tensor,
              other: torch.Tensor, class_names: Optional[list] = None, seed: int = 0,
              ref: Optional[torch.Tensor] = None) -> dict:
    """FD against ``test`` (uint8 NxCxHxW) of: ``other`` real images (the floor), ``test`` with Gaussian noise
    sd 25, blurred, blocky, the class nearest to the whole (the hardest single class to tell apart), and (apart,
    not a goal) the test images read at the next power-of-two size as training reads them and brought back
    with the same resampling: what scoring such a model's samples at the data's stored size would cost, and
    why distgen scores them at the model's size instead (see ``ReferenceLoader.resize_path`` in
    :mod:`distgen.evaluate.reference`). ``ref``: the test images' features, when the caller already has them."""
    from distgen.data.decode import resize_batch

    ref = features(test) if ref is None else ref
    stats = fid_features_to_statistics(ref)
    rows = [{"what": f"other real split ({len(other)} images)", "short": "real", "fd": fd(features(other), stats)},
            {"what": f"noise sd {NOISE_SD:g}", "short": "noise",
             "fd": fd(features(add_noise(test, NOISE_SD, seed)), stats)},
            {"what": "blur 5x5 binomial", "short": "blur", "fd": fd(features(blur(test)), stats)},
            {"what": "blocky (half size, pixels repeated)", "short": "blocky", "fd": fd(features(blocky(test)), stats)}]
    per_class = []
    for c in sorted(set(labels.tolist())):
        sel = labels == c
        if int(sel.sum()) >= 2:
            per_class.append((fd(ref[sel], stats), c))
    if per_class:
        v, c = min(per_class)
        name = class_names[c] if class_names and c < len(class_names) else str(c)
        rows.append({"what": f"one class ({name}, {int((labels == c).sum())} images; the nearest of "
                             f"{len(per_class)})", "short": "one class", "fd": v})
    res = test.shape[-1]
    via = 2 ** math.ceil(math.log2(res)) if 2 ** math.ceil(math.log2(res)) != res else 2 * res
    path = {"what": f"{res} -> {via} -> {res} px (why {via}x{via} models are scored at {via}x{via})",
            "short": f"via {via}px",
            "fd": fd(features(resize_batch(resize_batch(test, via), res)), stats)}
    floor = rows[0]["fd"]
    return {"reference": f"the test split ({len(test)} images)", "rows": rows, "path": path,
            "weakest_ratio": min(r["fd"] for r in rows[1:]) / max(floor, 1e-12)}


def format_calibration(cal: dict) -> str:
    floor = max(cal["rows"][0]["fd"], 1e-12)
    lines = [f"  {'image set':<52s} {'FD':>9s}  {'x floor':>8s}"]
    for r in cal["rows"] + [cal["path"]]:
        lines.append(f"  {r['what']:<52s} {r['fd']:9.4g}  {r['fd'] / floor:8.1f}")
    return "\n".join(lines)


def _read_images(shards: list[str], res: int, chans: int, n: Optional[int], labels: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` images (None: all) and labels of ``shards`` in order, uint8 NxCxHxW."""
    from distgen.data import make_loader

    cfg = DataConfig(resolution=res, channels=chans, labels=labels, workers=1, flip=False)
    xs, ys, got = [], [], 0
    for batch in make_loader(shards, cfg, batch_size=500, mode="eval", as_float=False):
        xs.append(batch["image"])
        ys.append(batch["label"] if labels else torch.zeros(len(batch["image"]), dtype=torch.long))
        got += len(batch["image"])
        if n is not None and got >= n:
            break
    return torch.cat(xs)[:n], torch.cat(ys)[:n]


def fit_features(shards: list[str], out: str | Path, *, test: Optional[list[str]] = None, kimg: float = 480.0,
                 batch_size: int = 128, lr: float = 2e-3, width: int = 32, arch: str = "resnet", seed: int = 0,
                 workers: int = 2, calibration_images: int = 10000, log: Callable[[str], None] = print) -> dict:
    """Train a domain classifier on labelled shards, report its test accuracy and calibration, save it as
    safetensors (the network, and what was measured, in its metadata)."""
    from safetensors.torch import save_file

    from distgen.data import make_loader, resolve_shards

    meta = MANIFEST_META.check(resolve_shards(shards).meta, readback.Where(shards[0]), EvalError)
    ncls = meta.get("num_classes") or 0
    if ncls < 2:
        raise EvalError(f"fit-features: {shards[0]} is not labelled with 2 or more classes (manifest num_classes)")
    if not meta.get("image_size"):
        raise EvalError(f"fit-features: {shards[0]}: the manifest gives no image size")
    if arch not in DOMAIN_ARCHS:
        raise EvalError(f"fit-features: --arch {arch!r}: choose from {', '.join(DOMAIN_ARCHS)}")
    if calibration_images < 20:
        raise EvalError("fit-features: --calibration-images must be >= 20")
    if not (1 <= width <= MAX_DOMAIN_WIDTH and (arch != "cnn" or width % 8 == 0)):
        raise EvalError(f"fit-features: --width {width}: from 1 to {MAX_DOMAIN_WIDTH}"
                        + (" and a multiple of 8 for --arch cnn" if arch == "cnn" else ""))
    res, chans = meta["image_size"][0], meta.get("channels") or 1
    test = _test_inputs(shards, test)
    check_held_out(shards, test)  # before any training
    cfg = DataConfig(resolution=res, channels=chans, labels=True, workers=workers, flip=False)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    info = {"arch": arch, "num_classes": ncls, "width": width}
    net = build_domain_net(info)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=5e-4)
    steps = math.ceil(kimg * 1000 / batch_size)
    warmup = min(200, steps // 10)
    loader = make_loader(shards, cfg, batch_size=batch_size, mode="train", seed=seed, as_float=False)
    t0 = time.time()
    net.train()
    it = iter(loader)
    for step in range(1, steps + 1):
        batch = next(it)
        x = uint8_to_input(augment(batch["image"], gen).expand(-1, 3, -1, -1), res)
        # linear warm-up, then cosine to zero
        lr_now = lr * min(1.0, step / max(warmup, 1)) * 0.5 * (1 + math.cos(math.pi * step / steps))
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

    @torch.no_grad()
    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fs, ls = zip(*(net(uint8_to_input(c.expand(-1, 3, -1, -1), res)) for c in x.split(500)))
        return torch.cat(fs), torch.cat(ls)

    # the test split decoded and run through the net once: every image for the accuracy, the first
    # calibration_images (images and features) for the table
    test_x, test_y = _read_images(test, res, chans, None, labels=True)
    total = len(test_x)
    test_f, test_logits = run(test_x)
    acc = float((test_logits.argmax(1) == test_y).double().mean()) if total else 0.0
    log(f"fit-features: test accuracy {acc:.4f} on {total} images ({time.time() - t0:.0f}s)")

    n = calibration_images
    other = _read_images(shards, res, chans, n, labels=False)[0]
    cal = calibrate(lambda x: run(x)[0], test_x[:n], test_y[:n], other, meta.get("class_names"), seed,
                    ref=test_f[:n])
    info.update({"resolution": res, "channels": chans, "test_accuracy": acc, "test_images": total, "kimg": kimg,
                 "train": list(shards), "test": list(test), "class_names": meta.get("class_names"),
                 "calibration": cal})
    log(f"fit-features: calibration, FD against {cal['reference']}:\n{format_calibration(cal)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp),
              metadata={"format": DOMAIN_FORMAT, "info": json.dumps(info)})
    tmp.replace(out)
    log(f"fit-features: {describe_domain(info)} ({time.time() - t0:.0f}s) -> {out}")
    return info

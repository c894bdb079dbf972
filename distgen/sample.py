"""``distgen sample`` and ``distgen export``: EMA weights out of a run, images out of weights.

Image ``i`` is drawn from its own generator seeded by (seed, i), and images
are computed in fixed blocks of consecutive indices dealt round-robin to the
ranks, so the files are the same whatever the number of processes.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from distgen import checkpoint as ckpt
from distgen import dist
from distgen.config import Config, build_dataclass, to_dict
from distgen.families import DataInfo, build_family

EXPORT_META = "distgen.json"
BLOCK = 16  # images per forward pass; part of what makes results independent of world size


class SampleError(RuntimeError):
    pass


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float NCHW in [-1, 1] -> uint8 NHWC."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: torch.Tensor | np.ndarray, path: Path, nrow: Optional[int] = None) -> Path:
    """A PNG grid of float [-1, 1] NCHW images (or uint8 NHWC)."""
    from PIL import Image

    x = to_uint8(images) if torch.is_tensor(images) else images
    n, h, w, c = x.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    pad = 2
    canvas = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        canvas[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = x[i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas[:, :, 0] if c == 1 else canvas).save(path)
    return path


def _load_config(d: dict, where: Path) -> Config:
    try:
        return build_dataclass(Config, d)
    except Exception as e:
        raise SampleError(f"{where}: the stored config does not load ({e})") from None


def load_ema(path: str | Path, device: str | torch.device = "cpu"):
    """(family, EMA networks, config) from a run folder (newest checkpoint) or an export folder."""
    path = Path(path)
    if (path / EXPORT_META).is_file():
        meta = json.loads((path / EXPORT_META).read_text())
        cfg = _load_config(meta["config"], path / EXPORT_META)
        family = build_family(cfg.model, DataInfo(**meta["data_info"]))
        nets = family.load_export(path)
    elif (path / "checkpoints").is_dir() or (path / "meta.json").is_file():
        cp = path if (path / "meta.json").is_file() else ckpt.newest_checkpoint(path / "checkpoints")
        if cp is None:
            raise SampleError(f"{path}/checkpoints: no complete checkpoint")
        meta = ckpt.read_meta(cp)
        cfg = _load_config(meta["config"], cp / "meta.json")
        family = build_family(cfg.model, DataInfo(**meta["data_info"]))
        nets = family.build_networks()
        for n in family.ema_networks():
            nets[n].load_state_dict(ckpt.load_tensors(cp / f"ema0-{n}.safetensors"))
        for n in set(nets) - set(family.ema_networks()):
            if (cp / f"{n}.safetensors").is_file():  # e.g. a frozen autoencoder, as the run used it
                nets[n].load_state_dict(ckpt.load_tensors(cp / f"{n}.safetensors"))
    else:
        raise SampleError(f"{path}: neither a run folder (checkpoints/) nor an export folder ({EXPORT_META})")
    for n in nets.values():
        n.to(device).eval().requires_grad_(False)
    return family, nets, cfg


def export(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the primary EMA weights of a run's newest checkpoint in the family's standard format."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    cp = ckpt.newest_checkpoint(run_dir / "checkpoints")
    if cp is None:
        raise SampleError(f"{run_dir}/checkpoints: no complete checkpoint to export")
    meta = ckpt.read_meta(cp)
    family, nets, cfg = load_ema(run_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    n_cal = getattr(family, "calibration_images", 0)
    if n_cal:
        # an export that depends on the data (the autoencoder's latent scaling factor) sees its first images
        family.calibrate(nets, _first_images(cfg, n_cal))
    family.export(nets, tmp)
    (tmp / EXPORT_META).write_text(json.dumps({
        "family": family.name, "data_info": meta["data_info"], "config": to_dict(cfg),
        "source": {"checkpoint": str(cp), "step": meta["step"], "kimg": meta["nimg"] / 1000, "ema": 0},
    }, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def _first_images(cfg: Config, n: int) -> torch.Tensor:
    """The first ``n`` images of ``data.train`` in shard order (float NCHW on [-1, 1]), the same on every call."""
    from distgen.data import make_loader

    loader = make_loader(cfg.data.train, cfg.data, batch_size=min(n, 256), mode="eval", rank=0, world=1)
    out, got = [], 0
    for batch in loader:
        out.append(batch["image"])
        got += len(batch["image"])
        if got >= n:
            break
    if not out:
        raise SampleError(f"data.train {cfg.data.train}: no images to calibrate the export with")
    return torch.cat(out)[:n]


def image_seed(seed: int, index: int) -> int:
    return dist.derive_seed(seed, index)


def sampling_options(family, options: dict) -> dict:
    """The set sampling options, checked against those ``family`` takes (a SampleError names the others)."""
    try:
        return family.check_sample_options(options)
    except ValueError as e:
        raise SampleError(str(e)) from None


def likelihood_options(family, options: dict) -> dict:
    """The set bits/dim options (``--iw-samples``), checked against those ``family`` takes."""
    try:
        return family.check_likelihood_options(options)
    except ValueError as e:
        raise SampleError(str(e)) from None


def iter_blocks(family, nets, num: int, *, seed: int = 0, options: Optional[dict] = None,
                device="cpu", rank: int = 0, world: int = 1):
    """This rank's images, a block at a time: (indices, uint8 NHWC, labels or None).

    Blocks of BLOCK consecutive indices are dealt round-robin to the ranks, and
    image i is drawn from a generator seeded by (seed, i).
    """
    ncls = getattr(family, "num_classes", 0)
    for b in range(rank, math.ceil(num / BLOCK), world):
        idx = list(range(b * BLOCK, min((b + 1) * BLOCK, num)))
        gens = [torch.Generator(device=device).manual_seed(image_seed(seed, i)) for i in idx]
        labels = torch.tensor([i % ncls for i in idx]) if ncls else None
        with torch.no_grad():
            x = to_uint8(family.sample(nets, gens, labels=labels, **(options or {})))
        yield idx, x, (labels.numpy() if labels is not None else None)


def generate(family, nets, num: int, *, seed: int = 0, options: Optional[dict] = None,
             device="cpu", rank: int = 0, world: int = 1) -> dict[int, tuple[np.ndarray, int]]:
    """This rank's images: {index: (uint8 HWC, label)} for its blocks of indices."""
    out = {}
    for idx, x, labels in iter_blocks(family, nets, num, seed=seed, options=options, device=device, rank=rank,
                                      world=world):
        for j, i in enumerate(idx):
            out[i] = (x[j], int(labels[j]) if labels is not None else -1)
    return out


def _read_image(path: str, channels: int, resolution: int) -> torch.Tensor:
    """An image file as uint8 CHW with the model's channels and size, or an error naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(path)
        img.load()
    except (OSError, UnidentifiedImageError) as e:
        raise SampleError(f"{path}: not a readable image ({e})") from None
    if img.size != (resolution, resolution):
        raise SampleError(f"{path}: is {img.size[0]}x{img.size[1]}, the model takes {resolution}x{resolution}")
    a = np.asarray(img.convert("L" if channels == 1 else "RGB"))
    return torch.from_numpy(a.copy()).view(resolution, resolution, channels).permute(2, 0, 1)


def _write_images(x: np.ndarray, y: np.ndarray, outp: Path) -> None:
    if outp.suffix == ".png":
        save_grid(x, outp)
    elif outp.suffix == ".npz":
        outp.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"x": x} if (y < 0).all() else {"x": x, "y": y}
        np.savez(outp, **arrays)
    else:
        from PIL import Image

        outp.mkdir(parents=True, exist_ok=True)
        for i in range(len(x)):
            img = x[i, :, :, 0] if x.shape[3] == 1 else x[i]
            Image.fromarray(img).save(outp / f"{i:06d}.png")


def sample_command(path: str, num: int, out: str, *, seed: int = 0, options: Optional[dict] = None,
                   interpolate: Optional[tuple[str, str]] = None) -> int:
    from accelerate import PartialState

    state = PartialState(cpu=dist.cpu_only())  # joins the process group under accelerate launch / torchrun
    device = state.device
    family, nets, cfg = load_ema(path, device)
    if interpolate is not None:
        return _interpolate_command(family, nets, cfg, interpolate, num, Path(out), device)
    options = sampling_options(family, options or {})
    mine = generate(family, nets, num, seed=seed, options=options, device=device, rank=dist.rank(),
                    world=dist.world_size())
    parts = dist.all_gather_object(mine)
    if dist.is_main():
        allimgs = {}
        for p in parts:
            allimgs.update(p)
        x = np.stack([allimgs[i][0] for i in range(num)])
        y = np.array([allimgs[i][1] for i in range(num)])
        outp = Path(out)
        _write_images(x, y, outp)
        shown = ", ".join(f"{k} {v}" for k, v in options.items())
        print(f"distgen: {num} samples (seed {seed}{', ' + shown if shown else ''}) from {path} -> {outp}")
    dist.barrier()
    return 0


def _interpolate_command(family, nets, cfg: Config, files: tuple[str, str], num: int, outp: Path, device) -> int:
    """``num`` images on the latent path from one image file to the other (rank 0 does the work)."""
    if not hasattr(family, "interpolate"):
        raise SampleError(f"--interpolate: model.family {cfg.model.family!r} has no latent interpolation")
    if num < 2:
        raise SampleError(f"--interpolate: --num is the number of images on the path, at least 2, got {num}")
    a, b = (_read_image(f, cfg.data.channels, cfg.data.resolution).to(device) for f in files)
    if dist.is_main():
        x = to_uint8(family.interpolate(nets, a, b, steps=num))
        _write_images(x, np.full(num, -1), outp)
        print(f"distgen: {num} images from {files[0]} to {files[1]} in latent space -> {outp}")
    dist.barrier()
    return 0

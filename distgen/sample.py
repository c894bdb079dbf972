"""``distgen sample``: EMA weights out of a run or an export (:mod:`distgen.export`), images out of weights.

Image ``i`` is drawn from its own generator seeded by (seed, i), and images
are computed in fixed blocks of consecutive indices dealt round-robin to the
ranks, so the files are the same whatever the number of processes.
"""

from __future__ import annotations

import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from distgen import checkpoint as ckpt
from distgen import dist
from distgen.config import Config
from distgen.errors import CheckpointError, ConfigError, SampleError
from distgen.families import DataInfo, build_family
from distgen.export.meta import EXPORT_META, data_info, load_config, read_export_meta
from distgen.families.capabilities import Interpolates, Likelihood, Translates, checked_options, offers

BLOCK = 16  # images per forward pass; part of what makes results independent of world size


def to_uint8_nchw(images: torch.Tensor) -> torch.Tensor:
    """float NCHW in [-1, 1] -> uint8 NCHW, on the images' device."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float NCHW in [-1, 1] -> uint8 NHWC (numpy)."""
    return to_uint8_nchw(images).permute(0, 2, 3, 1).cpu().numpy()


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
    with _replacing(path) as tmp:
        Image.fromarray(canvas[:, :, 0] if c == 1 else canvas).save(tmp, format="PNG")
    return path


@contextmanager
def _replacing(path: Path):
    """Write a file under a temporary name beside ``path`` and rename it over ``path`` when complete: an
    interrupted write leaves no half-written file that looks finished."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _build(cfg: Config, info: DataInfo, where: Path):
    try:
        return build_family(cfg.model, info)
    except (ConfigError, ValueError) as e:
        raise SampleError(f"{where}: {e}") from None


def _read_ema_checkpoint(folder: Path) -> tuple[Config, Any, dict, dict]:
    """(config, family, networks with their EMA weights, meta.json) of one checkpoint folder, or an error
    naming its file."""
    meta = ckpt.read_meta(folder, ckpt.EMA_KEYS)
    cfg = load_config(meta["config"], folder / "meta.json")
    family = _build(cfg, data_info(meta["data_info"], cfg, folder / "meta.json"), folder / "meta.json")
    nets = family.build_networks()
    for n in family.ema_networks():
        nets[n].load_state_dict(ckpt.load_tensors(ckpt.ema_file(folder, 0, n)))
    for n in set(nets) - set(family.ema_networks()):
        # e.g. a frozen autoencoder, as the run used it; a sharded checkpoint's trained networks assembled whole here
        from distgen.checkpoint_dcp import read_weights  # torch.distributed.checkpoint: 0.9 s, so imported here

        weights = read_weights(folder, n)
        if weights is not None:
            nets[n].load_state_dict(weights)
    if ckpt.family_rank_file(folder, 0).is_file():  # rank 0's per-rank state (an EBM's replay buffer, for export)
        family.load_rank_state(ckpt.load_tensors(ckpt.family_rank_file(folder, 0)))
    return cfg, family, nets, meta


def newest_ema_checkpoint(run_dir: Path, checkpoint: Optional[str] = None) -> tuple[Path, tuple]:
    """The checkpoint of a run folder that ``checkpoint`` names (step-N, latest or best; None: latest, the newest
    whose EMA weights load, a newer damaged one reported on stderr) and what it holds, or a SampleError naming
    it and listing what the run has."""
    from distgen.checkpoint_choice import choose

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    return choose(Path(run_dir), checkpoint, _read_ema_checkpoint, log)


PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def _pickled_weights(folder: Path) -> list[Path]:
    """Files of an export folder (and its sub-folders, one level) that hold weights as pickles: a diffusers
    ``*.bin`` or a torch ``.pt``, which from_pretrained would unpickle where a .safetensors is missing."""
    return [p for pattern in ("*", "*/*") for p in sorted(folder.glob(pattern))
            if p.suffix in PICKLED_SUFFIXES and p.is_file()]


@contextmanager
def _quiet_diffusers():
    """diffusers logs a failed from_pretrained at error level before raising: the error distgen raises is the one
    line the user sees."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity(dlog.CRITICAL)
    try:
        yield
    finally:
        dlog.set_verbosity(level)


def load_ema(path: str | Path, device: str | torch.device = "cpu", checkpoint: Optional[str] = None):
    """(family, EMA networks, config) from a run folder (the checkpoint ``checkpoint`` names; None: the newest
    that loads) or an export folder."""
    path = Path(path)
    if checkpoint is not None and not (path / "checkpoints").is_dir():
        from distgen.checkpoint_choice import parse

        parse(checkpoint)  # a bad name is refused as such
        raise SampleError(f"--checkpoint {checkpoint}: {path} is not a run folder (no checkpoints/): an export or "
                          f"a checkpoint folder holds one set of weights; pass the run folder")
    if (path / EXPORT_META).is_file():
        cfg, info = read_export_meta(path)
        family = _build(cfg, info, path / EXPORT_META)
        try:
            with _quiet_diffusers():
                nets = family.load_export(path)
        except (SampleError, ConfigError):
            raise
        except Exception as e:  # missing or damaged weight files, a bad sub-config
            pickled = _pickled_weights(path)
            if pickled:  # say why the file that is there was not read
                raise SampleError(f"{pickled[0]}: a pickled weights file, which distgen does not load (unpickling can "
                                  f"run code); the export's networks are read from .safetensors files alone "
                                  f"({ckpt.describe_failure(path, e)})") from None
            raise SampleError(f"{path}: the export's networks do not load ({ckpt.describe_failure(path, e)})") from None
    elif (path / "meta.json").is_file():  # one checkpoint folder (or run_dir/best)
        try:
            cfg, family, nets, _ = _read_ema_checkpoint(path)
        except CheckpointError as e:
            raise SampleError(str(e)) from None
    elif (path / "checkpoints").is_dir():
        _, (cfg, family, nets, _) = newest_ema_checkpoint(path, checkpoint)
    else:
        raise SampleError(f"{path}: neither a run folder (checkpoints/) nor an export folder ({EXPORT_META})")
    for n in nets.values():
        n.to(device).eval().requires_grad_(False)
    return family, nets, cfg


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
        if offers(family, Likelihood):
            return family.check_likelihood_options(options)
        return checked_options(options, (), f"the {family.name} family's likelihood takes no option")
    except ValueError as e:
        raise SampleError(str(e)) from None


def iter_blocks(family, nets, num: int, *, seed: int = 0, options: Optional[dict] = None,
                device="cpu", rank: int = 0, world: int = 1, on_device: bool = False):
    """This rank's images, a block at a time: (indices, uint8 NHWC numpy, labels or None), or with
    ``on_device`` uint8 NCHW tensors left on the device (evaluation feeds them to its extractor there:
    no round trip through host memory, no wait between sampling and extraction).

    Blocks of BLOCK consecutive indices are dealt round-robin to the ranks, and
    image i is drawn from a generator seeded by (seed, i).
    """
    ncls = family.num_classes
    for b in range(rank, math.ceil(num / BLOCK), world):
        idx = list(range(b * BLOCK, min((b + 1) * BLOCK, num)))
        gens = [torch.Generator(device=device).manual_seed(image_seed(seed, i)) for i in idx]
        labels = torch.tensor([i % ncls for i in idx]) if ncls else None
        with torch.no_grad():
            x = family.sample(nets, gens, labels=labels, **(options or {}))
            x = to_uint8_nchw(x) if on_device else to_uint8(x)
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
    from distgen.data.pixels import to_8bit

    a = np.asarray(to_8bit(img, path).convert("L" if channels == 1 else "RGB"))
    return torch.from_numpy(a.copy()).view(resolution, resolution, channels).permute(2, 0, 1)


def _write_images(x: np.ndarray, y: np.ndarray, outp: Path) -> None:
    if outp.suffix == ".png":
        save_grid(x, outp)
    elif outp.suffix == ".npz":
        outp.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"x": x} if (y < 0).all() else {"x": x, "y": y}
        with _replacing(outp) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
    else:
        from PIL import Image

        outp.mkdir(parents=True, exist_ok=True)
        for i in range(len(x)):
            img = x[i, :, :, 0] if x.shape[3] == 1 else x[i]
            Image.fromarray(img).save(outp / f"{i:06d}.png")


OUTPUT_KINDS = "FILE.png (a grid), FILE.npz, or a folder (a name without a suffix) for one PNG per image"


def check_output(out: str | Path, force: bool = False) -> Path:
    """``--out`` checked before any compute: a .png or .npz file, or a folder (no suffix), that can be
    written (its folder is made, and a probe file written and removed). A SampleError names ``--out``.

    A folder must be new or empty unless ``force``: images go in as 000000.png, ... (or the inputs' names), which
    would silently replace a user's files of those names and mix the rest with this sample's images."""
    outp = Path(out)
    kind = outp.suffix.lower()
    if kind and kind not in (".png", ".npz"):
        raise SampleError(f"--out {out}: {kind!r} is not an output kind distgen writes; write {OUTPUT_KINDS}")
    if kind and outp.is_dir():
        raise SampleError(f"--out {out}: is a folder; a {kind} file needs another name")
    if not kind and outp.exists() and not outp.is_dir():
        raise SampleError(f"--out {out}: exists and is not a folder (write {OUTPUT_KINDS})")
    if not kind and outp.is_dir() and not force and any(outp.iterdir()):
        from distgen.ownership import listing

        raise SampleError(f"--out {out}: the folder is not empty ({listing(outp)}); images would replace files of "
                          f"the same names (000000.png, ...). Write into a new or empty folder, or pass --force to "
                          f"write over them")
    folder = outp if not kind else outp.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".distgen-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise SampleError(f"--out {out}: cannot be written ({e.strerror or e})") from None
    return outp


def sample_command(path: str, num: int, out: str, *, seed: int = 0, options: Optional[dict] = None,
                   interpolate: Optional[tuple[str, str]] = None, checkpoint: Optional[str] = None,
                   force: bool = False) -> int:
    from accelerate import PartialState

    state = PartialState(cpu=dist.cpu_only())  # joins the process group under accelerate launch / torchrun
    device = state.device
    if dist.is_main():
        check_output(out, force)
    family, nets, cfg = load_ema(path, device, checkpoint)
    if interpolate is not None:
        return _interpolate_command(family, nets, cfg, interpolate, num, Path(out), device)
    if offers(family, Translates):
        raise SampleError(f"{path}: the {family.name} family translates images rather than sampling them: "
                          f"pass --input IMAGE|FOLDER|SHARDS")
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
        source = f"{path} ({checkpoint})" if checkpoint else path
        print(f"distgen: {num} samples (seed {seed}{', ' + shown if shown else ''}) from {source} -> {outp}")
        if family.last_nfe is not None:  # network evaluations per image (a guided one is a batch of 2)
            print(f"NFE {family.last_nfe}")
    dist.barrier()
    return 0


def _interpolate_command(family, nets, cfg: Config, files: tuple[str, str], num: int, outp: Path, device) -> int:
    """``num`` images on the latent path from one image file to the other (rank 0 does the work)."""
    if not offers(family, Interpolates):
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

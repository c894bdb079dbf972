"""``distgen sample EXPORT --input ...`` for translators (pix2pix, CycleGAN), and the translation pass that
``distgen eval`` scores.

Inputs are an image file, a folder of images, or shards (a manifest, brace pattern or tar files). They
are numbered in a fixed order (sorted file names, or shard order) and dealt to the ranks in blocks of
consecutive indices (files) or by the exact evaluation split (shards), so the output is the same
whatever the number of processes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from distgen import dist
from distgen.data.sources.folders import IMAGE_SUFFIXES  # what a folder: source shards, a folder input translates
from distgen.errors import SampleError
from distgen.sample import BLOCK  # images per forward pass, as sampling
from distgen.families.capabilities import Translates, offers


def input_side(meta: dict, direction: str) -> str:
    """The batch key holding the inputs of ``direction``: a pair's ``a`` (AtoB) or ``b`` (BtoA), or ``image``
    in image / domain shards."""
    if meta.get("layout") == "paired":
        return "a" if direction == "AtoB" else "b"
    return "image"


def _image_files(spec: str) -> Optional[list[Path]]:
    """The image files an ``--input`` names (one file, or a folder's images sorted by name), or None for shards."""
    p = Path(spec)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise SampleError(f"--input {spec}: a folder without images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return files
    if p.suffix.lower() in IMAGE_SUFFIXES:
        if not p.is_file():
            raise SampleError(f"--input {spec}: not found")
        return [p]
    return None


def _read_file(path: Path, data_cfg) -> torch.Tensor:
    """An image file as uint8 CHW at the model's channels and resolution (resized as the training data was)."""
    from PIL import Image, UnidentifiedImageError

    from distgen.data.decode import fit_image

    from distgen.data.pixels import to_8bit

    try:
        with Image.open(path) as im:
            im.load()
            im = to_8bit(im, str(path))  # 16 bits scaled, alpha composited: as the training data was read
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise SampleError(f"{path}: not a readable image ({e})") from None
    im = im.convert("L" if data_cfg.channels == 1 else "RGB")
    return torch.from_numpy(fit_image(im, data_cfg.resolution, data_cfg.resize).copy())


def iter_inputs(spec: str | list[str], data_cfg, direction: str, *, batch_size: int = BLOCK, rank: int = 0,
                world: int = 1, want_targets: bool = False) -> Iterator[tuple[np.ndarray, list[str], torch.Tensor,
                                                                                  Optional[torch.Tensor]]]:
    """This rank's inputs, a batch at a time: (global indices, names, uint8 NCHW inputs, uint8 targets or None).
    Targets come with paired shards (the other side of each pair) when ``want_targets``."""
    from dataclasses import replace

    files = _image_files(spec) if isinstance(spec, str) else None
    if files is not None:
        for b in range(rank, math.ceil(len(files) / batch_size), world):
            idx = list(range(b * batch_size, min((b + 1) * batch_size, len(files))))
            x = torch.stack([_read_file(files[i], data_cfg) for i in idx])
            yield np.array(idx), [files[i].stem for i in idx], x, None
        return
    from distgen.data import make_loader, resolve_shards

    inputs = [spec] if isinstance(spec, str) else list(spec)
    meta = resolve_shards(inputs).meta
    side = input_side(meta, direction)
    cfg = replace(data_cfg, labels=False, flip=False)
    loader = make_loader(inputs, cfg, batch_size=batch_size, mode="eval", rank=rank, world=world, as_float=False)
    other = {"a": "b", "b": "a"}.get(side)
    for batch in loader:
        target = batch[other] if (want_targets and other) else None
        yield np.asarray(batch["index"]), [str(k).replace("/", "_") for k in batch["key"]], batch[side], target


def translate_uint8(family, nets, x: torch.Tensor, direction: str, device) -> torch.Tensor:
    """uint8 NCHW inputs -> uint8 NCHW translations, on ``device``."""
    from distgen.sample import to_uint8_nchw

    with torch.no_grad():
        xf = x.to(device).float() / 127.5 - 1
        return to_uint8_nchw(family.translate(nets, xf, direction))


def translate_command(path: str, inputs: str, out: str, *, direction: Optional[str] = None,
                      num: Optional[int] = None, checkpoint: Optional[str] = None, force: bool = False) -> int:
    """Translate ``inputs`` with a run's or export's EMA generator(s) into ``out`` (a grid of input | output
    rows, an .npz with both, or a folder of one PNG per input named after it)."""
    from accelerate import PartialState

    from distgen.sample import check_output, load_ema

    state = PartialState(cpu=dist.cpu_only())
    device = state.device
    if dist.is_main():
        check_output(out, force)
    family, nets, cfg = load_ema(path, device, checkpoint)
    if not offers(family, Translates):
        raise SampleError(f"--input: model.family {cfg.model.family!r} samples from noise and translates nothing; "
                          f"drop --input and give --num")
    try:
        direction = family.check_direction(direction)
    except ValueError as e:
        raise SampleError(str(e)) from None
    mine = {}
    for idx, names, x, _ in iter_inputs(inputs, cfg.data, direction, rank=dist.rank(), world=dist.world_size()):
        if num is not None:
            if idx.min() >= num:  # a rank's share comes in ascending order: nothing further is wanted
                break
            keep = idx < num
            idx, names, x = idx[keep], [n for n, k in zip(names, keep) if k], x[torch.from_numpy(keep)]
            if not len(idx):
                continue
        y = translate_uint8(family, nets, x, direction, device).cpu()
        for j, i in enumerate(idx):
            mine[int(i)] = (names[j], x[j].permute(1, 2, 0).numpy(), y[j].permute(1, 2, 0).numpy())
    parts = dist.all_gather_object(mine)
    if dist.is_main():
        got = {}
        for p in parts:
            got.update(p)
        if not got:
            raise SampleError(f"--input {inputs}: no images to translate")
        order = sorted(got)
        names = [got[i][0] for i in order]
        xin = np.stack([got[i][1] for i in order])
        xout = np.stack([got[i][2] for i in order])
        _write(Path(out), names, xin, xout)
        print(f"distgen: {len(order)} image(s) translated {direction} by {path} -> {out}")
    dist.barrier()
    return 0


def _write(outp: Path, names: list[str], xin: np.ndarray, xout: np.ndarray) -> None:
    from PIL import Image

    from distgen.sample import save_grid

    if outp.suffix == ".png":  # rows of up to 8 inputs, each above its translations
        k = 8 if len(xin) > 8 else len(xin)
        pad = (-len(xin)) % k
        blank = np.zeros((pad, *xin.shape[1:]), np.uint8)
        xi, xo = np.concatenate([xin, blank]), np.concatenate([xout, blank])
        rows = [r for c in range(0, len(xi), k) for r in (xi[c:c + k], xo[c:c + k])]
        save_grid(np.concatenate(rows), outp, nrow=k)
    elif outp.suffix == ".npz":
        outp.parent.mkdir(parents=True, exist_ok=True)
        np.savez(outp, x=xout, input=xin, names=np.array(names))
    else:
        outp.mkdir(parents=True, exist_ok=True)
        seen: dict[str, int] = {}
        for n, img in zip(names, xout):
            seen[n] = seen.get(n, 0) + 1
            stem = n if seen[n] == 1 else f"{n}-{seen[n]}"  # two inputs of one name keep both outputs
            Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img).save(outp / f"{stem}.png")

"""``distgen export``: a run's EMA weights in the family's standard format (a diffusers pipeline folder, or
safetensors with a config), ``distgen.json`` beside them, and with ``--format onnx`` the ONNX graphs and the
standalone sampler (:mod:`distgen.export.onnx`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from distgen.config import Config, to_dict
from distgen.durable import atomic_dir
from distgen.errors import SampleError
from distgen.export.meta import EXPORT_FORMAT, EXPORT_META
from distgen.families.capabilities import Calibrates, ExportsDiffusers, offers
from distgen.ownership import check_output_folder
from distgen.sample import newest_ema_checkpoint

EXPORT_FORMATS = ("native", "onnx")


def export(run_dir: str | Path, out_dir: str | Path, force: bool = False, fmt: str = "native",
           checkpoint: Optional[str] = None) -> Path:
    """Write the primary EMA weights of a run's checkpoint (``checkpoint``: step-N, latest or best; None: the
    newest that loads) in the family's standard format; with
    ``fmt="onnx"`` also the ONNX graphs, ``onnx.json`` and the standalone ``sample_onnx.py`` beside them.

    The export is built in a temporary folder beside ``out_dir`` and swapped in only when complete.
    """
    if fmt not in EXPORT_FORMATS:
        raise SampleError(f"--format: must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    run_dir = Path(run_dir)
    if checkpoint is not None:
        from distgen.checkpoint_choice import parse

        parse(checkpoint)  # a bad name is refused before anything else is read
    if not (run_dir / "checkpoints").is_dir():
        raise SampleError(f"{run_dir}: not a run folder (no checkpoints/)")
    out = check_output_folder(run_dir, Path(out_dir), force)
    cp, (cfg, family, nets, meta) = newest_ema_checkpoint(run_dir, checkpoint)
    with atomic_dir(out) as tmp:
        write_export(tmp, family, nets, cfg, meta["data_info"],
                     {"checkpoint": str(cp), "step": meta["step"], "kimg": meta["nimg"] / 1000, "ema": 0})
        if fmt == "onnx":
            from distgen.export.onnx import OnnxExportError, write_onnx

            try:
                write_onnx(tmp, family, nets)
            except (OnnxExportError, NotImplementedError) as e:
                raise SampleError(f"{out}: {e}") from None
    return out


def write_export(folder: Path, family, nets: dict, cfg: Config, data_info: dict, source: dict) -> None:
    """The family's standard format and export.json into ``folder`` (the caller makes it appear atomically)."""
    for n in nets.values():
        n.eval().requires_grad_(False)
    if offers(family, Calibrates):
        # an export that depends on the data (the autoencoder's latent scaling factor) sees its first images
        family.calibrate(nets, _first_images(cfg, family.calibration_images))
    write_format(folder, family, nets)
    (folder / EXPORT_META).write_text(json.dumps({
        "format": EXPORT_FORMAT, "family": family.name, "data_info": data_info, "config": to_dict(cfg), "source": source}, indent=2) + "\n")


def write_format(folder: Path, family, nets: dict) -> None:
    """The family's standard format (EMA ``nets`` in eval mode) into ``folder``: a diffusers pipeline distgen
    ships (class labels, a latent decoder: its code goes in the folder), else what the family's ``export``
    writes."""
    folder.mkdir(parents=True, exist_ok=True)
    shipped = family.diffusers_pipeline(nets) if offers(family, ExportsDiffusers) else None
    if shipped is not None:
        from distgen.export.pipelines import write_pipeline

        write_pipeline(folder, shipped)
    else:
        family.export(nets, folder)


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

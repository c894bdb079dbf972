"""``distgen data encode AE_DIR SHARDS OUT_DIR``: image shards -> latent shards for latent diffusion.

Each image's posterior under the autoencoder (mean and log-variance, [2C, h, w],
float32, unscaled) is stored as ``latent.npy`` beside its key and label, so stage 2
draws a fresh posterior sample each step exactly as when encoding on the fly,
without running the encoder. The manifest records the autoencoder (folder,
weights' sha256, scaling factor) and the latent shape.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from distgen.data.errors import DataError
from distgen.data.loader import make_loader
from distgen.data.manifest import resolve_shards
from distgen.data.shard import file_sha256, write_samples


def encode_shards(ae_dir: str | Path, inputs: list[str], out_dir: str | Path, *, split: Optional[str] = None,
                  batch_size: int = 64, samples_per_shard: int = 10000,
                  log: Optional[Callable[[str], None]] = print) -> dict:
    from distgen.config import DataConfig
    from distgen.config.core import ConfigError
    from distgen.families.autoencoder import downsampling, load_autoencoder
    from distgen.families.latent import latent_moments

    try:
        ae = load_autoencoder(ae_dir, where="AE_DIR")
    except ConfigError as e:
        raise DataError(str(e)) from None
    shards = resolve_shards(inputs)
    meta = shards.meta
    if meta.get("kind") == "latents":
        raise DataError(f"{inputs}: these are latent shards already")
    size = meta.get("image_size")
    if not size or size[0] != size[1]:
        raise DataError(f"{inputs}: encoding needs a manifest with one square image size, got {size}")
    channels = meta.get("channels") or ae.config.in_channels
    if channels != ae.config.in_channels:
        raise DataError(f"{inputs}: {channels}-channel images, the autoencoder takes {ae.config.in_channels}")
    split = split or meta.get("split") or "train"
    cfg = DataConfig(resolution=size[0], channels=channels, labels=bool(meta.get("num_classes")), workers=1)
    loader = make_loader(inputs, cfg, batch_size=batch_size, mode="eval")

    def samples():
        with torch.no_grad():
            for batch in loader:
                moments = latent_moments(ae, batch["image"]).float().numpy()
                for j, key in enumerate(batch["key"]):
                    buf = io.BytesIO()
                    np.save(buf, np.ascontiguousarray(moments[j]), allow_pickle=False)
                    sample = {"__key__": key, "latent.npy": buf.getvalue()}
                    if "label" in batch and int(batch["label"][j]) >= 0:
                        sample["cls"] = str(int(batch["label"][j])).encode()
                    yield sample

    weights = sorted(Path(ae_dir).glob("*.safetensors"))
    if not weights:
        raise DataError(f"{ae_dir}: no .safetensors weights to record in the manifest")
    f = downsampling(ae)
    return write_samples(samples(), out_dir, split, samples_per_shard, log, name=str(inputs), manifest={
        "source": f"encode:{','.join(inputs)}",
        "kind": "latents",
        "image_size": list(size),
        "channels": channels,
        "num_classes": meta.get("num_classes", 0),
        # as many names as classes, or none when the input manifest had none (readers check the two agree)
        "class_names": meta.get("class_names", [] if not meta.get("num_classes") else
                                [str(i) for i in range(meta["num_classes"])]),
        "latent_shape": [ae.config.latent_channels, size[0] // f, size[1] // f],
        "autoencoder": {"path": str(Path(ae_dir).resolve()), "weights_sha256": file_sha256(weights[0]),
                        "scaling_factor": ae.config.scaling_factor},
    })

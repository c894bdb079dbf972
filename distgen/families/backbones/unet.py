"""The backbone call convention around diffusers' UNet2DModel (Ho et al. 2020's U-Net, as the diffusion family
trains it today).

``UNet(channels, resolution, num_classes, **preset)`` builds ``UNet2DModel(**preset)`` for ``channels`` x
``resolution`` x ``resolution`` images, with ``num_classes + 1`` class embeddings when class-conditional (the
last one is the null class of classifier-free guidance, as the diffusion family has it). Its presets are
:data:`distgen.config.backbones.UNET_PRESETS`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from distgen.config.backbones import UNET_PRESETS
from distgen.families.backbones.common import check_input, conditioning_labels, jsonable

PRESETS: dict[str, dict] = UNET_PRESETS  # distgen.config.backbones: the one home of the presets


class UNet(nn.Module):
    """diffusers' UNet2DModel as ``net(x, noise_cond, class_labels)`` -> a tensor shaped like ``x``."""

    name = "unet"
    PRESETS = PRESETS

    def __init__(self, channels: int, resolution: int, num_classes: int = 0, **preset):
        super().__init__()
        from diffusers import UNet2DModel

        taken = {"sample_size", "in_channels", "out_channels", "num_class_embeds", "class_embed_type"} & set(preset)
        if taken:
            raise ValueError(f"unet: {', '.join(sorted(taken))} follow from the data, not from the preset")
        self.channels, self.resolution, self.num_classes = channels, resolution, num_classes
        self.config = jsonable(dict(channels=channels, resolution=resolution, num_classes=num_classes, **preset))
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in preset.items()}
        kw.update(sample_size=resolution, in_channels=channels, out_channels=channels)
        if num_classes:
            kw["num_class_embeds"] = num_classes + 1
        self.unet = UNet2DModel(**kw)

    def forward(self, x: torch.Tensor, noise_cond: torch.Tensor, class_labels: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        check_input(x, self.channels, self.resolution)
        labels = conditioning_labels(class_labels, self.num_classes, x)
        return self.unet(x, noise_cond.reshape(-1).expand(x.shape[0]), class_labels=labels).sample

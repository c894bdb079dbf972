"""pix2pix (Isola et al. 2017): conditional adversarial translation from paired examples.

G is a U-Net (skip connections carry the input's structure to the output); D is a PatchGAN that
classifies overlapping 70x70 patches of the input beside the output (or the target) as real or fake.
G's loss is the cGAN term plus lambda x L1 to the target (lambda = 100): L1 gets the low frequencies
right, the patch discriminator the high ones.

Phases: ``D`` (real pairs against pairs with G's output, G frozen) and ``G`` every step.
"""

from __future__ import annotations

from pathlib import Path

import torch

from distgen.config.core import ConfigError
from distgen.config.models import Pix2PixConfig
from distgen.families.base import DataInfo, load_module, save_module
from distgen.families.gan.losses import patch_d_loss, patch_g_loss
from distgen.families.translation import Translator, l1_per_sample
from distgen.families.translation.networks import PRESETS, PatchDiscriminator, UNetGenerator


class Pix2Pix(Translator):
    name = "pix2pix"
    config_cls = Pix2PixConfig
    directions = ("AtoB",)
    data_layout = "paired"

    def __init__(self, cfg: Pix2PixConfig, data: DataInfo):
        super().__init__(cfg, data)
        r = data.resolution
        if r < 8 or r & (r - 1):
            raise ConfigError(f"data.resolution: pix2pix's U-Net halves the image down to 1x1 and needs a power "
                              f"of two >= 8, got {r}")

    def generator_kwargs(self) -> dict:
        c = self.cfg
        return {"in_channels": self.data.channels, "out_channels": self.data.channels,
                "resolution": self.data.resolution, **PRESETS["unet"][c.preset], "norm": c.norm,
                "dropout": c.dropout}

    def build_networks(self):
        c = self.cfg
        # D sees the input and the output (or target) stacked along channels: a conditional discriminator
        D = PatchDiscriminator(2 * self.data.channels, **PRESETS["patch"][c.preset], layers=c.d_layers, norm=c.norm)
        return {"G": UNetGenerator(**self.generator_kwargs()), "D": D}

    def loss(self, ctx, nets, batch, generator):
        phase = ctx.phase
        a, b = batch["a"], batch["b"]
        kind = self.cfg.loss
        if phase == "D":
            with torch.no_grad():
                fake = nets["G"](a)
            D = nets["D"]
            # Two passes, as the reference (its norm layers see real and fake pairs apart)
            r = D(torch.cat([a, b], 1))
            f = D(torch.cat([a, fake.to(a.dtype)], 1))
            loss = patch_d_loss(kind, r, f)
            r, f = r.detach().float().flatten(1).mean(1), f.detach().float().flatten(1).mean(1)
            t = 0.5 if kind == "lsgan" else 0.0  # the decision threshold between the real and fake targets
            return loss, {"real": r.mean(), "fake": f.mean(),
                          "acc": 0.5 * ((r > t).float().mean() + (f < t).float().mean())}
        if phase == "G":
            fake = nets["G"](a)
            adv = patch_g_loss(kind, nets["D"](torch.cat([a, fake], 1)))
            l1 = l1_per_sample(fake, b)
            return adv + self.cfg.l1_weight * l1, {"adv": adv.detach().mean(), "l1": l1.detach().mean()}
        raise ValueError(f"unknown pix2pix phase {phase!r}")

    @torch.no_grad()
    def translate(self, nets, images, direction="AtoB"):
        self.check_direction(direction)
        G = nets["G"]
        was = G.training
        G.eval()  # dropout off: a translation is a function of its input
        try:
            return G(images.to(next(G.parameters()).device)).float().clamp(-1, 1)
        finally:
            G.train(was)

    def export(self, nets, out_dir):
        save_module(out_dir, "generator", nets["G"], {"arch": "unet", "kwargs": self.generator_kwargs()})

    def load_export(self, out_dir):
        def build(spec):
            if spec.get("arch") != "unet":
                raise ValueError(f"{Path(out_dir) / 'generator_config.json'}: arch must be unet, got {spec.get('arch')!r}")
            return UNetGenerator(**spec["kwargs"])

        return {"G": load_module(out_dir, "generator", build)}

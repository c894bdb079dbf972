"""CycleGAN (Zhu et al. 2017): translation between two unpaired image sets.

Two ResNet generators (A->B and B->A) and two PatchGAN discriminators (one per domain) under the
least-squares adversarial loss, tied together by cycle consistency, G_BA(G_AB(a)) = a and
G_AB(G_BA(b)) = b (lambda = 10), and optionally the identity term G_AB(b) = b (0.5 lambda), which keeps
colours. Each discriminator is shown a 50-image history of generated images (Shrivastava et al. 2017)
instead of the newest batch alone; the histories are per-rank state, stored in every checkpoint.

The two generators are one network ``G`` (one optimizer over both, as the reference's
itertools.chain), the two discriminators one network ``D``: the family contract's two phases, and
DeepSpeed's one engine per network, fit CycleGAN as they fit any GAN.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from distgen.config.core import ConfigError
from distgen.config.models import CycleGANConfig
from distgen.families.base import DataInfo, load_module, save_module
from distgen.families.gan.losses import patch_d_loss, patch_g_loss
from distgen.families.translation import Translator, l1_per_sample
from distgen.families.translation.networks import (PRESETS, ImagePool, PatchDiscriminator, ResnetGenerator,
                                                   paper_blocks)


class Generators(nn.Module):
    """G_AB and G_BA. One forward computes everything the generator phase needs, so that DDP sees one
    pass over every parameter."""

    def __init__(self, **kwargs):
        super().__init__()
        self.ab, self.ba = ResnetGenerator(**kwargs), ResnetGenerator(**kwargs)

    def forward(self, a: torch.Tensor, b: torch.Tensor, cycle: bool = True, identity: bool = False) -> dict:
        out = {"fake_b": self.ab(a), "fake_a": self.ba(b)}
        if cycle:
            out["rec_a"], out["rec_b"] = self.ba(out["fake_b"]), self.ab(out["fake_a"])
        if identity:
            out["idt_b"], out["idt_a"] = self.ab(b), self.ba(a)
        return out


class Discriminators(nn.Module):
    """D_A (is this an image of domain A?) and D_B."""

    def __init__(self, **kwargs):
        super().__init__()
        self.a, self.b = PatchDiscriminator(**kwargs), PatchDiscriminator(**kwargs)

    def forward(self, x_a: torch.Tensor, x_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(x_a), self.b(x_b)


class CycleGAN(Translator):
    name = "cyclegan"
    config_cls = CycleGANConfig
    directions = ("AtoB", "BtoA")
    data_layout = "unpaired"

    def __init__(self, cfg: CycleGANConfig, data: DataInfo):
        super().__init__(cfg, data)
        if data.resolution % 4:
            raise ConfigError(f"data.resolution: CycleGAN's generators downsample twice by 2 and need a multiple "
                              f"of 4, got {data.resolution}")
        self.pools = {"a": ImagePool(cfg.pool_size), "b": ImagePool(cfg.pool_size)}

    def generator_kwargs(self) -> dict:
        c = self.cfg
        blocks = c.blocks if c.blocks is not None else paper_blocks(self.data.resolution)
        return {"in_channels": self.data.channels, "out_channels": self.data.channels,
                **PRESETS["resnet"][c.preset], "blocks": blocks, "norm": c.norm}

    def build_networks(self):
        c = self.cfg
        D = Discriminators(in_channels=self.data.channels, **PRESETS["patch"][c.preset], layers=c.d_layers,
                           norm=c.norm)
        return {"G": Generators(**self.generator_kwargs()), "D": D}

    # ---- the histories: per-rank tensors, in every checkpoint
    def rank_state(self):
        return {f"pool_{k}.{n}": t for k, p in self.pools.items() for n, t in p.state_dict().items()}

    def load_rank_state(self, state):
        for k, p in self.pools.items():
            prefix = f"pool_{k}."
            p.load_state_dict({n[len(prefix):]: t for n, t in state.items() if n.startswith(prefix)})

    def loss(self, ctx, nets, batch, generator):
        phase = ctx.phase
        a, b = batch["a"], batch["b"]
        c, kind = self.cfg, self.cfg.loss
        if phase == "D":
            with torch.no_grad():
                out = nets["G"](a, b, cycle=False)
            fake_a = self.pools["a"].query(out["fake_a"].to(a.dtype), generator)
            fake_b = self.pools["b"].query(out["fake_b"].to(b.dtype), generator)
            D = nets["D"]
            ra, rb = D(a, b)  # two passes, as the reference (real and fake apart)
            fa, fb = D(fake_a, fake_b)
            loss_a, loss_b = patch_d_loss(kind, ra, fa), patch_d_loss(kind, rb, fb)
            return loss_a + loss_b, {"d_a": loss_a.detach().mean(), "d_b": loss_b.detach().mean()}
        if phase == "G":
            idt = c.identity_weight > 0
            out = nets["G"](a, b, cycle=True, identity=idt)
            D = nets["D"]
            adv_b = patch_g_loss(kind, D.b(out["fake_b"]))  # G_AB fools D_B
            adv_a = patch_g_loss(kind, D.a(out["fake_a"]))
            cyc_a, cyc_b = l1_per_sample(out["rec_a"], a), l1_per_sample(out["rec_b"], b)
            loss = adv_a + adv_b + c.cycle_weight * (cyc_a + cyc_b)
            extras = {"adv_a": adv_a.detach().mean(), "adv_b": adv_b.detach().mean(),
                      "cycle_a": cyc_a.detach().mean(), "cycle_b": cyc_b.detach().mean()}
            if idt:
                idt_a, idt_b = l1_per_sample(out["idt_a"], a), l1_per_sample(out["idt_b"], b)
                loss = loss + c.cycle_weight * c.identity_weight * (idt_a + idt_b)
                extras["identity"] = (idt_a + idt_b).detach().mean()
            return loss, extras
        raise ValueError(f"unknown CycleGAN phase {phase!r}")

    @torch.no_grad()
    def translate(self, nets, images, direction="AtoB"):
        d = self.check_direction(direction)
        G = nets["G"]
        net = G.ab if d == "AtoB" else G.ba
        return net(images.to(next(G.parameters()).device)).float().clamp(-1, 1)

    def export(self, nets, out_dir):
        spec = {"arch": "resnet", "kwargs": self.generator_kwargs()}
        save_module(out_dir, "generator_ab", nets["G"].ab, spec)
        save_module(out_dir, "generator_ba", nets["G"].ba, spec)

    def load_export(self, out_dir):
        def build(spec):
            if spec.get("arch") != "resnet":
                raise ValueError(f"{Path(out_dir)}: generator arch must be resnet, got {spec.get('arch')!r}")
            return ResnetGenerator(**spec["kwargs"])

        ab, ba = load_module(out_dir, "generator_ab", build), load_module(out_dir, "generator_ba", build)
        G = Generators(**self.generator_kwargs())
        G.ab, G.ba = ab, ba
        return {"G": G}

"""Image-to-image translation: pix2pix (paired) and CycleGAN (unpaired), behind the family contract.

A translator maps an input image of domain A to domain B (CycleGAN also B to A). It does not sample
from noise: ``translate(nets, images, direction)`` is what ``distgen sample --input``, the training
grids (input | output | target rows) and ``distgen eval`` (FD/KID of translations against the target
domain, L1/PSNR/SSIM against paired ground truth, the target-class share) call.

Batches carry ``a`` and ``b`` (float NCHW in [-1, 1]): the two sides of each pair (paired shards), or
one batch of each domain drawn independently (``data.train`` and ``data.train_b``).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from distgen.families.base import Family, Phase
from distgen.families.capabilities import ExportsOnnx, OnnxGraph, Translates

DIRECTIONS = ("AtoB", "BtoA")


def adversarial_d(kind: str, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's loss per sample from its patch logits on real and fake images, as the
    reference implementation (junyanz/pytorch-CycleGAN-and-pix2pix) weighs it: half the sum of the real
    and the fake terms ("we divide the objective by 2 while optimizing D", Isola et al. 2017), each a
    mean over the patches. ``lsgan`` is then Mao et al.'s 1/2 (D(x) - 1)^2 + 1/2 D(G(z))^2."""
    if kind == "lsgan":
        r, f = (real.float() - 1).square(), fake.float().square()
    elif kind == "nonsaturating":
        r, f = F.softplus(-real.float()), F.softplus(fake.float())
    else:
        raise ValueError(f"unknown translation GAN loss {kind!r}; choose lsgan or nonsaturating")
    return 0.5 * (r.flatten(1).mean(1) + f.flatten(1).mean(1))


def adversarial_g(kind: str, fake: torch.Tensor) -> torch.Tensor:
    """The generator's adversarial loss per sample (mean over patches): (D(G(x)) - 1)^2 for lsgan, the
    non-saturating -log sigmoid D(G(x)) otherwise; unhalved, as the reference weighs it against its
    L1 / cycle terms (whose lambdas, 100 and 10, assume this scale)."""
    if kind == "lsgan":
        g = (fake.float() - 1).square()
    elif kind == "nonsaturating":
        g = F.softplus(-fake.float())
    else:
        raise ValueError(f"unknown translation GAN loss {kind!r}; choose lsgan or nonsaturating")
    return g.flatten(1).mean(1)


def l1_per_sample(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x.float() - y.float()).abs().flatten(1).mean(1)


class Translator(Family, Translates, ExportsOnnx):
    """What pix2pix and CycleGAN share: no sampling from noise, translation in one or two directions."""

    data_layout: ClassVar[str] = "paired"  # or "unpaired" (data.train = A, data.train_b = B)

    # Networks "G" (the generator, or CycleGAN's pair) and "D" (the discriminator(s)), one phase each; the EMA
    # of G is what translates
    def phases(self):
        return [Phase("D", "D"), Phase("G", "G")]

    def ema_networks(self):
        return ["G"]

    def engine_problem(self, zero_stage):
        if zero_stage == 3:
            return ("each phase runs the other network outside its engine (the frozen generator(s) in the "
                    "discriminators' phase and the other way round), and ZeRO-3 keeps parameters partitioned "
                    "outside their own engine's forward; use ZeRO-1 or ZeRO-2")
        return None

    def sample(self, nets, generators, *, labels=None, **options):
        raise ValueError(f"the {self.name} family translates images rather than sampling them: "
                         f"distgen sample EXPORT --input IMAGE|FOLDER|SHARDS")

    def onnx_graphs(self, nets):
        c, r = self.data.channels, self.data.resolution
        return [OnnxGraph(d, _TranslateGraph(self, nets, d), {"image": torch.rand(2, c, r, r) * 2 - 1},
                          ["translation"],
                          {"image": f"[batch, {c}, {r}, {r}] float32 images of domain {d[0]} on [-1, 1]",
                           "translation": f"like image: their translations to domain {d[-1]}, on [-1, 1]"})
                for d in self.directions]

    def onnx_sampler(self, nets):
        return {"kind": "translate", "directions": list(self.directions), "channels": self.data.channels,
                "resolution": self.data.resolution, "num_classes": 0}

    @torch.no_grad()
    def preview(self, nets, batch: dict) -> tuple[torch.Tensor, int]:
        """The training grid: rows of inputs, their translations and (paired) the targets, for each
        direction; returns (images, images per row)."""
        a, b = batch["a"], batch["b"]
        rows = [a, self.translate(nets, a, "AtoB"), b]
        if "BtoA" in self.directions:  # unpaired: b is not a's target, and the other direction too
            rows = [a, self.translate(nets, a, "AtoB"), b, self.translate(nets, b, "BtoA")]
        return torch.cat([r.float().clamp(-1, 1) for r in rows]), a.shape[0]


class _TranslateGraph(nn.Module):
    """A translator's one direction, the graph of its ONNX export."""

    def __init__(self, family: "Translator", nets: dict, direction: str):
        super().__init__()
        self.family, self.nets, self.direction = family, nn.ModuleDict(nets), direction

    def forward(self, image):
        return self.family.translate(self.nets, image, self.direction)

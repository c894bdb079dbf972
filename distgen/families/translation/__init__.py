"""Image-to-image translation: pix2pix (paired) and CycleGAN (unpaired), behind the family contract.

A translator maps an input image of domain A to domain B (CycleGAN also B to A). It does not sample
from noise: ``translate(nets, images, direction)`` is what ``distgen sample --input``, the training
grids (input | output | target rows) and ``distgen eval`` (FD/KID of translations against the target
domain, L1/PSNR/SSIM against paired ground truth, the target-class share) call.

Batches carry ``a`` and ``b`` (float NCHW in [-1, 1]): the two sides of each pair (paired shards), or
one batch of each domain drawn independently (``data.train`` and ``data.train_b``).

The adversarial losses, weighed as the reference implementation weighs them, are the GAN family's
(:func:`distgen.families.gan.losses.patch_d_loss`, :func:`~distgen.families.gan.losses.patch_g_loss`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from distgen.families.base import Family, Phase
from distgen.families.capabilities import ExportsOnnx, OnnxGraph, Translates

DIRECTIONS = ("AtoB", "BtoA")


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

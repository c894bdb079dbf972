"""Differentiable augmentation of everything the discriminator sees, real and fake alike.

DiffAugment (Zhao et al. 2020) applies its ops to every image; ADA (Karras et
al. 2020) applies each op to each image with probability p and tunes p from
the overfitting heuristic r_t = E[sign(D(real))]. The ops are DiffAugment's
(colour, translation, cutout) plus horizontal flips; all are differentiable in
the image, so the generator learns through them, and all draw their
randomness from the step's generator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distgen.config.models import AUGMENT_OPS as OPS  # the op names, known to the config without torch


def _chance(x: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    """[B,1,1,1] mask: which images get this op."""
    return (torch.rand(x.shape[0], 1, 1, 1, device=x.device, generator=g) < p).to(x.dtype)


def _rand(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return torch.rand(x.shape[0], 1, 1, 1, device=x.device, generator=g, dtype=x.dtype)


def augment(x: torch.Tensor, ops: tuple[str, ...], p: float, g: torch.Generator) -> torch.Tensor:
    """``x`` float NCHW in [-1, 1] with each op of ``ops`` applied to each image with probability ``p``."""
    if p <= 0 or not ops:
        return x
    for op in ops:
        m = _chance(x, p, g)
        if op == "flip":
            y = x.flip(3)
        elif op == "color":
            y = x + (_rand(x, g) - 0.5)  # brightness
            if x.shape[1] > 1:  # saturation
                mean = y.mean(dim=1, keepdim=True)
                y = (y - mean) * (_rand(x, g) * 2) + mean
            mean = y.mean(dim=(1, 2, 3), keepdim=True)  # contrast
            y = (y - mean) * (_rand(x, g) + 0.5) + mean
        elif op == "translation":  # up to 1/8 of the size, whole pixels, zero padding (DiffAugment's)
            b, c, h, w = x.shape
            pad = max(w // 8, 1)
            sy, sx = torch.randint(-pad, pad + 1, (2, b, 1), device=x.device, generator=g)
            iy = torch.arange(h, device=x.device) + pad - sy  # [b, h] rows of the padded image
            ix = torch.arange(w, device=x.device) + pad - sx
            xp = F.pad(x, (pad, pad, pad, pad))
            y = xp[torch.arange(b, device=x.device)[:, None, None, None], torch.arange(c, device=x.device)[None, :, None, None],
                   iy[:, None, :, None], ix[:, None, None, :]]
        elif op == "cutout":  # a square of half the size set to zero, centre anywhere
            b, _, h, w = x.shape
            cy = torch.randint(0, h, (b, 1, 1), device=x.device, generator=g)
            cx = torch.randint(0, w, (b, 1, 1), device=x.device, generator=g)
            yy = torch.arange(h, device=x.device).view(1, h, 1)
            xx = torch.arange(w, device=x.device).view(1, 1, w)
            keep = ((yy - cy).abs() >= h // 4) | ((xx - cx).abs() >= w // 4)
            y = x * keep.unsqueeze(1).to(x.dtype)
        else:
            raise ValueError(f"unknown augmentation {op!r}; choose from {', '.join(OPS)}")
        x = m * y + (1 - m) * x
    return x


class ADA:
    """ADA's controller: p moves by sign(r_t - target) x (images seen) / (ada_kimg x 1000) every
    ``interval`` discriminator steps, r_t = E[sign(D(real))] over those steps and all ranks."""

    def __init__(self, target: float, interval: int, speed_kimg: float, p: float = 0.0):
        self.target, self.interval, self.speed_kimg = target, interval, speed_kimg
        self.p = p
        self.sign_sum, self.count, self.calls = 0.0, 0, 0

    def observe(self, real_logits: torch.Tensor, reduce_sum) -> None:
        """Record a step's real logits; ``reduce_sum`` sums a list of numbers over the ranks."""
        # Summed on the device; read back (one host sync) only when p moves, every ``interval`` calls.
        self.sign_sum = self.sign_sum + torch.sign(real_logits.detach().float()).sum().double()
        self.count += real_logits.shape[0]
        self.calls += 1
        if self.calls % self.interval == 0:
            total, n = reduce_sum([float(self.sign_sum), float(self.count)])
            rt = total / max(n, 1.0)
            self.p = min(max(self.p + (1 if rt > self.target else -1) * n / (self.speed_kimg * 1000), 0.0), 1.0)
            self.sign_sum, self.count = 0.0, 0

    def state_dict(self) -> dict:
        return {"p": self.p, "sign_sum": float(self.sign_sum), "count": self.count, "calls": self.calls}

    def load_state_dict(self, s: dict) -> None:
        self.p, self.sign_sum, self.count, self.calls = float(s["p"]), float(s["sign_sum"]), int(s["count"]), int(s["calls"])

"""The vanilla MLP GAN (Goodfellow et al. 2014) and DCGAN (Radford et al. 2016).

Both follow the shared network contract of the GAN family: ``Generator(z,
labels)`` gives images in [-1, 1]; ``Discriminator(x, labels)`` gives
``(logits [B], features [B, F])``, the features feeding an InfoGAN head.
Class conditioning enters G as a label embedding concatenated to z and D as
a projection (Miyato & Koyama 2018).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

# Sizes. mlp: hidden units (the GAN paper's MNIST generator had 1200); dcgan: base channels
# (the DCGAN paper's 64x64 generator goes 1024 -> 512 -> 256 -> 128, i.e. ch=128).
PRESETS: dict[str, dict[str, dict]] = {
    "mlp": {"tiny": dict(hidden=128, z_dim=32), "small": dict(hidden=512, z_dim=64),
            "paper": dict(hidden=1200, z_dim=100)},
    "dcgan": {"tiny": dict(ch=16, z_dim=32), "small": dict(ch=64, z_dim=100), "paper": dict(ch=128, z_dim=100)},
}


def _check_geometry(resolution: int, channels: int, conv: bool) -> None:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if conv and (resolution < 8 or resolution & (resolution - 1)):
        raise ValueError(f"resolution must be a power of two >= 8 for convolutional GANs, got {resolution}")


class _Projection(nn.Module):
    """logits = linear(h) + <embed(y), h> (projection discriminator) when conditional."""

    def __init__(self, features: int, num_classes: int, sn: bool):
        super().__init__()
        wrap = spectral_norm if sn else (lambda m: m)
        self.out = wrap(nn.Linear(features, 1))
        self.embed = wrap(nn.Embedding(num_classes, features)) if num_classes else None

    def forward(self, h: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        logits = self.out(h).squeeze(1)
        if self.embed is not None:
            if labels is None:
                raise ValueError("a conditional discriminator needs labels")
            logits = logits + (self.embed(labels) * h).sum(1)
        return logits


def _label_input(z: torch.Tensor, labels: Optional[torch.Tensor], embed: Optional[nn.Embedding]) -> torch.Tensor:
    if embed is None:
        if labels is not None:
            raise ValueError("an unconditional generator takes no labels")
        return z
    if labels is None:
        raise ValueError("a conditional generator needs labels")
    return torch.cat([z, embed(labels)], dim=1)


class MLPGenerator(nn.Module):
    """z -> two ReLU layers -> tanh pixels."""

    def __init__(self, resolution: int, channels: int, num_classes: int = 0, *, hidden: int, z_dim: int):
        super().__init__()
        _check_geometry(resolution, channels, conv=False)
        self.resolution, self.channels, self.num_classes, self.z_dim = resolution, channels, num_classes, z_dim
        self.embed = nn.Embedding(num_classes, z_dim) if num_classes else None
        din = z_dim * (2 if num_classes else 1)
        self.net = nn.Sequential(nn.Linear(din, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, channels * resolution * resolution), nn.Tanh())

    def forward(self, z, labels=None):
        x = self.net(_label_input(z, labels, self.embed))
        return x.view(-1, self.channels, self.resolution, self.resolution)


class MLPDiscriminator(nn.Module):
    """Pixels -> two LeakyReLU layers -> features -> logit (LeakyReLU stands in for the paper's maxout)."""

    def __init__(self, resolution: int, channels: int, num_classes: int = 0, *, hidden: int, z_dim: int = 0,
                 spectral: bool = False):
        super().__init__()
        _check_geometry(resolution, channels, conv=False)
        wrap = spectral_norm if spectral else (lambda m: m)
        self.net = nn.Sequential(wrap(nn.Linear(channels * resolution * resolution, hidden)), nn.LeakyReLU(0.2),
                                 wrap(nn.Linear(hidden, hidden)), nn.LeakyReLU(0.2))
        self.head = _Projection(hidden, num_classes, spectral)

    def forward(self, x, labels=None):
        h = self.net(x.flatten(1))
        return self.head(h, labels), h


class DCGANGenerator(nn.Module):
    """DCGAN: z -> 4x4 by a transposed conv, then fractional-strided 4x4 convs doubling the resolution,
    batch norm and ReLU throughout, tanh at the output."""

    def __init__(self, resolution: int, channels: int, num_classes: int = 0, *, ch: int, z_dim: int):
        super().__init__()
        _check_geometry(resolution, channels, conv=True)
        self.resolution, self.channels, self.num_classes, self.z_dim = resolution, channels, num_classes, z_dim
        self.embed = nn.Embedding(num_classes, z_dim) if num_classes else None
        n = int(math.log2(resolution)) - 2  # doublings after 4x4
        c = ch * 2 ** (n - 1)
        din = z_dim * (2 if num_classes else 1)
        layers = [nn.ConvTranspose2d(din, c, 4, 1, 0, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
        for _ in range(n - 1):
            layers += [nn.ConvTranspose2d(c, c // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(c // 2), nn.ReLU()]
            c //= 2
        layers += [nn.ConvTranspose2d(c, channels, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        for m in self.modules():  # the DCGAN paper's N(0, 0.02) initialisation
            if isinstance(m, (nn.ConvTranspose2d, nn.Conv2d)):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, z, labels=None):
        h = _label_input(z, labels, self.embed)
        return self.net(h[:, :, None, None])


class DCGANDiscriminator(nn.Module):
    """DCGAN: strided 4x4 convs halving the resolution, LeakyReLU(0.2), batch norm after the first
    (or spectral norm instead of batch norm, SNGAN-style), down to 4x4; the flattened map is the feature."""

    def __init__(self, resolution: int, channels: int, num_classes: int = 0, *, ch: int, z_dim: int = 0,
                 spectral: bool = False):
        super().__init__()
        _check_geometry(resolution, channels, conv=True)
        wrap = spectral_norm if spectral else (lambda m: m)
        n = int(math.log2(resolution)) - 2
        layers, c = [wrap(nn.Conv2d(channels, ch, 4, 2, 1)), nn.LeakyReLU(0.2)], ch
        for _ in range(n - 1):
            layers += [wrap(nn.Conv2d(c, 2 * c, 4, 2, 1, bias=spectral))]
            layers += [] if spectral else [nn.BatchNorm2d(2 * c)]
            layers += [nn.LeakyReLU(0.2)]
            c *= 2
        self.net = nn.Sequential(*layers)
        self.head = _Projection(c * 16, num_classes, spectral)
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and not spectral:
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, x, labels=None):
        h = self.net(x).flatten(1)
        return self.head(h, labels), h

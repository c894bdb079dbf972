"""What every GAN arch shares around its networks: the latent z (the arch's noise with InfoGAN's codes appended),
BigGAN's truncated-normal resampling of it, and InfoGAN's Q head on the discriminator's features with its
mutual-information loss (Chen et al. 2016)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class Latents:
    """z = ``noise_dim`` N(0, 1) values, then InfoGAN's categorical code one-hot (``n_cat`` categories, 0: none)
    and its ``n_cont`` continuous codes, uniform on [-1, 1]."""

    def __init__(self, noise_dim: int, n_cat: int = 0, n_cont: int = 0):
        self.noise_dim, self.n_cat, self.n_cont = noise_dim, n_cat, n_cont
        self.dim = noise_dim + n_cat + n_cont

    def draw(self, b: int, g: torch.Generator, device) -> tuple[torch.Tensor, dict]:
        """z with InfoGAN's codes appended, and the codes (categorical index, continuous values)."""
        parts = [torch.randn(b, self.noise_dim, device=device, generator=g)]
        codes = {}
        if self.n_cat:
            codes["cat"] = torch.randint(0, self.n_cat, (b,), device=device, generator=g)
            parts.append(F.one_hot(codes["cat"], self.n_cat).float())
        if self.n_cont:
            codes["cont"] = torch.rand(b, self.n_cont, device=device, generator=g) * 2 - 1
            parts.append(codes["cont"])
        return torch.cat(parts, 1), codes

    def one(self, gen: torch.Generator, threshold: Optional[float]) -> torch.Tensor:
        """One image's z (truncated-normal resampling beyond ``threshold``: BigGAN's truncation trick)."""
        z, _ = self.draw(1, gen, gen.device)
        if threshold is not None:
            noise = z[:, :self.noise_dim]
            while True:
                out = noise.abs() > threshold
                if not out.any():
                    break
                noise = torch.where(out, torch.randn(noise.shape, device=gen.device, generator=gen), noise)
            z = torch.cat([noise, z[:, self.noise_dim:]], 1)
        return z

    def info_loss(self, q: Optional[torch.Tensor], codes: dict) -> Optional[torch.Tensor]:
        """InfoGAN's lower bound on I(codes; G(z, codes)) as a per-sample loss: cross-entropy of the
        categorical code, and the Gaussian (unit variance) negative log-likelihood of the continuous ones."""
        if q is None:
            return None
        q = q.float()
        loss = torch.zeros(q.shape[0], device=q.device)
        if self.n_cat:
            loss = loss + F.cross_entropy(q[:, :self.n_cat], codes["cat"], reduction="none")
        if self.n_cont:
            loss = loss + 0.5 * (q[:, self.n_cat:] - codes["cont"]).square().sum(1)
        return loss


class Critic(nn.Module):
    """The arch's discriminator, plus InfoGAN's Q head on its features (Chen et al. 2016):
    logits for the categorical code and means of the continuous ones."""

    def __init__(self, body: nn.Module, feature_dim: int, q_out: int):
        super().__init__()
        self.body = body
        self.q = nn.Sequential(nn.Linear(feature_dim, 128), nn.LeakyReLU(0.2), nn.Linear(128, q_out)) if q_out else None

    def forward(self, x, labels=None, **kw):
        logits, h = self.body(x, labels, **kw)  # kw: ProGAN's res and alpha
        return logits, (self.q(h) if self.q is not None else None)


def critic(body: nn.Module, resolution: int, channels: int, num_classes: int, q_out: int) -> Critic:
    """``body`` with a Q head of ``q_out`` outputs (0: none) sized from the features of a dummy pass."""
    # The feature size from a dummy pass in eval mode, which changes no buffer.
    body.eval()
    with torch.no_grad():
        x = torch.zeros(2, channels, resolution, resolution)
        _, h = body(x, torch.zeros(2, dtype=torch.long) if num_classes else None)
    body.train()
    return Critic(body, h.shape[1], q_out)

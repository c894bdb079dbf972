"""GAN objectives and regularisers, as per-sample tensors (the trainer takes the mean).

d_loss/g_loss pair each objective's discriminator and generator terms:
minimax and non-saturating (Goodfellow et al. 2014), hinge (Lim & Ye 2017;
Miyato et al. 2018), Wasserstein (Arjovsky et al. 2017; with weight clipping
or Gulrajani et al. 2017's gradient penalty), least squares (Mao et al. 2017).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

LOSSES = ("minimax", "nonsaturating", "hinge", "wgan", "wgan-gp", "lsgan")


def d_loss(kind: str, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Discriminator loss per sample from its logits on real and on fake images."""
    if kind in ("minimax", "nonsaturating"):  # -log sigmoid(real) - log(1 - sigmoid(fake))
        return F.softplus(-real) + F.softplus(fake)
    if kind == "hinge":
        return F.relu(1 - real) + F.relu(1 + fake)
    if kind in ("wgan", "wgan-gp"):
        return fake - real
    if kind == "lsgan":  # 1/2 (D(x) - b)^2 + 1/2 (D(G(z)) - a)^2 with the paper's a = 0 (fake), b = 1 (real)
        return 0.5 * (real - 1).square() + 0.5 * fake.square()
    raise ValueError(f"unknown GAN loss {kind!r}; choose from {', '.join(LOSSES)}")


def g_loss(kind: str, fake: torch.Tensor) -> torch.Tensor:
    """Generator loss per sample from the discriminator's logits on its images."""
    if kind == "minimax":  # minimise log(1 - sigmoid(fake)): saturates when D is confident
        return -F.softplus(fake)
    if kind == "nonsaturating":  # maximise log sigmoid(fake) instead
        return F.softplus(-fake)
    if kind in ("hinge", "wgan", "wgan-gp"):
        return -fake
    if kind == "lsgan":  # 1/2 (D(G(z)) - c)^2, c = 1: G wants D to call its images real (the paper's c = b)
        return 0.5 * (fake - 1).square()
    raise ValueError(f"unknown GAN loss {kind!r}; choose from {', '.join(LOSSES)}")


def gradient_penalty(critic: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor, fake: torch.Tensor,
                     generator: torch.Generator) -> torch.Tensor:
    """WGAN-GP: (||grad_x critic(x_hat)||_2 - 1)^2 per sample at x_hat between a real and a fake image."""
    eps = torch.rand(real.shape[0], 1, 1, 1, device=real.device, generator=generator, dtype=real.dtype)
    x_hat = (eps * real.detach() + (1 - eps) * fake.detach()).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    return (grad.float().flatten(1).norm(dim=1) - 1).square()


def r1_penalty(scores: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """R1 (Mescheder et al. 2018): ||grad_x D(x)||^2 per real sample; ``real`` must require grad."""
    (grad,) = torch.autograd.grad(scores.sum(), real, create_graph=True)
    return grad.float().square().flatten(1).sum(1)


def path_lengths(images: torch.Tensor, ws: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """StyleGAN2's path length per sample: ||J_w^T y|| with y ~ N(0, I) / sqrt(H W), averaged over the ws."""
    h, w = images.shape[2], images.shape[3]
    y = torch.randn(images.shape, device=images.device, generator=generator, dtype=images.dtype) / (h * w) ** 0.5
    (grad,) = torch.autograd.grad((images * y).sum(), ws, create_graph=True)
    return grad.float().square().sum(2).mean(1).sqrt()

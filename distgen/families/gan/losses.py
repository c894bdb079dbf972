"""The adversarial losses of every family that has a discriminator, and the GAN family's regularisers, as
per-sample tensors (the trainer takes the mean).

d_loss/g_loss pair each objective's discriminator and generator terms:
minimax and non-saturating (Goodfellow et al. 2014), hinge (Lim & Ye 2017;
Miyato et al. 2018), Wasserstein (Arjovsky et al. 2017; with weight clipping
or Gulrajani et al. 2017's gradient penalty), least squares (Mao et al. 2017).
They are built from the terms :func:`d_real_term`, :func:`d_fake_term` and
:func:`g_term`, which patch discriminators average over their patches:
pix2pix / CycleGAN weigh them as their reference code does
(:func:`patch_d_loss`, :func:`patch_g_loss`), the autoencoder's discriminator
sums the hinge terms' patch means.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

LOSSES = ("minimax", "nonsaturating", "hinge", "wgan", "wgan-gp", "lsgan")


def _unknown(kind: str) -> ValueError:
    return ValueError(f"unknown GAN loss {kind!r}; choose from {', '.join(LOSSES)}")


def d_real_term(kind: str, real: torch.Tensor) -> torch.Tensor:
    """The discriminator's term on its logits for real images, elementwise (least squares unhalved)."""
    if kind in ("minimax", "nonsaturating"):  # -log sigmoid(real)
        return F.softplus(-real)
    if kind == "hinge":
        return F.relu(1 - real)
    if kind in ("wgan", "wgan-gp"):
        return -real
    if kind == "lsgan":  # (D(x) - b)^2 with the paper's b = 1 (real)
        return (real - 1).square()
    raise _unknown(kind)


def d_fake_term(kind: str, fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's term on its logits for generated images, elementwise (least squares unhalved)."""
    if kind in ("minimax", "nonsaturating"):  # -log(1 - sigmoid(fake))
        return F.softplus(fake)
    if kind == "hinge":
        return F.relu(1 + fake)
    if kind in ("wgan", "wgan-gp"):
        return fake
    if kind == "lsgan":  # (D(G(z)) - a)^2 with the paper's a = 0 (fake)
        return fake.square()
    raise _unknown(kind)


def g_term(kind: str, fake: torch.Tensor) -> torch.Tensor:
    """The generator's term on the discriminator's logits for its images, elementwise (least squares unhalved)."""
    if kind == "minimax":  # minimise log(1 - sigmoid(fake)): saturates when D is confident
        return -F.softplus(fake)
    if kind == "nonsaturating":  # maximise log sigmoid(fake) instead
        return F.softplus(-fake)
    if kind in ("hinge", "wgan", "wgan-gp"):
        return -fake
    if kind == "lsgan":  # (D(G(z)) - c)^2, c = 1: G wants D to call its images real (the paper's c = b)
        return (fake - 1).square()
    raise _unknown(kind)


def d_loss(kind: str, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Discriminator loss per sample from its logits on real and on fake images; least squares is Mao et al.'s
    1/2 (D(x) - 1)^2 + 1/2 D(G(z))^2."""
    if kind == "lsgan":
        return 0.5 * d_real_term(kind, real) + 0.5 * d_fake_term(kind, fake)
    return d_real_term(kind, real) + d_fake_term(kind, fake)


def g_loss(kind: str, fake: torch.Tensor) -> torch.Tensor:
    """Generator loss per sample from the discriminator's logits on its images; least squares is Mao et al.'s
    1/2 (D(G(z)) - 1)^2."""
    if kind == "lsgan":
        return 0.5 * g_term(kind, fake)
    return g_term(kind, fake)


def patch_d_loss(kind: str, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """A patch discriminator's loss per sample from its logits on real and fake images, as the reference
    implementation of pix2pix and CycleGAN (junyanz/pytorch-CycleGAN-and-pix2pix) weighs it: half the sum of the
    real and the fake terms ("we divide the objective by 2 while optimizing D", Isola et al. 2017), each a mean
    over the patches. ``lsgan`` is then Mao et al.'s 1/2 (D(x) - 1)^2 + 1/2 D(G(z))^2, in float32."""
    r, f = d_real_term(kind, real.float()), d_fake_term(kind, fake.float())
    return 0.5 * (r.flatten(1).mean(1) + f.flatten(1).mean(1))


def patch_g_loss(kind: str, fake: torch.Tensor) -> torch.Tensor:
    """The generator's adversarial loss per sample against a patch discriminator (mean over patches, float32):
    (D(G(x)) - 1)^2 for lsgan, the non-saturating -log sigmoid D(G(x)) for nonsaturating; unhalved, as the
    reference weighs it against its L1 / cycle terms (whose lambdas, 100 and 10, assume this scale)."""
    return g_term(kind, fake.float()).flatten(1).mean(1)


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

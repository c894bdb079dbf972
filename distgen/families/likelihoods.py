"""Discrete likelihoods of 8-bit images, shared by the families that report bits/dim.

- :func:`discretized_gaussian_log_prob`: a Gaussian discretised to the 256 pixel values (DDPM's decoder
  at t = 0, Ho et al. 2020; a VAE's Gaussian decoder).
- The discretised logistic mixture of PixelCNN++ (Salimans et al. 2017): :func:`logistic_mixture_params`
  output channels, :func:`logistic_mixture_log_prob`, exact sampling with :func:`logistic_mixture_sample`
  and the point image :func:`logistic_mixture_mode` (PixelCNN++ and a VAE's default decoder).

Images are on the 256-value grid of [-1, 1]. Everything is computed in float32 (network outputs are
cast first): under bf16 autocast the tails of these distributions would otherwise lose bits/dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def discretized_gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) of 8-bit data scaled to [-1, 1] under a Gaussian discretised to 256 bins (edges open)."""
    inv = torch.exp(-log_scale)
    cdf = lambda z: 0.5 * (1 + torch.erf(z / math.sqrt(2)))  # noqa: E731
    upper, lower = cdf(inv * (x - mean + 1 / 255)), cdf(inv * (x - mean - 1 / 255))
    tiny = 1e-12
    return torch.where(x < -0.999, torch.log(upper.clamp(min=tiny)),
                       torch.where(x > 0.999, torch.log((1 - lower).clamp(min=tiny)),
                                   torch.log((upper - lower).clamp(min=tiny))))


def logistic_mixture_params(channels: int, nr_mix: int) -> int:
    """Output channels: per component a logit, a mean and a log-scale per channel, and the
    C(C-1)/2 coefficients that make a channel's mean depend on the channels before it."""
    return nr_mix * (1 + 2 * channels + channels * (channels - 1) // 2)


def _split(params: torch.Tensor, channels: int, nr_mix: int):
    """[B, P, H, W] -> logits [B, M, H, W], means and log-scales [B, C, M, H, W], coefficients [B, K, M, H, W]."""
    b, _, h, w = params.shape
    m, c = nr_mix, channels
    logits = params[:, :m]
    rest = params[:, m:].reshape(b, -1, m, h, w)
    means, log_scales, coeffs = rest[:, :c], rest[:, c:2 * c].clamp(min=-7.0), torch.tanh(rest[:, 2 * c:])
    return logits, means, log_scales, coeffs


def _channel_means(means: torch.Tensor, coeffs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean of channel c = mu_c + sum_{j<c} coeff_(c,j) * x_j (x: [B, C, H, W] on the [-1, 1] grid)."""
    out, k = [means[:, 0]], 0
    for c in range(1, means.shape[1]):
        m = means[:, c]
        for j in range(c):
            m = m + coeffs[:, k] * x[:, j, None]
            k += 1
        out.append(m)
    return torch.stack(out, 1)


def _log_bin_prob(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(bin of x) under a logistic(mean, scale) discretised to the 256 values of [-1, 1]; edge bins open."""
    centered = x - mean
    inv = torch.exp(-log_scale)
    plus, minus = inv * (centered + 1 / 255), inv * (centered - 1 / 255)
    # sigmoid(plus) - sigmoid(minus) loses everything to cancellation right of the mean:
    # there the same difference is sigmoid(-minus) - sigmoid(-plus), computed in the small tail.
    right = centered > 0
    delta = torch.where(right, torch.sigmoid(-minus) - torch.sigmoid(-plus), torch.sigmoid(plus) - torch.sigmoid(minus))
    mid = inv * centered
    log_pdf_mid = mid - log_scale - 2 * F.softplus(mid)  # the density times the bin width, where delta underflows
    inner = torch.where(delta > 1e-5, torch.log(delta.clamp(min=1e-12)), log_pdf_mid - math.log(127.5))
    return torch.where(x < -0.999, plus - F.softplus(plus),  # log sigmoid(plus): everything below the top edge
                       torch.where(x > 0.999, -F.softplus(minus), inner))


def logistic_mixture_log_prob(x: torch.Tensor, params: torch.Tensor, nr_mix: int) -> torch.Tensor:
    """log p(x) per pixel [B, H, W] of x on the 256-value grid of [-1, 1] (all channels together)."""
    params, x = params.float(), x.float()
    logits, means, log_scales, coeffs = _split(params, x.shape[1], nr_mix)
    means = _channel_means(means, coeffs, x)
    per_channel = _log_bin_prob(x[:, :, None], means, log_scales)  # [B, C, M, H, W]
    return torch.logsumexp(per_channel.sum(1) + F.log_softmax(logits, dim=1), dim=1)


def _uniform(generators: list[torch.Generator], n: int, device) -> torch.Tensor:
    """[B, n] uniforms in (0, 1), row i from generators[i] (an image depends on its own seed only).

    float64, kept off 0 by 1e-12 only: the logistic tails and the Gumbel draw are cut where the
    mass left out is ~1e-12 (the reference's float32 clamp at 1e-5 leaves out ~1e-5).
    """
    u = torch.stack([torch.rand(n, generator=g, device=device, dtype=torch.float64) for g in generators])
    return u.clamp(min=1e-12)


def logistic_mixture_sample(params: torch.Tensor, nr_mix: int, channels: int,
                            generators: list[torch.Generator], temperature: float = 1.0) -> torch.Tensor:
    """One pixel per image from the mixture at that pixel: params [B, P] -> values [B, C] on the 256-value grid,
    from nr_mix + C uniforms of each image's generator (:func:`logistic_mixture_draw`)."""
    return logistic_mixture_draw(params, nr_mix, channels, _uniform(generators, nr_mix + channels, params.device),
                                 temperature)


def logistic_mixture_draw(params: torch.Tensor, nr_mix: int, channels: int, u: torch.Tensor,
                          temperature: float = 1.0) -> torch.Tensor:
    """The mixture's draw for uniforms u [B, nr_mix + C] in (0, 1), float64.

    A component is drawn (Gumbel-max), then channel after channel a logistic
    sample rounded to its bin: exactly the discretised distribution of
    :func:`logistic_mixture_log_prob`, with later channels' means built from the drawn values.
    ``temperature`` T divides the component logits and multiplies the logistic noise (T = 1: the model's
    distribution; T = 0: the most likely component's means, rounded). The draws use the same uniforms
    whatever T, so an image changes smoothly with T. The standalone ONNX sampler's numpy port
    (``logistic_mixture_draw`` in :mod:`distgen.export.sample_onnx`) is tested equal to it.
    """
    b = params.shape[0]
    logits, means, log_scales, coeffs = (t[..., 0, 0] for t in _split(params.float()[:, :, None, None], channels,
                                                                       nr_mix))
    logits = logits.double()
    if temperature == 0:
        k = logits.argmax(1)
    else:
        k = (logits / temperature - torch.log(-torch.log(u[:, :nr_mix]))).argmax(1)
    pick = lambda t: t.gather(-1, k.view(b, 1, 1).expand(b, t.shape[1], 1))[..., 0]  # noqa: E731
    means, log_scales, coeffs = pick(means), pick(log_scales), pick(coeffs)
    x = torch.zeros(b, channels, device=params.device)
    j = 0
    for c in range(channels):
        mean = means[:, c]
        for i in range(c):
            mean = mean + coeffs[:, j] * x[:, i]
            j += 1
        uc = u[:, nr_mix + c]
        v = mean + torch.exp(log_scales[:, c]) * (temperature * (torch.log(uc) - torch.log1p(-uc))).float()
        x[:, c] = torch.clamp(torch.round((v + 1) * 127.5), 0, 255) / 127.5 - 1
    return x


def logistic_mixture_mode(out: torch.Tensor, nr_mix: int, c: int) -> torch.Tensor:
    """A point image [B, C, H, W] of the mixture: per pixel the most likely component's mean, later channels'
    means built from the earlier channels' values (reconstructions and samples of a VAE)."""
    m = nr_mix
    logits, means, _, coeffs = _split(out.float(), c, m)
    k = logits.argmax(1, keepdim=True)  # [B, 1, H, W]
    pick = lambda t: t.gather(2, k[:, None].expand(-1, t.shape[1], 1, -1, -1))[:, :, 0]  # noqa: E731
    means, coeffs = pick(means), pick(coeffs) if c > 1 else None
    x, j = [], 0
    for ch in range(c):
        v = means[:, ch]
        for i in range(ch):
            v = v + coeffs[:, j] * x[i]
            j += 1
        x.append(v.clamp(-1, 1))
    return torch.stack(x, 1)

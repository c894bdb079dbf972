"""ODE samplers of the EDM and flow formulations, k-diffusion style: free functions of a model function, torch only.

EDM (Karras et al. 2022): ``denoise(x, sigma)`` is the denoiser D(x; sigma) ~ E[x0 | x0 + sigma n = x]; the
probability-flow ODE is dx/dsigma = (x - D(x; sigma)) / sigma, solved over Karras' schedule
(:func:`karras_sigmas`) by Euler, Heun (EDM's Algorithm 2, with its optional churn) or DPM-Solver++(2M)
(Lu et al. 2022, in k-diffusion's form on sigmas). Flow matching: ``velocity(x, t)`` ~ E[eps - x0 | x_t = x]
with x_t = (1 - t) x0 + t eps; the ODE dx/dt = v runs from t = 1 (noise) to t = 0 by Euler or Heun.

Every sampler returns ``(x, nfe)``: the result and how many times it called the model function (network
evaluations, for figures that report them; a guided evaluation runs the network on a batch of 2).
Sigmas and times are Python floats: every image of a batch is at the same level.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

Noise = Optional[Callable[[torch.Tensor], torch.Tensor]]


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    """Karras' schedule: sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho for
    i < n (sigma_max first, sigma_min last; n = 1: sigma_max alone), then sigma_n = 0."""
    if n < 1:
        raise ValueError(f"the schedule needs >= 1 step, got {n}")
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return [(hi + (i / (n - 1) if n > 1 else 0.0) * (lo - hi)) ** rho for i in range(n)] + [0.0]


def flow_times(n: int, shift: float = 1.0) -> list[float]:
    """n + 1 times from 1 to 0, uniform, then shifted as in training: t <- s t / (1 + (s - 1) t)."""
    if n < 1:
        raise ValueError(f"the schedule needs >= 1 step, got {n}")
    return [shift_time(1 - i / n, shift) for i in range(n + 1)]


def shift_time(t, shift: float):
    """SD3's timestep shift s t / (1 + (s - 1) t) (a float or a tensor; s = 1 leaves t)."""
    return t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)


def _churn(x: torch.Tensor, sigma: float, n: int, s_churn: float, s_min: float, s_max: Optional[float],
           s_noise: float, noise: Noise) -> tuple[torch.Tensor, float]:
    """EDM's Algorithm 2, lines 4-6: x raised from sigma to sigma_hat = sigma (1 + gamma) by fresh noise."""
    gamma = min(s_churn / n, math.sqrt(2) - 1) if s_churn > 0 and s_min <= sigma <= (
        math.inf if s_max is None else s_max) else 0.0
    if gamma == 0:
        return x, sigma
    hat = sigma * (1 + gamma)
    eps = noise(x) if noise is not None else torch.randn_like(x)
    return x + math.sqrt(hat ** 2 - sigma ** 2) * s_noise * eps, hat


def sample_euler(denoise, x: torch.Tensor, sigmas: list[float], *, s_churn: float = 0.0, s_min: float = 0.0,
                 s_max: Optional[float] = None, s_noise: float = 1.0, noise: Noise = None):
    """Euler's method on the probability-flow ODE (with EDM's churn when ``s_churn`` > 0). ``x`` is noise at
    sigmas[0]; NFE = len(sigmas) - 1."""
    n, nfe = len(sigmas) - 1, 0
    for i in range(n):
        x, hat = _churn(x, sigmas[i], n, s_churn, s_min, s_max, s_noise, noise)
        d = (x - denoise(x, hat)) / hat
        nfe += 1
        x = x + (sigmas[i + 1] - hat) * d
    return x, nfe


def sample_heun(denoise, x: torch.Tensor, sigmas: list[float], *, s_churn: float = 0.0, s_min: float = 0.0,
                s_max: Optional[float] = None, s_noise: float = 1.0, noise: Noise = None):
    """EDM's Algorithm 2: Heun's 2nd-order method, an Euler step alone into sigma = 0; churn as its options say
    (0: deterministic). NFE = 2 (len(sigmas) - 1) - 1 when the last sigma is 0."""
    n, nfe = len(sigmas) - 1, 0
    for i in range(n):
        x, hat = _churn(x, sigmas[i], n, s_churn, s_min, s_max, s_noise, noise)
        d = (x - denoise(x, hat)) / hat
        nfe += 1
        nxt = sigmas[i + 1]
        x_next = x + (nxt - hat) * d
        if nxt != 0:
            d2 = (x_next - denoise(x_next, nxt)) / nxt
            nfe += 1
            x_next = x + (nxt - hat) * (d + d2) / 2
        x = x_next
    return x, nfe


def sample_dpmpp_2m(denoise, x: torch.Tensor, sigmas: list[float]):
    """DPM-Solver++(2M) (Lu et al. 2022) on sigmas, as k-diffusion's ``sample_dpmpp_2m``: in t = -log sigma,
    x <- (sigma'/sigma) x - expm1(-h) D_i, D_i extrapolated linearly from the last two denoisings after the first
    step; the step into sigma = 0 returns the denoising. NFE = len(sigmas) - 1."""
    n, old, nfe = len(sigmas) - 1, None, 0
    for i in range(n):
        denoised = denoise(x, sigmas[i])
        nfe += 1
        s, nxt = sigmas[i], sigmas[i + 1]
        if nxt == 0:
            x = denoised
        else:
            h = math.log(s) - math.log(nxt)
            d = denoised
            if old is not None:
                r = (math.log(sigmas[i - 1]) - math.log(s)) / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
            x = (nxt / s) * x - math.expm1(-h) * d
        old = denoised
    return x, nfe


def sample_flow_euler(velocity, x: torch.Tensor, times: list[float]):
    """Euler's method on dx/dt = v(x, t) over ``times`` (1 -> 0). NFE = len(times) - 1."""
    for t, nxt in zip(times[:-1], times[1:]):
        x = x + (nxt - t) * velocity(x, t)
    return x, len(times) - 1


def sample_flow_heun(velocity, x: torch.Tensor, times: list[float]):
    """Heun's 2nd-order method on dx/dt = v(x, t) over ``times`` (1 -> 0), the correction on every step (v is
    defined at t = 0). NFE = 2 (len(times) - 1)."""
    for t, nxt in zip(times[:-1], times[1:]):
        v = velocity(x, t)
        pred = x + (nxt - t) * v
        x = x + (nxt - t) * (v + velocity(pred, nxt)) / 2
    return x, 2 * (len(times) - 1)


# sampler name -> the function (EDM's take the churn options, flow's only the schedule)
EDM_SAMPLERS = {"euler": sample_euler, "heun": sample_heun, "dpmpp_2m": sample_dpmpp_2m}
FLOW_SAMPLERS = {"euler": sample_flow_euler, "heun": sample_flow_heun}

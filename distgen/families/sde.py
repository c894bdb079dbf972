"""The score family's SDEs (Song et al. 2021) and their samplers: the one torch implementation.

:class:`SDE` holds dx = f(x, t) dt + g(t) dw, its Gaussian marginals and prior, and the samplers that run on a
score s(x, t): annealed Langevin dynamics (NCSN) and predictor-corrector sampling (score SDEs). A sampler takes
the score and the noise as functions (``score(x, t)``, ``noise()``: the next N(0, I) draw, shaped like x), so
the family decides where they come from (a U-Net; each image's own generator). The standalone ONNX sampler's
numpy port (``SDE`` and ``sample_score`` in :mod:`distgen.export.sample_onnx`) is tested equal to it
(tests/test_ports.py).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from distgen.config.models import ScoreConfig

# Where sampling stops (score_sde: 1e-5 for VE, 1e-3 for VP; ncsn's last level is t = 0) and likelihoods start.
SAMPLE_EPS = {"ncsn": 0.0, "ve": 1e-5, "vp": 1e-3, "subvp": 1e-3}

Score = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # s(x, t), t [B] on [0, 1]
Noise = Callable[[], torch.Tensor]


class SDE:
    """dx = f(x, t) dt + g(t) dw on t in [0, 1], its Gaussian marginals N(m(t) x0, std(t)^2 I) and prior
    (Song et al. 2021, appendix B). sde ncsn is the VE SDE seen only at t = i / (L - 1), its L levels."""

    def __init__(self, cfg: ScoreConfig):
        self.kind, self.cfg = cfg.sde, cfg
        self.ve = cfg.sde in ("ncsn", "ve")
        self.log_ratio = math.log(cfg.sigma_max / cfg.sigma_min)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.cfg.sigma_min * torch.exp(t * self.log_ratio)

    def _log_mean(self, t):
        return -0.25 * t ** 2 * (self.cfg.beta_max - self.cfg.beta_min) - 0.5 * t * self.cfg.beta_min

    def beta(self, t):
        return self.cfg.beta_min + t * (self.cfg.beta_max - self.cfg.beta_min)

    def marginal(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """m(t) and std(t), each [B]; expm1 keeps std exact near t = 0 (sub-VP's std is ~ t there)."""
        if self.ve:
            return torch.ones_like(t), self.sigma(t)
        lm = self._log_mean(t)
        var_or_std = -torch.expm1(2 * lm)  # VP: the variance 1 - m^2; sub-VP: its std is 1 - m^2
        return torch.exp(lm), (var_or_std.sqrt() if self.kind == "vp" else var_or_std)

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, g): the drift f(x, t) = a(t) x and the diffusion g(t), each [B]."""
        if self.ve:
            return torch.zeros_like(t), self.sigma(t) * math.sqrt(2 * self.log_ratio)
        b = self.beta(t)
        g2 = b if self.kind == "vp" else b * -torch.expm1(4 * self._log_mean(t))
        return -0.5 * b, g2.sqrt()

    def prior_std(self) -> float:
        return self.cfg.sigma_max if self.ve else 1.0

    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        s, d = self.prior_std(), z[0].numel()
        return -0.5 * d * math.log(2 * math.pi * s * s) - z.flatten(1).pow(2).sum(1) / (2 * s * s)

    # -- samplers
    def langevin(self, score: Score, x: torch.Tensor, noise: Noise, levels: int, eps: float, n_steps: int
                 ) -> torch.Tensor:
        """Annealed Langevin dynamics (NCSN, Algorithm 1): at level i, ``n_steps`` steps of size
        eps sigma_i^2 / sigma_L^2; then NCSNv2's denoising step x + sigma_L^2 s(x, sigma_L) (model.denoise).
        x starts uniform on [0, 1], as in the papers."""
        ts = torch.linspace(1, 0, levels, device=x.device)
        sigma_l = self.cfg.sigma_min
        for t in ts:
            tt = t.expand(len(x))
            step = eps * (float(self.sigma(t)) / sigma_l) ** 2
            for _ in range(n_steps):
                z = noise()
                x = x + step * score(x, tt) + math.sqrt(2 * step) * z
        if self.cfg.denoise:
            x = x + sigma_l ** 2 * score(x, torch.zeros(len(x), device=x.device))
        return x

    def grid(self, n: int, i: int) -> float:
        """The i-th of n sampling times, t_0 = eps (ncsn: 0, its last level) up to t_{n-1} = 1."""
        eps = SAMPLE_EPS[self.kind]
        return eps + (1 - eps) * i / (n - 1)

    def vp_beta(self, n: int, i: int) -> float:
        """beta_i of step i of n: 1 - m(t_i)^2 / m(t_{i-1})^2, the VP transition's exact variance. score_sde's
        linspace(beta_min / n, beta_max / n, n) is its first-order form, which exceeds 1 for n < beta_max."""
        lm = lambda t: self._log_mean(torch.tensor(t, dtype=torch.float64))  # noqa: E731
        prev = lm(self.grid(n, i - 1)) if i > 0 else torch.tensor(0.0, dtype=torch.float64)
        return float(-torch.expm1(2 * (lm(self.grid(n, i)) - prev)))

    def reverse_diffusion(self, score: Score, x: torch.Tensor, n: int, i: int) -> tuple[torch.Tensor, float]:
        """Reverse-diffusion predictor at step i of n (Song et al. 2021, eq. 46): (mean, noise scale G)."""
        tt = torch.full((len(x),), self.grid(n, i), device=x.device)
        s = score(x, tt)
        if self.ve:  # SMLD's discretisation: G_i^2 = sigma_i^2 - sigma_{i-1}^2, sigma_{-1} = 0
            prev = float(self.sigma(torch.tensor(self.grid(n, i - 1)))) if i > 0 else 0.0
            g2 = float(self.sigma(torch.tensor(self.grid(n, i)))) ** 2 - prev ** 2
            return x + g2 * s, math.sqrt(g2)
        if self.kind == "vp":  # the paper's eq. 47: (2 - sqrt(1 - beta_i)) x + beta_i s + sqrt(beta_i) z
            b = self.vp_beta(n, i)
            return (2 - math.sqrt(1 - b)) * x + b * s, math.sqrt(b)
        a, g = (float(v) for v in self.coefficients(tt[:1].double()))  # sub-VP: Euler-Maruyama's f dt, g sqrt(dt)
        return x - (a * x - g * g * s) / n, g / math.sqrt(n)

    def pc(self, score: Score, x: torch.Tensor, noise: Noise, n: int, n_steps: int) -> torch.Tensor:
        """Predictor-corrector sampling (Song et al. 2021, Algorithm 1): n steps from t = 1 down to eps, each a
        Langevin corrector (``n_steps`` steps at model.snr) and a predictor (model.predictor); returns the last
        step's mean when model.denoise.

        The corrector's step is 2 alpha (snr std(t))^2: the paper's 2 alpha (snr |z| / |s|)^2 with the norms'
        ratio at its value for the perturbed data, std(t) (score_sde's "ald" corrector). The paper's code takes
        the norms' batch means, which would tie an image to its batch; an image's own norms would make the step
        depend on where the chain is, and bias it (twice the variance on a Gaussian, tests/test_score.py)."""
        dev = x.device
        mean = x
        for i in range(n - 1, -1, -1):
            tt = torch.full((len(x),), self.grid(n, i), device=dev)
            alpha = 1.0 if self.ve else 1 - self.vp_beta(n, i)  # score_sde's corrector scaling for VP
            step = 2 * alpha * (self.cfg.snr * float(self.marginal(tt[:1].double())[1])) ** 2
            for _ in range(n_steps):
                z = noise()
                x = x + step * score(x, tt) + math.sqrt(2 * step) * z
            z = noise()
            if self.cfg.predictor == "reverse_diffusion":
                mean, g = self.reverse_diffusion(score, x, n, i)
                x = mean + g * z
            else:  # Euler-Maruyama on the reverse SDE with dt = -1 / n
                a, g = (v.view(-1, 1, 1, 1) for v in self.coefficients(tt))
                mean = x - (a * x - g ** 2 * score(x, tt)) / n
                x = mean + g * math.sqrt(1 / n) * z
        return mean if self.cfg.denoise else x

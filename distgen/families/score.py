"""Score-based models: NCSN / NCSNv2 and score SDEs, on diffusers' UNet2DModel.

- NCSN (Song & Ermon 2019) with NCSNv2's choices (Song & Ermon 2020), ``sde: ncsn``: a noise-conditional
  score network s(x, sigma) = net(x, sigma) / sigma over L noise levels in geometric sequence, trained by
  denoising score matching weighted by sigma^2, sampled by annealed Langevin dynamics (step
  eps sigma_i^2 / sigma_L^2 at level i) ending in a denoising step x + sigma_L^2 s(x, sigma_L).
- Score SDEs (Song et al. 2021), ``sde: ve | vp | subvp``: the same objective in continuous time,
  predictor-corrector sampling (reverse-diffusion or Euler-Maruyama predictor, Langevin corrector at a
  signal-to-noise ratio) and the probability-flow ODE, which samples deterministically and gives
  log-likelihoods by the instantaneous change of variables (divergence by Hutchinson's estimator).
- Sliced score matching (Song et al. 2019), ``objective: ssm``: v^T grad_x(v^T s) + |s|^2 / 2 on the
  perturbed data (the variance-reduced form of the NCSN code), a double backward.

The network is diffusers' UNet2DModel: for ncsn / ve with Gaussian Fourier features of log sigma and
the output divided by sigma (UNet2DModel's ``fourier`` embedding, NCSN++'s choice), for vp / subvp with
positional features of 999 t and an epsilon output, s = -net / std (DDPM++). VE / NCSN models see
pixels on [0, 1] (the UNet centres its input, as NCSN++ does), VP / sub-VP ones on [-1, 1], as in the
papers, so their sigma_max and bits/dim conventions hold.

Samplers draw every image's noise from that image's generator, and the ODE solver (Dormand-Prince 5(4),
written here: torchdiffeq and scipy share one step size over a batch) steps each image with its own
step size, so an image never depends on the batch around it or the world size.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from distgen.config.core import ConfigError
from distgen.config.models import ScoreConfig
from distgen.families.base import DataInfo, Family, Phase
from distgen.families.capabilities import ExportsDiffusers, ExportsOnnx, Likelihood, OnnxGraph
from distgen.config.backbones import UNET_PRESETS as DIFFUSION_PRESETS
from distgen.families.ode import dequantize, hutchinson_divergence, per_image, rk45
from distgen.families.sde import SAMPLE_EPS, SDE

# Network presets. paper: NCSN++ / DDPM++ "deep" (Song et al. 2021, CIFAR-10): 4 resolutions of
# 128-256-256-256 channels, 8 residual blocks each, attention at 16 px, dropout 0.1 (~100M parameters).
PRESETS: dict[str, dict] = {
    # tiny and small: the diffusion family's U-Nets (the same sizes serve tests and the demo)
    "tiny": DIFFUSION_PRESETS["tiny"],
    "small": DIFFUSION_PRESETS["small"],
    "paper": dict(block_out_channels=(128, 256, 256, 256), layers_per_block=8, norm_num_groups=32, dropout=0.1,
                  down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
}
# NCSN++'s FIR resampling with progressive input / output (diffusers' Skip blocks, RGB only)
NCSNPP_BLOCKS = dict(down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D", "SkipDownBlock2D", "SkipDownBlock2D"),
                     up_block_types=("SkipUpBlock2D", "SkipUpBlock2D", "AttnSkipUpBlock2D", "SkipUpBlock2D"),
                     mid_block_scale_factor=math.sqrt(2))
SAMPLERS = {"ncsn": ("langevin", "pc"), "ve": ("langevin", "pc", "ode"), "vp": ("pc", "ode"), "subvp": ("pc", "ode")}
LIKELIHOOD_EPS = 1e-5  # where likelihoods start (sampling stops at sde.SAMPLE_EPS)
TRAIN_EPS = 1e-5  # continuous training times are U(TRAIN_EPS, 1)


def sliced_score_matching(score_fn: Callable, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Sliced score matching per image (Song et al. 2019, the variance-reduced form): v^T (ds/dx) v + |s(x)|^2 / 2,
    whose mean over projections v with E[v v^T] = I is Hyvarinen's tr(ds/dx) + |s|^2 / 2, the Fisher divergence
    to the data's score up to a constant. Differentiable in the network's weights (a double backward)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    x = x.detach().requires_grad_(True)
    with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no double backward
        s = score_fn(x)
        (jv,) = torch.autograd.grad((s * v).sum(), x, create_graph=True)
    return (v * jv).flatten(1).sum(1) + 0.5 * s.pow(2).flatten(1).sum(1)


class Score(Family, Likelihood, ExportsOnnx, ExportsDiffusers):
    name = "score"
    config_cls = ScoreConfig

    def __init__(self, cfg: ScoreConfig, data: DataInfo):
        super().__init__(cfg, data)
        halvings = len(PRESETS[cfg.preset]["block_out_channels"]) - 1
        if data.resolution % 2 ** halvings:
            raise ConfigError(f"data.resolution: the {cfg.preset} score U-Net halves the image {halvings} time(s), "
                              f"so the side must be a multiple of {2 ** halvings}, got {data.resolution}")
        self.sde = SDE(cfg)

    likelihood = "bound"

    def capabilities_off(self):
        off = {}
        if self.cfg.sde == "ncsn":  # discrete levels have no probability-flow ODE
            off[Likelihood] = "as an NCSN (sde ve or vp has one)"
        if not (self.sde.ve and self.data.channels == 3):  # the export is then the U-Net alone
            off[ExportsDiffusers] = "for this model (diffusers has pipelines for RGB VE score models only)"
        return off

    # -- networks
    def unet_kwargs(self) -> dict:
        kw = dict(PRESETS[self.cfg.preset])
        if self.cfg.preset == "paper" and self.sde.ve and self.data.channels == 3:
            kw.update(NCSNPP_BLOCKS)
        kw.update(sample_size=self.data.resolution, in_channels=self.data.channels, out_channels=self.data.channels,
                  time_embedding_type="fourier" if self.sde.ve else "positional", center_input_sample=self.sde.ve)
        return kw

    def build_networks(self):
        from diffusers import UNet2DModel

        return {"unet": UNet2DModel(**self.unet_kwargs())}

    def phases(self):
        return [Phase("score", "unet", twice=self.cfg.objective == "ssm")]

    def engine_problem(self, zero_stage):
        if zero_stage == 3 and self.cfg.objective == "ssm":
            return ("sliced score matching's second backward needs weights that ZeRO-3 has already released after the "
                    "first (a size-0 tensor in the backward); use ZeRO-1 or ZeRO-2, or objective dsm")
        return None

    def compile_problem(self, network):
        if self.cfg.objective == "ssm":
            return "sliced score matching differentiates the score's Jacobian-vector product (a double backward)"
        return None

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        """Images on [-1, 1] -> the model's data space ([0, 1] for ncsn / ve)."""
        return (x + 1) / 2 if self.sde.ve else x

    def from_model(self, x: torch.Tensor) -> torch.Tensor:
        return (x * 2 - 1 if self.sde.ve else x).clamp(-1, 1)

    def score(self, unet, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """s(x, t) = grad_x log p_t(x), float32; ``t`` [B] on [0, 1]."""
        if self.sde.ve:
            # UNet2DModel's fourier embedding takes log sigma and divides its output by sigma (NCSNv2's scaling)
            return unet(x, self.sde.sigma(t.float())).sample.float()
        _, std = self.sde.marginal(t.float())
        return -unet(x, 999 * t.float()).sample.float() / std.view(-1, 1, 1, 1)

    # -- training
    def loss(self, ctx, nets, batch, generator):
        x0 = self.to_model(batch["image"])
        b, dev = x0.shape[0], x0.device
        if self.cfg.sde == "ncsn":
            levels = self.cfg.num_scales
            t = torch.randint(0, levels, (b,), device=dev, generator=generator).float() / (levels - 1)
        else:
            t = torch.rand(b, device=dev, generator=generator) * (1 - TRAIN_EPS) + TRAIN_EPS
        z = torch.randn(x0.shape, device=dev, generator=generator)
        m, std = (v.view(-1, 1, 1, 1) for v in self.sde.marginal(t))
        xt = m * x0 + std * z
        if self.cfg.objective == "dsm":
            # lambda(t) = std^2 (NCSN's sigma^2): std^2 |s + z / std|^2 = |std s + z|^2; the target is -z / std
            per = 0.5 * (std * self.score(nets["unet"], xt, t) + z).pow(2).flatten(1).sum(1)
        else:  # SSM on the perturbed data (NCSN's anneal_sliced_score_estimation_vr), one projection per image
            v = torch.randn(x0.shape, device=dev, generator=generator)
            # The plain module: DeepSpeed takes torch.autograd.grad through its engine's output for a backward
            # pass of its own and reduces gradients after it. The engine's forward joins the loss with weight
            # 0, so DDP / DeepSpeed still synchronise every gradient (as "+ 0 x outputs" in the GAN's R1).
            per = sliced_score_matching(lambda x: self.score(nets.raw["unet"], x, t), xt, v) * std.flatten() ** 2
            per = per + 0 * self.score(nets["unet"], xt, t).flatten(1).sum(1)
        if self.cfg.likelihood_weighting:
            _, g = self.sde.coefficients(t)
            per = per * (g / std.flatten()) ** 2  # g(t)^2 |s - grad log p|^2 instead of std^2 (Song et al. 2021b)
        return per, {}

    # -- sampling
    sample_options = ("steps", "sampler", "step_size")

    def validate_sample_options(self, options):
        sampler, steps = options.get("sampler") or self.cfg.default_sampler, options.get("steps")
        if sampler not in SAMPLERS[self.cfg.sde]:
            raise ValueError(f"--sampler: a score model with sde {self.cfg.sde} samples with "
                             f"{', '.join(SAMPLERS[self.cfg.sde])}, not {sampler}")
        if steps is not None and sampler == "ode":
            raise ValueError("--steps: the ode sampler chooses its own steps (tolerance model.ode_tol)")
        if steps is not None and self.cfg.sde == "ncsn" and steps != self.cfg.num_scales:
            raise ValueError(f"--steps: sde ncsn samples at its {self.cfg.num_scales} trained levels "
                             f"(model.num_scales), got {steps}")
        if steps is not None and steps < 2:
            raise ValueError(f"--steps: must be >= 2, got {steps}")
        if options.get("step_size") is not None and sampler != "langevin":
            raise ValueError(f"--step-size: sets annealed Langevin's eps (--sampler langevin); the {sampler} "
                             f"sampler's Langevin steps follow model.snr")

    @torch.no_grad()
    def sample(self, nets, generators, *, labels=None, steps=None, sampler=None, step_size=None):
        unet = nets["unet"]
        dev = next(unet.parameters()).device
        sampler = sampler or self.cfg.default_sampler
        steps = steps or self.cfg.sample_steps or self.cfg.num_scales
        shape = (self.data.channels, self.data.resolution, self.data.resolution)
        if sampler == "langevin":
            x = self.langevin(unet, per_image("rand", generators, shape, dev), generators, steps,
                              step_size or self.cfg.step_size)
        else:
            x = per_image("randn", generators, shape, dev) * self.sde.prior_std()
            x = self.pc(unet, x, generators, steps) if sampler == "pc" else self.ode_sample(unet, x)
        return self.from_model(x)

    def _n_steps(self, sampler: str) -> int:
        return self.cfg.n_steps_each if self.cfg.n_steps_each is not None else (5 if sampler == "langevin" else 1)

    def langevin(self, unet, x, generators, levels: int, eps: float) -> torch.Tensor:
        """Annealed Langevin dynamics (:meth:`SDE.langevin`) from x, each image's noise from its generator."""
        return self.sde.langevin(lambda y, t: self.score(unet, y, t), x, _noise(generators, x), levels, eps,
                                 self._n_steps("langevin"))

    def pc(self, unet, x, generators, n: int) -> torch.Tensor:
        """Predictor-corrector sampling (:meth:`SDE.pc`) in n steps from x, each image's noise from its generator."""
        return self.sde.pc(lambda y, t: self.score(unet, y, t), x, _noise(generators, x), n, self._n_steps("pc"))

    def ode_drift(self, unet, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The probability-flow ODE's dx/dt = f(x, t) - g(t)^2 s(x, t) / 2."""
        a, g = (v.view(-1, 1, 1, 1).float() for v in self.sde.coefficients(t.double()))
        return a * x - 0.5 * g ** 2 * self.score(unet, x, t)

    def ode_sample(self, unet, x: torch.Tensor) -> torch.Tensor:
        """The probability-flow ODE from t = 1 to eps (RK45 at model.ode_tol), then, with model.denoise, one
        noise-free reverse-diffusion step (score_sde's ode sampler)."""
        shape = x.shape

        def f(y, t, rows):
            return self.ode_drift(unet, y.view(-1, *shape[1:]).float(), t.float()).double().flatten(1)

        eps = SAMPLE_EPS[self.cfg.sde]
        x = rk45(f, x.double().flatten(1), 1.0, eps, self.cfg.ode_tol).view(shape).float()
        if self.cfg.denoise:
            x, _ = self.sde.reverse_diffusion(lambda y, t: self.score(unet, y, t), x, self.cfg.num_scales, 0)
        return x

    # -- likelihood
    likelihood_options = ("probes",)

    def log_likelihood(self, nets, images, labels, generators, probes=None):
        """log p(x) in nats per image: a stochastic lower bound on the discrete image's log-likelihood.

        Each image is dequantised (y = (x + u) / 256, u ~ U[0, 1)^D, scaled to the model's data space),
        the probability-flow ODE carries y from t = 1e-5 to 1 with the instantaneous change of variables,
        log p(y) = log p_1(y(1)) + int div f dt, the divergence by Hutchinson's estimator with ``probes``
        Rademacher probes per image held through the solve (score_sde's likelihood.py), then the scaling
        to pixel units: log P(x) >= E_u log p(y) - D log(256 / data range). Every draw comes from the
        image's generator: dequantisation first, then the probes.
        """
        if self.cfg.sde == "ncsn":
            raise ValueError("sde ncsn has discrete noise levels and no probability-flow ODE: no log-likelihood "
                             "(train sde ve, vp or subvp for bits/dim)")
        unet = nets["unet"]
        k = probes or self.cfg.probes
        y = dequantize(images, generators)
        y = y if self.sde.ve else y * 2 - 1
        shape, d = y.shape, y[0].numel()
        v = per_image("rademacher", generators, (k, *shape[1:]), y.device)

        def f(state, t, rows):
            with torch.enable_grad():
                x = state[:, :d].view(-1, *shape[1:]).float().requires_grad_(True)
                drift = self.ode_drift(unet, x, t.float())
                div = hutchinson_divergence(drift, x, v[rows])
            return torch.cat([drift.detach().double().flatten(1), div.detach().double()[:, None]], 1)

        # the likelihood maths in float32 / float64 whatever the run's precision (a bf16 score would make the
        # adaptive solver crawl and the divergence coarse)
        with torch.autocast(y.device.type, enabled=False):
            out = rk45(f, torch.cat([y.flatten(1), y.new_zeros(len(y), 1)], 1), LIKELIHOOD_EPS, 1.0,
                       self.cfg.ode_tol)
        z, delta = out[:, :d].view(shape), out[:, d]
        return self.sde.prior_logp(z) + delta - d * math.log(256 if self.sde.ve else 128)

    # -- export
    def export(self, nets, out_dir):
        unet = nets["unet"]
        if self.sde.ve and self.data.channels == 3:
            # A diffusers ScoreSdeVePipeline folder (PC sampling over the same levels; its corrector takes
            # batch-mean norms): DiffusionPipeline.from_pretrained(out_dir) runs it without distgen.
            from diffusers import ScoreSdeVePipeline, ScoreSdeVeScheduler

            sched = ScoreSdeVeScheduler(num_train_timesteps=self.cfg.num_scales, snr=self.cfg.snr,
                                        sigma_min=self.cfg.sigma_min, sigma_max=self.cfg.sigma_max,
                                        sampling_eps=SAMPLE_EPS["ve"], correct_steps=self._n_steps("pc"))
            ScoreSdeVePipeline(unet=unet, scheduler=sched).save_pretrained(out_dir, safe_serialization=True)
        else:  # diffusers has no pipeline for grey VE models (it assumes RGB) or VP score SDEs: the U-Net
            unet.save_pretrained(Path(out_dir) / "unet", safe_serialization=True)

    def load_export(self, out_dir):
        from diffusers import UNet2DModel

        return {"unet": UNet2DModel.from_pretrained(Path(out_dir) / "unet", use_safetensors=True)}

    def onnx_graphs(self, nets):
        c, r = self.data.channels, self.data.resolution
        space = "[0, 1] pixels" if self.sde.ve else "[-1, 1] pixels"
        return [OnnxGraph("score", _ScoreGraph(self, nets["unet"]),
                          {"x": torch.randn(2, c, r, r), "t": torch.tensor([1.0, 0.1])}, ["score"],
                          {"x": f"[batch, {c}, {r}, {r}] float32 perturbed data on the model's scale ({space})",
                           "t": "[batch] float32 SDE time on [0, 1] (ncsn: level i of L at t = i / (L - 1))",
                           "score": "like x: s(x, t), the score of the perturbed data's density"})]

    def onnx_sampler(self, nets):
        c = self.cfg
        return {"kind": "score", "graph": "score", "sde": c.sde,
                "shape": [self.data.channels, self.data.resolution, self.data.resolution],
                "sampler": c.default_sampler if c.default_sampler != "ode" else "pc",
                "steps": c.sample_steps or c.num_scales, "num_scales": c.num_scales,
                "n_steps_each": {s: self._n_steps(s) for s in ("langevin", "pc")}, "step_size": c.step_size,
                "snr": c.snr, "predictor": c.predictor, "denoise": c.denoise, "sample_eps": SAMPLE_EPS[c.sde],
                "sigma_min": c.sigma_min, "sigma_max": c.sigma_max, "beta_min": c.beta_min,
                "beta_max": c.beta_max, "num_classes": 0}


def _noise(generators, x: torch.Tensor):
    """The samplers' noise: N(0, I) like x, each image's row from its own generator."""
    return lambda: per_image("randn", generators, x.shape[1:], x.device)


class _ScoreGraph(torch.nn.Module):
    """s(x, t) of a score model: the U-Net with its sigma / std scaling, the graph of its ONNX export."""

    def __init__(self, family: Score, unet):
        super().__init__()
        self.family, self.unet = family, unet

    def forward(self, x, t):
        return self.family.score(self.unet, x, t)

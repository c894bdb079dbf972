"""What a diffusion model is trained to predict and how it is sampled, apart from the network that predicts it.

``model.formulation`` picks one of :data:`FORMULATIONS`, which the diffusion families
(:mod:`distgen.families.diffusion`, and latent diffusion through it) delegate to:

- ``ddpm`` (Ho et al. 2020): discrete timesteps of a diffusers DDPMScheduler, epsilon or v prediction, sampled by
  diffusers' DDPM / DDIM / DPM-Solver++ schedulers; the behaviour distgen always had, bit for bit.
- ``edm`` (Karras et al. 2022): the network F inside sigma-preconditioning, D(x; sigma) = c_skip x + c_out
  F(c_in x; c_noise), trained at sigma = exp(N(P_mean, P_std^2)) with weight lambda(sigma) = (sigma^2 +
  sigma_d^2) / (sigma sigma_d)^2, optionally with EDM2's learned uncertainty u(sigma) (lambda / e^u x L + u);
  sampled on Karras' sigmas by Euler, Heun or DPM-Solver++(2M) (:mod:`distgen.families.karras`).
- ``flow`` (rectified flow / flow matching, Lipman et al. 2023, Liu et al. 2023; SD3, Esser et al. 2024):
  x_t = (1 - t) x0 + t eps, the network predicts v = eps - x0 at t drawn uniform or logit-normal and shifted;
  sampled by Euler or Heun on dx/dt = v from t = 1 to 0.

Every network call goes through one convention, ``net(x, noise_cond, class_labels=labels)`` returning the
prediction as a tensor (the backbones of :mod:`distgen.families.backbones`) or as diffusers' output with
``.sample`` (UNet2DModel as the family builds it), read by :func:`prediction`
(:func:`distgen.families.denoising.guided_prediction` for classifier-free guidance): a backbone that takes it
(UNet2DModel today, a DiT or EDM2 U-Net next) works with every formulation. The formulation says what
``noise_cond`` is: DDPM's integer timestep, EDM's c_noise = ln(sigma) / 4, flow's 1000 t.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from distgen.config.formulations import FORMULATIONS as FORMULATION_CONFIGS
from distgen.families.denoising import denoise, guided_prediction
from distgen.families.karras import EDM_SAMPLERS, FLOW_SAMPLERS, flow_times, karras_sigmas, shift_time
from distgen.families.ode import hutchinson_divergence, rk45

FLOW_T_SCALE = 1000.0  # the network sees 1000 t, as diffusers' flow-matching schedulers feed their timesteps


def make_sampler(name: str, train_scheduler):
    """A diffusers sampling scheduler sharing the training noise schedule."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    if name == "ddpm":
        return DDPMScheduler.from_config(train_scheduler.config)
    if name == "ddim":
        return DDIMScheduler.from_config(train_scheduler.config)
    if name == "dpmsolver":
        return DPMSolverMultistepScheduler.from_config(train_scheduler.config, algorithm_type="dpmsolver++")
    raise ValueError(f"sampler must be one of {', '.join(FORMULATION_CONFIGS['ddpm'].samplers)}, got {name!r}")


def prediction(out) -> torch.Tensor:
    """A network's prediction from what it returned: a tensor, or diffusers' output (``.sample``)."""
    return out if isinstance(out, torch.Tensor) else out.sample


def per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(a.float(), b.float(), reduction="none").mean(dim=tuple(range(1, a.dim())))


class Formulation:
    """One formulation: :meth:`draw` the training noise (before the labels' dropout draws, keeping DDPM's order of
    random draws), :meth:`loss` per sample, and :meth:`sample` from standard normal noise."""

    name: ClassVar[str]

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.samplers = FORMULATION_CONFIGS[self.name].samplers

    def wrap(self, unet: nn.Module) -> nn.Module:
        """The network trained (the backbone, or a module around it with more that is trained with it)."""
        return unet

    def draw(self, x0: torch.Tensor, generator: torch.Generator) -> dict:
        raise NotImplementedError

    def loss(self, net, drawn: dict, labels: Optional[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def steps_problem(self, steps: int) -> Optional[str]:
        """Why ``--steps`` cannot be ``steps`` (None: it can)."""
        return None if steps >= 1 else f"must be >= 1, got {steps}"

    def sample(self, net, x: torch.Tensor, labels, null_class, guidance: float, sampler: str, steps: int,
               generators=None, noise=None) -> tuple[torch.Tensor, int]:
        """``x`` (standard normal noise) carried to the data by ``sampler`` in ``steps`` steps; with the number of
        network evaluations (NFE). ``noise(x)`` draws fresh noise like x (stochastic samplers)."""
        raise NotImplementedError

    def flow_ode(self, net, labels):
        """The probability-flow ODE as (drift(x, s, rows), s_data, s_prior, prior_logp(z) per image): dx/ds from
        the data's end to the prior's, each row of x at its own s [b] (``rows`` indexes the batch)."""
        raise NotImplementedError

    def log_density(self, net, y: torch.Tensor, labels, probes: torch.Tensor, tol: float) -> torch.Tensor:
        """log p(y) in nats per image of continuous ``y`` (the model's data space) by the instantaneous change
        of variables along the probability-flow ODE, log p(y) = log p_prior(x(s_prior)) + int div drift ds, the
        divergence by Hutchinson's estimator with ``probes`` [B, K, *y] held through the solve (rk45 at ``tol``)."""
        drift, a, b, prior_logp = self.flow_ode(net, labels)
        shape, d = y.shape, y[0].numel()

        def f(state, s, rows):
            with torch.enable_grad():
                x = state[:, :d].view(-1, *shape[1:]).to(y.dtype).requires_grad_(True)
                out = drift(x, s.to(y.dtype), rows)
                div = hutchinson_divergence(out, x, probes[rows].to(y.dtype))
            return torch.cat([out.detach().double().flatten(1), div.detach().double()[:, None]], 1)

        with torch.autocast(y.device.type, enabled=False):
            out = rk45(f, torch.cat([y.double().flatten(1), y.new_zeros(len(y), 1, dtype=torch.float64)], 1),
                       a, b, tol, what="the probability-flow ODE (model.ode_tol)")
        return prior_logp(out[:, :d]) + out[:, d]


class DDPM(Formulation):
    name = "ddpm"

    def __init__(self, cfg, scheduler):
        super().__init__(cfg)
        self.scheduler = scheduler

    def draw(self, x0, generator):
        b = x0.shape[0]
        t = torch.randint(0, self.cfg.num_train_timesteps, (b,), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
        return {"x0": x0, "t": t, "noise": noise, "xt": self.scheduler.add_noise(x0, noise, t)}

    def loss(self, net, drawn, labels):
        pred = prediction(net(drawn["xt"], drawn["t"], class_labels=labels))
        if self.cfg.prediction == "epsilon":
            target = drawn["noise"]
        else:
            target = self.scheduler.get_velocity(drawn["x0"], drawn["noise"], drawn["t"])
        return per_sample_mse(pred, target), {}

    def steps_problem(self, steps):
        n = self.cfg.num_train_timesteps
        return None if 1 <= steps <= n else f"must be in [1, {n}] (the model's training timesteps), got {steps}"

    def sample(self, net, x, labels, null_class, guidance, sampler, steps, generators=None, noise=None):
        sched = make_sampler(sampler, self.scheduler)
        sched.set_timesteps(steps, device=x.device)
        x = denoise(net, sched, x * sched.init_noise_sigma, labels, null_class, guidance, generator=generators)
        return x, len(sched.timesteps)


    @torch.no_grad()
    def variational_bound(self, unet, images, labels, generators):
        """The variational lower bound on log p(x) (Ho et al. 2020, eq. 5), in nats per image.

        Every timestep's KL term with the fixed-small reverse variance, the
        prior term, and a discretised Gaussian decoder at t = 0, as in
        improved-diffusion's ``calc_bpd_loop``. Costs one network pass per
        training timestep.
        """
        from diffusers.utils.torch_utils import randn_tensor

        from distgen.families.likelihoods import discretized_gaussian_log_prob

        s = self.scheduler
        dev = images.device
        x0 = images.float() / 127.5 - 1
        abar = s.alphas_cumprod.to(dev, torch.float64)
        betas = s.betas.to(dev, torch.float64)
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        post_var = betas * (1 - abar_prev) / (1 - abar)
        post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
        coef1 = betas * abar_prev.sqrt() / (1 - abar)
        coef2 = (1 - abar_prev) * (1 - betas).sqrt() / (1 - abar)
        x0d = x0.double()
        total = torch.zeros(x0.shape[0], dtype=torch.float64, device=dev)
        for t in range(self.cfg.num_train_timesteps):
            noise = randn_tensor(x0.shape, generator=generators, device=dev, dtype=torch.float32)
            tt = torch.full((x0.shape[0],), t, device=dev, dtype=torch.long)
            xt = s.add_noise(x0, noise, tt)
            out = prediction(unet(xt, tt, class_labels=labels)).double()
            xtd = xt.double()
            if self.cfg.prediction == "epsilon":
                x0_pred = (xtd - (1 - abar[t]).sqrt() * out) / abar[t].sqrt()
            else:
                x0_pred = abar[t].sqrt() * xtd - (1 - abar[t]).sqrt() * out
            x0_pred = x0_pred.clamp(-1, 1)
            mean_model = coef1[t] * x0_pred + coef2[t] * xtd
            if t == 0:
                total -= discretized_gaussian_log_prob(x0d, mean_model, 0.5 * post_logvar[0]).sum(dim=(1, 2, 3))
            else:
                mean_true = coef1[t] * x0d + coef2[t] * xtd
                # KL of two Gaussians with the same variance: the squared mean gap over twice the variance
                total += (0.5 * (mean_true - mean_model) ** 2 * torch.exp(-post_logvar[t])).sum(dim=(1, 2, 3))
        # Prior term: KL(q(x_T | x_0) || N(0, I))
        m, v = abar[-1].sqrt() * x0d, 1 - abar[-1]
        total += (0.5 * (-1 - torch.log(v) + v + m ** 2)).sum(dim=(1, 2, 3))
        return -total


class UncertaintyOutput(NamedTuple):
    sample: torch.Tensor
    logvar: torch.Tensor  # [B]: EDM2's u(sigma)


class WithUncertainty(nn.Module):
    """A backbone and EDM2's learned loss weighting u(sigma) = linear(Fourier features of c_noise) (Karras et al.
    2024, sec. 5), one module so that it is trained, averaged, saved and resumed with the network. Called as the
    backbone is; the output's ``sample`` is the backbone's, ``logvar`` u per image. The linear map starts at 0:
    u = 0, the plain EDM loss."""

    def __init__(self, unet: nn.Module, channels: int = 128):
        super().__init__()
        self.unet = unet
        g = torch.Generator().manual_seed(0)  # fixed features: every build of the network has the same
        self.register_buffer("freqs", 2 * math.pi * torch.randn(channels, generator=g))
        self.register_buffer("phases", 2 * math.pi * torch.rand(channels, generator=g))
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    @property
    def config(self):
        return self.unet.config

    def forward(self, x, t, class_labels=None):
        out = prediction(self.unet(x, t, class_labels=class_labels))
        c = torch.as_tensor(t, device=x.device).float().reshape(-1).expand(x.shape[0])
        fourier = torch.cos(c[:, None] * self.freqs + self.phases) * math.sqrt(2)
        return UncertaintyOutput(out, self.linear(fourier).reshape(-1))


def backbone(net: nn.Module) -> nn.Module:
    """The backbone inside what :meth:`Formulation.wrap` made of it."""
    return net.unet if isinstance(net, WithUncertainty) else net


class EDM(Formulation):
    name = "edm"

    def wrap(self, unet):
        return WithUncertainty(unet) if self.cfg.edm_uncertainty else unet

    def coefficients(self, sigma: torch.Tensor):
        """(c_skip, c_out, c_in, c_noise) at ``sigma`` (EDM's Table 1)."""
        sd2 = self.cfg.sigma_data ** 2
        root = (sigma ** 2 + sd2).sqrt()
        return sd2 / (sigma ** 2 + sd2), sigma * self.cfg.sigma_data / root, 1 / root, sigma.log() / 4

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2: the effective target of F at unit weight."""
        return (sigma ** 2 + self.cfg.sigma_data ** 2) / (sigma * self.cfg.sigma_data) ** 2

    def precondition(self, net, x, sigma, labels=None):
        """D(x; sigma) and the network's output, ``sigma`` [B, 1, 1, 1] (or 0-dim: one for the batch)."""
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        out = net(c_in * x, c_noise.reshape(-1) if sigma.dim() else c_noise, class_labels=labels)
        return c_skip * x + c_out * prediction(out).to(x.dtype), out

    def draw(self, x0, generator):
        b = x0.shape[0]
        z = torch.randn((b, 1, 1, 1), device=x0.device, generator=generator)
        sigma = (z * self.cfg.p_std + self.cfg.p_mean).exp()
        noise = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
        return {"x0": x0, "sigma": sigma, "x": x0 + sigma.to(x0.dtype) * noise}

    def loss(self, net, drawn, labels):
        sigma = drawn["sigma"]
        d, out = self.precondition(net, drawn["x"], sigma.to(drawn["x"].dtype), labels)
        loss = self.weight(sigma.reshape(-1)) * per_sample_mse(d, drawn["x0"])
        if self.cfg.edm_uncertainty:
            u = out.logvar.float()
            return loss / u.exp() + u, {"uncertainty": u.detach().mean()}
        return loss, {}

    def denoiser(self, net, labels=None, null_class=None, guidance=1.0):
        """D(x, sigma) at a float sigma, classifier-free guided: the guided F through the preconditioning
        (D is affine in F, so this is D_uncond + w (D_cond - D_uncond))."""
        def d(x, sigma):
            s = torch.tensor(sigma, dtype=x.dtype, device=x.device)
            c_skip, c_out, c_in, c_noise = self.coefficients(s)
            return c_skip * x + c_out * guided_prediction(net, c_in * x, c_noise, labels, null_class,
                                                          guidance).to(x.dtype)
        return d

    def flow_ode(self, net, labels):
        """In s = ln sigma from sigma_min to sigma_max: dx/ds = x - D(x; e^s); the prior N(0, sigma_max^2 I), the
        noise the samplers start from."""
        def drift(x, s, rows):
            d, _ = self.precondition(net, x, s.exp().reshape(-1, *[1] * (x.dim() - 1)),
                                     None if labels is None else labels[rows])
            return x - d

        smax = self.cfg.sigma_max
        return (drift, math.log(self.cfg.sigma_min), math.log(smax),
                lambda z: -0.5 * (z.pow(2).sum(1) / smax ** 2 + z.shape[1] * math.log(2 * math.pi * smax ** 2)))

    def sigmas(self, steps: int) -> list[float]:
        return karras_sigmas(steps, self.cfg.sigma_min, self.cfg.sigma_max, self.cfg.rho)

    def sample(self, net, x, labels, null_class, guidance, sampler, steps, generators=None, noise=None):
        sigmas = self.sigmas(steps)
        c = self.cfg
        churn = dict(s_churn=c.s_churn, s_min=c.s_min, s_max=c.s_max, s_noise=c.s_noise, noise=noise)
        fn = EDM_SAMPLERS[sampler]
        return fn(self.denoiser(net, labels, null_class, guidance), x * sigmas[0], sigmas,
                  **(churn if sampler != "dpmpp_2m" else {}))


class Flow(Formulation):
    name = "flow"

    def times(self, b: int, device, generator) -> torch.Tensor:
        """Training times [B]: uniform or logit-normal (SD3), then shifted."""
        if self.cfg.flow_t == "uniform":
            t = torch.rand((b,), device=device, generator=generator)
        else:
            z = torch.randn((b,), device=device, generator=generator)
            t = torch.sigmoid(self.cfg.flow_mean + self.cfg.flow_std * z)
        return shift_time(t, self.cfg.flow_shift)

    def draw(self, x0, generator):
        t = self.times(x0.shape[0], x0.device, generator)
        eps = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
        tt = t.reshape(-1, 1, 1, 1).to(x0.dtype)
        return {"x0": x0, "t": t, "eps": eps, "xt": (1 - tt) * x0 + tt * eps}

    def loss(self, net, drawn, labels):
        v = prediction(net(drawn["xt"], drawn["t"] * FLOW_T_SCALE, class_labels=labels))
        return per_sample_mse(v, drawn["eps"] - drawn["x0"]), {}

    def velocity(self, net, labels=None, null_class=None, guidance=1.0):
        """v(x, t) at a float t, classifier-free guided."""
        def v(x, t):
            tt = torch.tensor(t * FLOW_T_SCALE, dtype=x.dtype, device=x.device)
            return guided_prediction(net, x, tt, labels, null_class, guidance).to(x.dtype)
        return v

    def flow_ode(self, net, labels):
        """In t from 0 (the data) to 1: dx/dt = v(x, t); the prior N(0, I)."""
        def drift(x, t, rows):
            out = net(x, t * FLOW_T_SCALE, class_labels=None if labels is None else labels[rows])
            return prediction(out).to(x.dtype)

        return drift, 0.0, 1.0, lambda z: -0.5 * (z.pow(2).sum(1) + z.shape[1] * math.log(2 * math.pi))

    def sample(self, net, x, labels, null_class, guidance, sampler, steps, generators=None, noise=None):
        return FLOW_SAMPLERS[sampler](self.velocity(net, labels, null_class, guidance), x,
                                      flow_times(steps, self.cfg.flow_shift))


FORMULATIONS: dict[str, type[Formulation]] = {f.name: f for f in (DDPM, EDM, Flow)}


def formulation(cfg, scheduler) -> Formulation:
    """The formulation ``cfg.formulation`` names (DDPM gets the family's training scheduler)."""
    cls = FORMULATIONS[cfg.formulation]
    return cls(cfg, scheduler) if cls is DDPM else cls(cfg)

"""VAEs: the convolutional VAE / beta-VAE (Kingma & Welling 2014; Higgins et al. 2017) and a
hierarchical VAE in the style of VDVAE (Child 2021) and NVAE (Vahdat & Kautz 2020).

Both networks share one contract: ``net(x, generator)`` draws latents from the
posterior and returns the decoder's likelihood parameters, the analytic KL
of every latent group (per sample), and the log densities of the drawn
latents under the posterior and the prior (for the importance-weighted
bound). The decoder's likelihood is a discretised logistic mixture, a
discretised Gaussian (both on the 256 pixel values) or a Bernoulli over
binarised pixels.

- Training minimises the negative ELBO in bits/dim, the KL weighted by
  ``beta`` (beta-VAE), ramped from 0 over ``kl_warmup_kimg`` and with
  ``free_bits`` nats per latent group (Kingma et al. 2016).
- ``distgen eval --metrics bpd`` gives the ELBO (``--iw-samples 1``) or the
  importance-weighted bound with k samples (Burda et al. 2016); ``recon``
  gives reconstruction PSNR / SSIM of the test split.
- Sampling draws from the prior with a temperature; :meth:`VAEFamily.reconstruct`
  and :meth:`VAEFamily.interpolate` go through the latent space.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from distgen.config.core import ConfigError
from distgen.config.models import VAEConfig
from distgen.families.base import DataInfo, Family, Phase, load_module, save_module
from distgen.families import capabilities as cap
from distgen.families.capabilities import OnnxGraph
from distgen.families.checkpointing import Checkpointable
from distgen.families.graphs import latent_docs, split_flat
from distgen.families.likelihoods import (discretized_gaussian_log_prob, logistic_mixture_log_prob,
                                         logistic_mixture_mode, logistic_mixture_params)

LOG2PI = math.log(2 * math.pi)

# arch -> preset -> constructor arguments
PRESETS: dict[str, dict[str, dict]] = {
    "vae": {"tiny": dict(width=16, latent_dim=8), "small": dict(width=64, latent_dim=32),
            "paper": dict(width=128, latent_dim=128)},
    # blocks per resolution (finest first) and latent channels per group; paper: a VDVAE-like CIFAR-10 size
    "hvae": {"tiny": dict(width=16, zdim=4, blocks=(1, 1, 1)), "small": dict(width=64, zdim=8, blocks=(2, 2, 2)),
             "paper": dict(width=384, zdim=16, blocks=(8, 8, 6))},
}


def _float32(*ts: torch.Tensor) -> list[torch.Tensor]:
    """16-bit tensors (a network's outputs under bf16/fp16 autocast) in float32, wider ones as they are: the
    densities and KLs below are likelihood maths, which runs in float32 whatever the network's precision."""
    return [t.float() if t.dtype in (torch.bfloat16, torch.float16) else t for t in ts]


def gaussian_log_density(z, mean, logs) -> torch.Tensor:
    """log N(z; mean, exp(logs)^2), summed per sample."""
    z, mean, logs = _float32(z, mean, logs)
    return (-0.5 * (LOG2PI + 2 * logs + (z - mean) ** 2 * torch.exp(-2 * logs))).flatten(1).sum(1)


def gaussian_kl(qm, qlogs, pm, plogs) -> torch.Tensor:
    """KL(N(qm, e^qlogs) || N(pm, e^plogs)) in closed form, summed per sample."""
    qm, qlogs, pm, plogs = _float32(qm, qlogs, pm, plogs)
    return (plogs - qlogs + 0.5 * (torch.exp(2 * qlogs) + (qm - pm) ** 2) * torch.exp(-2 * plogs) - 0.5).flatten(1).sum(1)


def _randn(shape, generator, device):
    """Standard normals; with a list of generators, row i from generators[i] (an image's latents then
    depend on its own seed only, whatever the batch around it)."""
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.randn(shape[1:], generator=g, device=device) for g in generator])
    return torch.randn(shape, generator=generator, device=device)


# ---------------------------------------------------------------- the decoder's likelihood

class Likelihood:
    """p(x | decoder output): the parameter count and the log-probability per sample (nats)."""

    def __init__(self, kind: str, channels: int, nr_mix: int):
        self.kind, self.channels, self.nr_mix = kind, channels, nr_mix

    @property
    def out_channels(self) -> int:
        if self.kind == "logistic":
            return logistic_mixture_params(self.channels, self.nr_mix)
        return self.channels * (2 if self.kind == "gaussian" else 1)

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """What is modelled, from images on [-1, 1]: the 256-value grid, or {0, 1} for a Bernoulli."""
        x255 = ((x + 1) * 127.5).round()
        return (x255 > 127).float() if self.kind == "bernoulli" else x255 / 127.5 - 1

    def log_prob(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        out = out.float()
        if self.kind == "logistic":
            return logistic_mixture_log_prob(x, out, self.nr_mix).flatten(1).sum(1)
        if self.kind == "gaussian":
            mean, log_scale = out.chunk(2, 1)
            return discretized_gaussian_log_prob(x, torch.tanh(mean), log_scale.clamp(min=-7)).flatten(1).sum(1)
        return -F.binary_cross_entropy_with_logits(out, x, reduction="none").flatten(1).sum(1)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        """The decoder's point image on [-1, 1] (reconstructions, samples): the mixture's most likely
        component mean, the Gaussian mean, or the Bernoulli probability."""
        out = out.float()
        if self.kind == "gaussian":
            return torch.tanh(out[:, :self.channels])
        if self.kind == "bernoulli":
            return torch.sigmoid(out) * 2 - 1
        return logistic_mixture_mode(out, self.nr_mix, self.channels)


# ---------------------------------------------------------------- the convolutional VAE

class ConvVAE(nn.Module):
    """Two stride-2 convolutions down to a Gaussian latent vector, and back up."""

    def __init__(self, channels=1, resolution=28, width=64, latent_dim=32, out_channels=3):
        super().__init__()
        self.latent_dim, self.res4 = latent_dim, resolution // 4
        flat = 2 * width * self.res4 ** 2
        self.enc = nn.Sequential(nn.Conv2d(channels, width, 4, 2, 1), nn.SiLU(), nn.Conv2d(width, 2 * width, 4, 2, 1),
                                 nn.SiLU(), nn.Flatten(), nn.Linear(flat, 2 * latent_dim))
        self.dec_in = nn.Linear(latent_dim, flat)
        self.dec = nn.Sequential(nn.SiLU(), nn.ConvTranspose2d(2 * width, width, 4, 2, 1), nn.SiLU(),
                                 nn.ConvTranspose2d(width, out_channels, 4, 2, 1))

    def posterior(self, x):
        mean, logs = self.enc(x).chunk(2, 1)
        return mean, logs.clamp(-10, 5)

    def decode(self, z):
        return self.dec(self.dec_in(z).view(z.shape[0], -1, self.res4, self.res4))

    def forward(self, x, generator: Optional[torch.Generator] = None):
        qm, qlogs = self.posterior(x)
        z = qm + torch.exp(qlogs) * _randn(qm.shape, generator, x.device)
        zero = torch.zeros_like(qm)
        return {"out": self.decode(z), "kl": [gaussian_kl(qm, qlogs, zero, zero)],
                "logq": gaussian_log_density(z, qm, qlogs), "logp": gaussian_log_density(z, zero, zero)}

    def sample(self, eps: list[torch.Tensor], temperature: float = 1.0):
        return self.decode(temperature * eps[0])

    def posterior_means(self, x) -> list[torch.Tensor]:
        return [self.posterior(x)[0]]

    def decode_latents(self, zs: list[torch.Tensor]):
        return self.decode(zs[0])

    def latent_shapes(self):
        return [(self.latent_dim,)]


# ---------------------------------------------------------------- the hierarchical VAE

class ResBlock(nn.Module):
    """VDVAE's bottleneck residual block: 1x1, 3x3, 3x3, 1x1 with GELU; the last layer starts small."""

    def __init__(self, cin, hidden, cout, residual=True, last_scale=1.0):
        super().__init__()
        self.residual = residual
        self.c1, self.c2 = nn.Conv2d(cin, hidden, 1), nn.Conv2d(hidden, hidden, 3, padding=1)
        self.c3, self.c4 = nn.Conv2d(hidden, hidden, 3, padding=1), nn.Conv2d(hidden, cout, 1)
        with torch.no_grad():
            self.c4.weight.mul_(last_scale)

    def forward(self, x):
        h = self.c4(F.gelu(self.c3(F.gelu(self.c2(F.gelu(self.c1(F.gelu(x))))))))
        return x + h if self.residual else h


class TopDownBlock(nn.Module):
    """One latent group: prior p(z | h) and posterior q(z | h, encoder activation), then h += proj(z)."""

    def __init__(self, width, zdim, depth_scale):
        super().__init__()
        hidden = max(width // 4, 4)
        self.zdim = zdim
        self.enc = ResBlock(2 * width, hidden, 2 * zdim, residual=False)
        self.prior = ResBlock(width, hidden, 2 * zdim + width, residual=False, last_scale=0.0)  # starts N(0, I)
        self.proj = nn.Conv2d(zdim, width, 1)
        with torch.no_grad():
            self.proj.weight.mul_(depth_scale)
        self.res = ResBlock(width, hidden, width, last_scale=depth_scale)

    def _prior(self, h):
        p = self.prior(h)
        pm, plogs, extra = p[:, :self.zdim], p[:, self.zdim:2 * self.zdim], p[:, 2 * self.zdim:]
        return pm, plogs, h + extra

    def forward(self, h, act, generator):
        pm, plogs, h = self._prior(h)
        qm, qlogs = self.enc(torch.cat([h, act], 1)).chunk(2, 1)
        qlogs = qlogs.clamp(-10, 5)
        z = qm + torch.exp(qlogs) * _randn(qm.shape, generator, h.device)
        stats = (gaussian_kl(qm, qlogs, pm, plogs), gaussian_log_density(z, qm, qlogs),
                 gaussian_log_density(z, pm, plogs))
        return self.res(h + self.proj(z)), stats

    def sample(self, h, eps, temperature):
        pm, plogs, h = self._prior(h)
        z = pm + temperature * torch.exp(plogs) * eps
        return self.res(h + self.proj(z))

    def posterior_mean(self, h, act):
        _, _, h = self._prior(h)
        qm = self.enc(torch.cat([h, act], 1)).chunk(2, 1)[0]
        return self.res(h + self.proj(qm)), qm

    def given(self, h, z):
        _, _, h = self._prior(h)
        return self.res(h + self.proj(z))


class HierarchicalVAE(nn.Module, Checkpointable):
    """A bottom-up encoder and a top-down decoder over three resolutions (full, 1/2, 1/4), with
    ``blocks[i]`` latent groups of ``zdim`` channels at resolution i (finest first)."""

    def __init__(self, channels=1, resolution=28, width=64, zdim=8, blocks=(2, 2, 2), out_channels=3):
        super().__init__()
        self.res = [resolution, resolution // 2, resolution // 4]
        self.blocks = tuple(blocks)
        hidden = max(width // 4, 4)
        n_groups = sum(blocks)
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.enc = nn.ModuleList(nn.Sequential(*[ResBlock(width, hidden, width) for _ in range(max(n, 1))])
                                 for n in blocks)
        self.dec = nn.ModuleList(nn.ModuleList(TopDownBlock(width, zdim, 1 / math.sqrt(n_groups)) for _ in range(n))
                                 for n in blocks)
        self.h_top = nn.Parameter(torch.zeros(1, width, self.res[-1], self.res[-1]))
        self.out = nn.Conv2d(width, out_channels, 3, padding=1)
        self.zdim = zdim

    def checkpoint_blocks(self):
        """The encoder's residual blocks and the decoder's latent groups (whose draws are replayed)."""
        return [b for seq in self.enc for b in seq] + [b for level in self.dec for b in level]

    def _activations(self, x):
        acts, h = [], self.inp(x)
        for i, blocks in enumerate(self.enc):
            h = blocks(h)
            acts.append(h)
            if i < len(self.enc) - 1:
                h = F.avg_pool2d(h, 2)
        return acts

    def _up(self, h, i):
        return F.interpolate(h, size=(self.res[i], self.res[i]), mode="nearest")

    def forward(self, x, generator: Optional[torch.Generator] = None):
        acts, stats = self._activations(x), []

        def step(block, h, i):
            h, st = block(h, acts[i], generator)
            stats.append(st)
            return h

        out = self._top_down(x.shape[0], step)
        return {"out": out, "kl": [st[0] for st in stats], "logq": sum(st[1] for st in stats),
                "logp": sum(st[2] for st in stats)}

    def sample(self, eps: list[torch.Tensor], temperature: float = 1.0):
        it = iter(eps)
        return self._top_down(eps[0].shape[0], lambda block, h, i: block.sample(h, next(it), temperature))

    def latent_shapes(self):
        return [(self.zdim, self.res[i], self.res[i]) for i in reversed(range(len(self.dec))) for _ in self.dec[i]]

    def _top_down(self, n, step):
        h = self.h_top.expand(n, -1, -1, -1)
        for i in reversed(range(len(self.dec))):
            h = self._up(h, i)
            for block in self.dec[i]:
                h = step(block, h, i)
        return self.out(h)

    def posterior_means(self, x) -> list[torch.Tensor]:
        """Every group's posterior mean, each group conditioned on the means above it."""
        acts, zs = self._activations(x), []

        def step(block, h, i):
            h, z = block.posterior_mean(h, acts[i])
            zs.append(z)
            return h

        self._top_down(x.shape[0], step)
        return zs

    def decode_latents(self, zs: list[torch.Tensor]):
        it = iter(zs)
        return self._top_down(zs[0].shape[0], lambda block, h, i: block.given(h, next(it)))


# ---------------------------------------------------------------- the family

ARCHS = {"vae": ConvVAE, "hvae": HierarchicalVAE}


class VAEFamily(Family, cap.Likelihood, cap.Reconstructs, cap.Interpolates, cap.ExportsOnnx):
    name = "vae"
    config_cls = VAEConfig
    likelihood = "bound"
    EXPORT = "vae"

    def __init__(self, cfg: VAEConfig, data: DataInfo):
        super().__init__(cfg, data)
        if data.resolution % 4:
            raise ConfigError(f"data.resolution: the VAEs halve the image twice, so it must be a multiple of 4, "
                              f"got {data.resolution}")
        self.lik = Likelihood(cfg.likelihood, data.channels, cfg.nr_mix)

    def net_kwargs(self) -> dict:
        return dict(channels=self.data.channels, resolution=self.data.resolution,
                    out_channels=self.lik.out_channels, **PRESETS[self.cfg.arch][self.cfg.preset])

    def build_networks(self):
        return {"vae": ARCHS[self.cfg.arch](**self.net_kwargs())}

    def phases(self):
        return [Phase("elbo", "vae")]

    def load_state_dict(self, state):
        # Checkpoints written before the step context kept a second count of images here; the run's own
        # count (meta.json's nimg, passed to loss as ctx.nimg) replaces it.
        super().load_state_dict({k: v for k, v in state.items() if k != "nimg"})

    def kl_weight(self, nimg: int) -> float:
        """The KL term's weight for a step that starts after ``nimg`` images (the warm-up's ramp)."""
        ramp = min(1.0, nimg / (self.cfg.kl_warmup_kimg * 1000)) if self.cfg.kl_warmup_kimg > 0 else 1.0
        return self.cfg.beta * ramp

    def loss(self, ctx, nets, batch, generator):
        x = self.lik.target(batch["image"])
        res = nets["vae"](x, generator)
        rec = -self.lik.log_prob(x, res["out"])
        kls = torch.stack(res["kl"], 1)  # [B, groups]
        if self.cfg.free_bits > 0:
            # a group whose batch-mean KL is under the floor gets no push down (Kingma et al. 2016)
            active = kls.detach().mean(0, keepdim=True) > self.cfg.free_bits
            kl_term = torch.where(active, kls, torch.full_like(kls, self.cfg.free_bits)).sum(1)
        else:
            kl_term = kls.sum(1)
        w = self.kl_weight(ctx.nimg)
        dims = x[0].numel() * math.log(2)
        return (rec + w * kl_term) / dims, {"recon_bpd": rec.detach().mean() / dims,
                                            "kl_bpd": kls.detach().sum(1).mean() / dims, "kl_weight": w}

    likelihood_options = ("iw_samples",)

    @torch.no_grad()
    def log_likelihood(self, nets, images, labels, generators, iw_samples=None):
        """The ELBO (k = 1) or the importance-weighted bound log 1/k sum_i p(x, z_i) / q(z_i | x), in nats."""
        k = iw_samples or self.cfg.iw_samples
        x = self.lik.target(images.float() / 127.5 - 1)
        if k == 1:  # the ELBO, its KL in closed form (the lower-variance estimate)
            res = _per_image(nets["vae"], x, generators)
            return (self.lik.log_prob(x, res["out"]) - torch.stack(res["kl"], 1).sum(1)).double()
        return self.iw_bound(nets, x, generators, k)

    @torch.no_grad()
    def iw_bound(self, nets, x, generators, k: int) -> torch.Tensor:
        """log 1/k sum_i p(x | z_i) p(z_i) / q(z_i | x) with z_i ~ q (Burda et al. 2016), x as modelled."""
        terms = []
        for _ in range(k):
            res = _per_image(nets["vae"], x, generators)
            terms.append((self.lik.log_prob(x, res["out"]) + res["logp"] - res["logq"]).double())
        return torch.logsumexp(torch.stack(terms, 1), 1) - math.log(k)

    sample_options = ("temperature",)

    def _eps(self, net, generators, device):
        return [_randn((len(generators), *s), list(generators), device) for s in net.latent_shapes()]

    @torch.no_grad()
    def sample(self, nets, generators, *, labels=None, temperature=None):
        net = nets["vae"]
        t = self.cfg.temperature if temperature is None else temperature
        self.validate_sample_options({"temperature": t})  # for callers of sample() itself
        device = next(net.parameters()).device
        return self.lik.mean(net.sample(self._eps(net, generators, device), t))

    @torch.no_grad()
    def reconstruct(self, nets, images: torch.Tensor, generators) -> torch.Tensor:
        """uint8 NCHW images -> their reconstructions, float NCHW on [-1, 1] (one posterior draw each)."""
        x = self.lik.target(images.float() / 127.5 - 1)
        return self.lik.mean(_per_image(nets["vae"], x, generators)["out"])

    @torch.no_grad()
    def interpolate(self, nets, a: torch.Tensor, b: torch.Tensor, steps: int = 8) -> torch.Tensor:
        """Images along the straight line between the posterior means of images ``a`` and ``b`` (uint8 CHW).

        The hierarchical VAE interpolates every latent group at once, each group's mean taken given the means
        above it (VDVAE's way), and decodes with the interpolated latents in place of draws.
        """
        net = nets["vae"]
        x = self.lik.target(torch.stack([a, b]).float() / 127.5 - 1)
        w = torch.linspace(0, 1, steps, device=x.device)
        zs = [torch.lerp(z[:1], z[1:], w.view(-1, *[1] * (z.dim() - 1))) for z in net.posterior_means(x)]
        return self.lik.mean(net.decode_latents(zs))

    def export(self, nets, out_dir):
        save_module(out_dir, self.EXPORT, nets["vae"], {"arch": self.cfg.arch, "kwargs": self.net_kwargs()})

    def load_export(self, out_dir):
        return {"vae": load_module(out_dir, self.EXPORT, lambda spec: ARCHS[spec["arch"]](**spec["kwargs"]))}

    def onnx_graphs(self, nets):
        shapes = [tuple(s) for s in nets["vae"].latent_shapes()]
        total = sum(math.prod(s) for s in shapes)
        r, c = self.data.resolution, self.data.channels
        return [OnnxGraph("decoder", _DecoderGraph(nets["vae"], self.lik, shapes),
                          {"eps": torch.randn(2, total), "temperature": torch.tensor(self.cfg.temperature)},
                          ["image"],
                          {"eps": latent_docs(shapes, "prior's latent groups (top first, as drawn)"),
                           "temperature": "scalar float32: each group is mean + temperature * scale * eps",
                           "image": f"[batch, {c}, {r}, {r}] float32 on [-1, 1]: the decoder's point image"},
                          static=("temperature",))]

    def onnx_sampler(self, nets):
        return {"kind": "latent_noise", "graph": "decoder",
                "latent_shapes": [list(s) for s in nets["vae"].latent_shapes()],
                "temperature": self.cfg.temperature, "num_classes": 0}


class _DecoderGraph(nn.Module):
    """eps (flat) and temperature -> the decoder's point image: a VAE's sampling path as one graph."""

    def __init__(self, vae, lik, shapes):
        super().__init__()
        self.vae, self.lik, self.shapes = vae, lik, shapes

    def forward(self, eps, temperature):
        return self.lik.mean(self.vae.sample(split_flat(eps, self.shapes), temperature)).float()


def _per_image(net, x, generators):
    """A forward pass whose latent noise for image i comes from generators[i]."""
    return net(x, list(generators))

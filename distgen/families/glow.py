"""Glow (Kingma & Dhariwal 2018): a multi-scale normalising flow with an exact density.

Each of ``levels`` levels squeezes (2x2 pixels -> 4x channels), runs ``steps``
flow steps, each an actnorm, an invertible 1x1 convolution in LU form and an
affine (or additive) coupling, then splits off half the channels, which are
scored under a Gaussian whose mean and scale a zero-initialised convolution
predicts from the other half (the learned prior). The last level's output
gets a learned Gaussian prior, class-conditional when labels are used.

Actnorm starts from the data: :meth:`Glow.data_init` runs one forward pass
in which every actnorm sets its bias and scale from the statistics of its
input, summed over all ranks, so every rank starts from the same weights.

Pixels are dequantised uniformly, ``y = (x + u) / 256 - 1/2`` with u ~ U[0, 1),
and the discrete likelihood is bounded by ``log p(y) - D log 256``, the
Glow paper's bits/dim.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from distgen import dist
from distgen.config.core import ConfigError
from distgen.config.models import GlowConfig
from distgen.families.base import DataInfo, Family, Phase, load_module, save_module
from distgen.families.capabilities import ExportsOnnx, Likelihood, OnnxGraph
from distgen.families.graphs import latent_docs, split_flat

LOG2PI = math.log(2 * math.pi)

# levels L, flow steps per level K, coupling network width; paper: the CIFAR-10 model (3.35 bits/dim)
PRESETS: dict[str, dict] = {
    "tiny": dict(levels=2, steps=2, hidden=16),
    "small": dict(levels=2, steps=8, hidden=128),
    "paper": dict(levels=3, steps=32, hidden=512),
}


def squeeze(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def unsqueeze(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    x = x.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c // 4, h * 2, w * 2)


def gaussian_logp(z: torch.Tensor, mean: torch.Tensor, logs: torch.Tensor) -> torch.Tensor:
    """log N(z; mean, exp(logs)^2) summed per sample."""
    return (-0.5 * (LOG2PI + 2 * logs + (z - mean) ** 2 * torch.exp(-2 * logs))).flatten(1).sum(1)


class ActNorm(nn.Module):
    """y = (x + bias) * exp(logs), per channel; bias and logs start from the first batch's statistics."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.initializing = False

    @torch.no_grad()
    def _init(self, x: torch.Tensor) -> None:
        # Sums over every rank's batch: the statistics of the whole global batch, the same on all ranks.
        c = x.shape[1]
        xd = x.detach().double().transpose(0, 1).reshape(c, -1)
        stats = torch.cat([xd.sum(1), (xd ** 2).sum(1), xd.new_full((1,), xd.shape[1])])
        if dist.initialized() and dist.world_size() > 1:
            dist.all_reduce_tensor_(stats)
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean ** 2).clamp(min=0)
        self.bias.copy_((-mean).view(1, c, 1, 1).to(self.bias.dtype))
        self.logs.copy_((-torch.log(var.sqrt() + 1e-6)).view(1, c, 1, 1).to(self.logs.dtype))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.initializing:
            self._init(x)
        return (x + self.bias) * torch.exp(self.logs), self.logs.sum() * x.shape[2] * x.shape[3]

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * torch.exp(-self.logs) - self.bias


class InvConv1x1(nn.Module):
    """An invertible 1x1 convolution W = P L (U + diag(sign * exp(log_s))), P fixed: log|det W| = sum(log_s)."""

    def __init__(self, channels: int):
        super().__init__()
        w = torch.linalg.qr(torch.randn(channels, channels))[0]  # a random rotation
        p, lower, upper = torch.linalg.lu(w)
        s = torch.diagonal(upper)
        self.register_buffer("p", p)
        self.register_buffer("sign_s", torch.sign(s))
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.lower = nn.Parameter(lower)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(s.abs()))

    def weight(self) -> torch.Tensor:
        eye = torch.eye(self.p.shape[0], device=self.p.device, dtype=self.lower.dtype)
        lower = self.lower * self.lower_mask + eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.p @ lower @ upper

    def forward(self, x):
        w = self.weight()
        return F.conv2d(x, w[:, :, None, None].to(x.dtype)), self.log_s.sum() * x.shape[2] * x.shape[3]

    frozen_inverse: Optional[torch.Tensor] = None  # set by the ONNX export, which has no matrix inverse

    def reverse(self, y):
        w_inv = self.frozen_inverse
        if w_inv is None:
            w_inv = torch.linalg.inv(self.weight().double())  # float64: the inverse is exact to float32
        return F.conv2d(y, w_inv.to(y.dtype)[:, :, None, None])


class ZeroConv(nn.Module):
    """A 3x3 convolution starting at zero, its output scaled by exp(3 * logs) (Glow's conv2d_zeros)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.logs = nn.Parameter(torch.zeros(1, cout, 1, 1))

    def forward(self, x):
        return self.conv(x) * torch.exp(self.logs * 3)


class ConvActNorm(nn.Module):
    """A convolution without bias, then actnorm (in place of the bias), then ReLU."""

    def __init__(self, cin: int, cout: int, k: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
        nn.init.normal_(self.conv.weight, std=0.05)
        self.norm = ActNorm(cout)

    def forward(self, x):
        return F.relu(self.norm(self.conv(x))[0])


class Coupling(nn.Module):
    """The second half of the channels moved by a function of the first: affine, y2 = (x2 + t) * s with
    s = sigmoid(h + 2) (Glow's stable scale), or additive, y2 = x2 + t."""

    def __init__(self, channels: int, hidden: int, affine: bool):
        super().__init__()
        self.affine = affine
        half = channels // 2
        self.net = nn.Sequential(ConvActNorm(half, hidden, 3), ConvActNorm(hidden, hidden, 1),
                                 ZeroConv(hidden, (channels - half) * (2 if affine else 1)))

    def _shift_log_scale(self, x1):
        h = self.net(x1)
        if not self.affine:
            return h, None
        # log sigmoid directly: log(sigmoid(.)) underflows to -inf for very negative inputs
        return h[:, 0::2], F.logsigmoid(h[:, 1::2] + 2.0)

    def forward(self, x):
        x1, x2 = x.chunk(2, 1)
        shift, log_scale = self._shift_log_scale(x1)
        if log_scale is None:
            return torch.cat([x1, x2 + shift], 1), x.new_zeros(())
        y2 = (x2 + shift) * torch.exp(log_scale)
        return torch.cat([x1, y2], 1), log_scale.flatten(1).sum(1)

    def reverse(self, y):
        y1, y2 = y.chunk(2, 1)
        shift, log_scale = self._shift_log_scale(y1)
        x2 = y2 - shift if log_scale is None else y2 * torch.exp(-log_scale) - shift
        return torch.cat([y1, x2], 1)


class FlowStep(nn.Module):
    def __init__(self, channels: int, hidden: int, affine: bool):
        super().__init__()
        self.norm = ActNorm(channels)
        self.mix = InvConv1x1(channels)
        self.coupling = Coupling(channels, hidden, affine)

    def forward(self, x):
        logdet = 0
        for layer in (self.norm, self.mix, self.coupling):
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def reverse(self, y):
        for layer in (self.coupling, self.mix, self.norm):
            y = layer.reverse(y)
        return y


class Glow(nn.Module):
    """log p(y) = net(y, labels) per sample; :meth:`encode` / :meth:`decode` map y <-> the latents."""

    def __init__(self, channels: int = 3, resolution: int = 32, levels: int = 3, steps: int = 32, hidden: int = 512,
                 affine: bool = True, num_classes: int = 0):
        super().__init__()
        if resolution % (2 ** levels):
            raise ValueError(f"resolution {resolution} does not halve {levels} times")
        self.num_classes = num_classes
        self.levels = nn.ModuleList()
        self.priors = nn.ModuleList()  # the split priors: the kept half -> mean and log-scale of the other
        self.z_shapes: list[tuple[int, int, int]] = []
        c, r = channels, resolution
        for i in range(levels):
            c, r = c * 4, r // 2
            self.levels.append(nn.ModuleList(FlowStep(c, hidden, affine) for _ in range(steps)))
            if i < levels - 1:
                self.priors.append(ZeroConv(c // 2, 2 * (c - c // 2)))
                self.z_shapes.append((c - c // 2, r, r))
                c = c // 2
        self.z_shapes.append((c, r, r))
        self.top = nn.Parameter(torch.zeros(1, 2 * c, 1, 1))  # the learned prior of the last level
        self.class_prior = nn.Embedding(num_classes, 2 * c) if num_classes else None
        if self.class_prior is not None:
            nn.init.zeros_(self.class_prior.weight)

    def _top_prior(self, n: int, labels):
        h = self.top.expand(n, -1, -1, -1)
        if self.class_prior is not None:
            if labels is None:
                raise ValueError("a class-conditional Glow needs labels")
            h = h + self.class_prior(labels)[:, :, None, None]
        mean, logs = h.chunk(2, 1)
        c, r, _ = self.z_shapes[-1]
        return mean.expand(-1, -1, r, r), logs.expand(-1, -1, r, r)

    def encode(self, y: torch.Tensor, labels: Optional[torch.Tensor] = None):
        """y -> (latents, one per level, last the top; log|det dz/dy|; log prior of the latents), per sample."""
        zs, logdet, logp = [], y.new_zeros(y.shape[0]), y.new_zeros(y.shape[0])
        h = y
        for i, steps in enumerate(self.levels):
            h = squeeze(h)
            for step in steps:
                h, ld = step(h)
                logdet = logdet + ld
            if i < len(self.levels) - 1:
                h, z = h[:, :h.shape[1] // 2], h[:, h.shape[1] // 2:]
                mean, logs = self.priors[i](h).chunk(2, 1)
                logp = logp + gaussian_logp(z, mean, logs)
                zs.append(z)
        mean, logs = self._top_prior(y.shape[0], labels)
        zs.append(h)
        return zs, logdet, logp + gaussian_logp(h, mean, logs)

    def forward(self, y: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        _, logdet, logp = self.encode(y, labels)
        return logp + logdet

    def decode(self, zs: Optional[list[torch.Tensor]] = None, labels: Optional[torch.Tensor] = None, *,
               eps: Optional[list[torch.Tensor]] = None, temperature: float = 1.0) -> torch.Tensor:
        """The latents -> y. With ``eps`` (standard normals shaped like the latents) instead of ``zs``,
        each latent is drawn from its prior as mean + temperature * scale * eps: sampling."""
        n = (zs or eps)[0].shape[0]

        def latent(i, mean, logs):
            return zs[i] if zs is not None else mean + temperature * torch.exp(logs) * eps[i]

        h = latent(-1, *self._top_prior(n, labels))
        for i in reversed(range(len(self.levels))):
            if i < len(self.levels) - 1:
                mean, logs = self.priors[i](h).chunk(2, 1)
                h = torch.cat([h, latent(i, mean, logs)], 1)
            for step in reversed(self.levels[i]):
                h = step.reverse(h)
            h = unsqueeze(h)
        return h

    @torch.no_grad()
    def data_init(self, y: torch.Tensor, labels: Optional[torch.Tensor] = None) -> None:
        """Every actnorm from the statistics of its input in one pass over ``y`` (summed over all ranks)."""
        norms = [m for m in self.modules() if isinstance(m, ActNorm)]
        for m in norms:
            m.initializing = True
        try:
            self.encode(y, labels)
        finally:
            for m in norms:
                m.initializing = False


def dequantize(x255: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Pixel values 0..255 and uniform noise in [0, 1) -> y in [-1/2, 1/2]."""
    return (x255 + u) / 256 - 0.5


# ---------------------------------------------------------------- the family

class GlowFamily(Family, Likelihood, ExportsOnnx):
    name = "glow"
    config_cls = GlowConfig
    likelihood = "bound"  # uniform dequantisation: E[log p(y)] - D log 256 <= log P(x)
    EXPORT = "glow"

    def __init__(self, cfg: GlowConfig, data: DataInfo):
        super().__init__(cfg, data)
        levels = cfg.levels or PRESETS[cfg.preset]["levels"]
        if data.resolution % (2 ** levels):
            raise ConfigError(f"model.levels: {levels} level(s) halve the image {levels} time(s), so data.resolution "
                              f"must be a multiple of {2 ** levels}, got {data.resolution}")
        if cfg.conditional and data.num_classes < 1:
            raise ConfigError("model.conditional needs labelled data (the training manifest lists no classes)")
        self.num_classes = data.num_classes if cfg.conditional else 0

    def net_kwargs(self) -> dict:
        kw = dict(PRESETS[self.cfg.preset])
        kw.update({k: getattr(self.cfg, k) for k in ("levels", "steps", "hidden") if getattr(self.cfg, k)})
        return dict(channels=self.data.channels, resolution=self.data.resolution, affine=self.cfg.coupling == "affine",
                    num_classes=self.num_classes, **kw)

    def build_networks(self):
        return {"glow": Glow(**self.net_kwargs())}

    def phases(self):
        return [Phase("nll", "glow")]

    def _labels(self, labels, device):
        if not self.num_classes:
            return None
        if labels is None:
            raise ValueError("a class-conditional model needs the labels of the images it scores")
        return labels.to(device)

    def _dequantized(self, images: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        # back onto the 256-value grid (a resize can leave values between)
        return dequantize(((images.float() + 1) * 127.5).round(), u)

    def data_init(self, nets, batch):
        x = batch["image"]
        u = torch.rand(x.shape, device=x.device)  # the global RNG, seeded alike on every rank
        nets["glow"].data_init(self._dequantized(x, u), self._labels(batch.get("label"), x.device))

    def loss(self, ctx, nets, batch, generator):
        x = batch["image"]
        u = torch.rand(x.shape, device=x.device, generator=generator)
        logp = nets["glow"](self._dequantized(x, u), self._labels(batch.get("label"), x.device))
        dims = x[0].numel()
        return -(logp - dims * math.log(256)) / (dims * math.log(2)), {}  # bits per dimension

    def log_likelihood(self, nets, images, labels, generators):
        u = torch.stack([torch.rand(images.shape[1:], generator=g, device=images.device) for g in generators])
        logp = nets["glow"](dequantize(images.float(), u), self._labels(labels, images.device))
        return logp.double() - images[0].numel() * math.log(256)

    sample_options = ("temperature",)

    @torch.no_grad()
    def sample(self, nets, generators, *, labels=None, temperature=None):
        net = nets["glow"]
        device = next(net.parameters()).device
        t = self.cfg.temperature if temperature is None else temperature
        self.validate_sample_options({"temperature": t})  # for callers of sample() itself
        n = len(generators)
        # Each image's latents from its own generator, level by level.
        eps = [torch.stack([torch.randn(shape, generator=g, device=device) for g in generators])
               for shape in net.z_shapes]
        if self.num_classes:
            labels = (labels if labels is not None else torch.arange(n) % self.num_classes).to(device)
        else:
            labels = None
        y = net.decode(labels=labels, eps=eps, temperature=t)
        x255 = torch.floor((y + 0.5) * 256).clamp(0, 255)  # the pixel whose dequantisation cell holds y
        return x255 / 127.5 - 1

    def export(self, nets, out_dir):
        save_module(out_dir, self.EXPORT, nets["glow"], {"class": "Glow", "kwargs": self.net_kwargs()})

    def load_export(self, out_dir):
        return {"glow": load_module(out_dir, self.EXPORT, lambda spec: Glow(**spec["kwargs"]))}

    def onnx_graphs(self, nets):
        shapes = [tuple(s) for s in nets["glow"].z_shapes]
        total = sum(math.prod(s) for s in shapes)
        r, c = self.data.resolution, self.data.channels
        inputs = {"eps": torch.randn(2, total), "temperature": torch.tensor(self.cfg.temperature)}
        docs = {"eps": latent_docs(shapes, "levels' latents"),
                "temperature": "scalar float32: each level's latent is mean + temperature * scale * eps",
                "image": f"[batch, {c}, {r}, {r}] float32 on the 256 values of [-1, 1]"}
        if self.num_classes:
            inputs["labels"] = torch.arange(2) % self.num_classes
            docs["labels"] = f"[batch] int64 class indices in [0, {self.num_classes})"
        return [OnnxGraph("reverse", _ReverseGraph(nets["glow"], shapes), inputs, ["image"], docs,
                          static=("temperature",))]

    def onnx_sampler(self, nets):
        return {"kind": "latent_noise", "graph": "reverse", "latent_shapes": [list(s) for s in nets["glow"].z_shapes],
                "temperature": self.cfg.temperature, "num_classes": self.num_classes}


class _ReverseGraph(nn.Module):
    """Glow's reverse pass z -> x from flat eps and a temperature, quantised as ``GlowFamily.sample`` does."""

    def __init__(self, glow, shapes):
        super().__init__()
        self.glow, self.shapes = glow, shapes
        for m in glow.modules():  # the 1x1 convolutions' inverses become constants of the graph
            if isinstance(m, InvConv1x1):
                with torch.no_grad():
                    m.frozen_inverse = torch.linalg.inv(m.weight().double())

    def forward(self, eps, temperature, labels=None):
        y = self.glow.decode(labels=labels, eps=split_flat(eps, self.shapes), temperature=temperature)
        return torch.floor((y + 0.5) * 256).clamp(0, 255) / 127.5 - 1

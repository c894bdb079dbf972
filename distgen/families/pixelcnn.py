"""PixelCNN++ (Salimans et al. 2017): an autoregressive model with an exact likelihood.

The network follows openai/pixel-cnn (without its weight normalisation and
its data-dependent initialisation; plain convolutions): two causal streams (down-shifted
convolutions see the rows above, down-right-shifted ones the pixels above and
to the left), gated residual blocks with concat-ELU and dropout, a U-shaped
pass over three resolutions with short-cuts from the first half to the second,
and a discretised logistic mixture over the 256 values of each pixel in which
a colour channel's mean depends linearly on the channels before it. Labels
(optional) enter every gated block as a learned bias.

The training loss is -log2 p(x) / dims (bits/dim); :func:`~distgen.families.likelihoods.logistic_mixture_log_prob` is the
exact log-likelihood that ``distgen eval --metrics bpd`` reports. Sampling
runs the network once per pixel, a batch at a time.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from distgen.config.core import ConfigError
from distgen.config.models import PixelCNNConfig
from distgen.families.base import DataInfo, Family, Phase, load_module, save_module
from distgen.families.capabilities import ExportsOnnx, Likelihood, OnnxGraph
from distgen.families.likelihoods import (logistic_mixture_log_prob, logistic_mixture_params,
                                         logistic_mixture_sample)
from distgen.families.progress import PixelProgress

# nr_resnet gated blocks per resolution, nr_filters channels, nr_mix logistics; paper: the CIFAR-10 model (2.92 bits/dim)
PRESETS: dict[str, dict] = {
    "tiny": dict(nr_resnet=1, nr_filters=16, nr_mix=3),
    "small": dict(nr_resnet=1, nr_filters=32, nr_mix=5),
    "paper": dict(nr_resnet=5, nr_filters=160, nr_mix=10),
}


# ---------------------------------------------------------------- causal convolutions

def concat_elu(x: torch.Tensor) -> torch.Tensor:
    return F.elu(torch.cat([x, -x], 1))


def down_shift(x: torch.Tensor) -> torch.Tensor:
    """Every row moves one down (a zero row on top): a pixel then sees only rows above it."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


def right_shift(x: torch.Tensor) -> torch.Tensor:
    return F.pad(x, (1, 0))[:, :, :, :-1]


class DownShiftedConv(nn.Conv2d):
    """A convolution over the rows above and the current row, centred horizontally."""

    def __init__(self, cin, cout, size=(2, 3), stride=1):
        super().__init__(cin, cout, size, stride=stride)
        self.pad = ((size[1] - 1) // 2, (size[1] - 1) // 2, size[0] - 1, 0)

    def forward(self, x):
        return super().forward(F.pad(x, self.pad))


class DownRightShiftedConv(nn.Conv2d):
    """A convolution over the rows above and the pixels to the left."""

    def __init__(self, cin, cout, size=(2, 2), stride=1):
        super().__init__(cin, cout, size, stride=stride)
        self.pad = (size[1] - 1, 0, size[0] - 1, 0)

    def forward(self, x):
        return super().forward(F.pad(x, self.pad))


class DownShiftedDeconv(nn.ConvTranspose2d):
    def __init__(self, cin, cout, size=(2, 3)):
        super().__init__(cin, cout, size, stride=2, output_padding=1)
        self.size = size

    def forward(self, x):
        y = super().forward(x)
        fh, fw = self.size
        return y[:, :, :y.shape[2] - fh + 1, (fw - 1) // 2:y.shape[3] - (fw - 1) // 2]


class DownRightShiftedDeconv(nn.ConvTranspose2d):
    def __init__(self, cin, cout, size=(2, 2)):
        super().__init__(cin, cout, size, stride=2, output_padding=1)
        self.size = size

    def forward(self, x):
        y = super().forward(x)
        fh, fw = self.size
        return y[:, :, :y.shape[2] - fh + 1, :y.shape[3] - fw + 1]


class GatedResnet(nn.Module):
    """x + a * sigmoid(b), where (a, b) = conv(dropout(concat_elu(conv(concat_elu(x)) + nin(concat_elu(skip)))))."""

    def __init__(self, nf: int, conv: type, skip_channels: int = 0, dropout: float = 0.5, num_classes: int = 0):
        super().__init__()
        self.conv1 = conv(2 * nf, nf)
        self.skip = nn.Conv2d(2 * skip_channels, nf, 1) if skip_channels else None
        self.drop = nn.Dropout(dropout)
        self.conv2 = conv(2 * nf, 2 * nf)
        self.cond = nn.Embedding(num_classes, 2 * nf) if num_classes else None
        if self.cond is not None:
            nn.init.normal_(self.cond.weight, std=0.05)  # the reference's scale: a small class bias at the start

    def forward(self, x, skip=None, labels=None):
        c = self.conv1(concat_elu(x))
        if self.skip is not None:
            c = c + self.skip(concat_elu(skip))
        c = self.conv2(self.drop(concat_elu(c)))
        if self.cond is not None:
            c = c + self.cond(labels)[:, :, None, None]
        a, b = c.chunk(2, 1)
        return x + a * torch.sigmoid(b)


class PixelCNNpp(nn.Module):
    """params = net(x, labels): mixture parameters at every pixel, from the pixels before it only."""

    def __init__(self, channels: int = 3, nr_resnet: int = 5, nr_filters: int = 160, nr_mix: int = 10,
                 dropout: float = 0.5, num_classes: int = 0):
        super().__init__()
        self.channels, self.nr_mix, self.num_classes = channels, nr_mix, num_classes
        nf, cin = nr_filters, channels + 1  # + a channel of ones: image and zero padding look different
        blk = lambda conv, skip: GatedResnet(nf, conv, skip, dropout, num_classes)  # noqa: E731
        self.u_init = DownShiftedConv(cin, nf, (2, 3))
        self.ul_init_up = DownShiftedConv(cin, nf, (1, 3))
        self.ul_init_left = DownRightShiftedConv(cin, nf, (2, 1))
        # the first half: nr_resnet blocks per resolution, downsampling twice
        self.up_u = nn.ModuleList(nn.ModuleList(blk(DownShiftedConv, 0) for _ in range(nr_resnet)) for _ in range(3))
        self.up_ul = nn.ModuleList(nn.ModuleList(blk(DownRightShiftedConv, nf) for _ in range(nr_resnet))
                                   for _ in range(3))
        self.down_u = nn.ModuleList(DownShiftedConv(nf, nf, (2, 3), stride=2) for _ in range(2))
        self.down_ul = nn.ModuleList(DownRightShiftedConv(nf, nf, (2, 2), stride=2) for _ in range(2))
        # the second half: nr_resnet, then nr_resnet + 1 blocks, each taking a short-cut from the first half
        sizes = [nr_resnet, nr_resnet + 1, nr_resnet + 1]
        self.dn_u = nn.ModuleList(nn.ModuleList(blk(DownShiftedConv, nf) for _ in range(n)) for n in sizes)
        self.dn_ul = nn.ModuleList(nn.ModuleList(blk(DownRightShiftedConv, 2 * nf) for _ in range(n)) for n in sizes)
        self.up_sample_u = nn.ModuleList(DownShiftedDeconv(nf, nf) for _ in range(2))
        self.up_sample_ul = nn.ModuleList(DownRightShiftedDeconv(nf, nf) for _ in range(2))
        self.out = nn.Conv2d(nf, logistic_mixture_params(channels, nr_mix), 1)

    def forward(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.num_classes and labels is None:
            raise ValueError("a class-conditional PixelCNN++ needs labels")
        labels = labels if self.num_classes else None
        xp = torch.cat([x, torch.ones_like(x[:, :1])], 1)
        us = [down_shift(self.u_init(xp))]
        uls = [down_shift(self.ul_init_up(xp)) + right_shift(self.ul_init_left(xp))]
        for level in range(3):
            for bu, bul in zip(self.up_u[level], self.up_ul[level]):
                us.append(bu(us[-1], labels=labels))
                uls.append(bul(uls[-1], us[-1], labels=labels))
            if level < 2:
                us.append(self.down_u[level](us[-1]))
                uls.append(self.down_ul[level](uls[-1]))
        u, ul = us.pop(), uls.pop()
        for level in range(3):
            for bu, bul in zip(self.dn_u[level], self.dn_ul[level]):
                u = bu(u, us.pop(), labels=labels)
                ul = bul(ul, torch.cat([u, uls.pop()], 1), labels=labels)
            if level < 2:
                u, ul = self.up_sample_u[level](u), self.up_sample_ul[level](ul)
        return self.out(F.elu(ul))


# ---------------------------------------------------------------- the family


class PixelCNN(Family, Likelihood, ExportsOnnx):
    name = "pixelcnn"
    config_cls = PixelCNNConfig
    likelihood = "exact"
    EXPORT = "pixelcnn"

    def __init__(self, cfg: PixelCNNConfig, data: DataInfo):
        super().__init__(cfg, data)
        if data.resolution % 4:
            raise ConfigError(f"data.resolution: PixelCNN++ halves the image twice, so it must be a multiple "
                              f"of 4, got {data.resolution}")
        if cfg.conditional and data.num_classes < 1:
            raise ConfigError("model.conditional needs labelled data (the training manifest lists no classes)")
        self.num_classes = data.num_classes if cfg.conditional else 0

    def net_kwargs(self) -> dict:
        kw = dict(PRESETS[self.cfg.preset])
        kw.update({k: getattr(self.cfg, k) for k in ("nr_resnet", "nr_filters", "nr_mix") if getattr(self.cfg, k)})
        return dict(channels=self.data.channels, dropout=self.cfg.dropout, num_classes=self.num_classes, **kw)

    def build_networks(self):
        return {"pixelcnn": PixelCNNpp(**self.net_kwargs())}

    def phases(self):
        return [Phase("nll", "pixelcnn")]

    def _labels(self, labels):
        if not self.num_classes:
            return None
        if labels is None:
            raise ValueError("a class-conditional model needs the labels of the images it scores")
        return labels

    def loss(self, ctx, nets, batch, generator):
        # back onto the 256-value grid (a resize can leave values between)
        x = ((batch["image"] + 1) * 127.5).round() / 127.5 - 1
        labels = self._labels(batch.get("label"))
        params = nets["pixelcnn"](x, labels.to(x.device) if labels is not None else None)
        logp = logistic_mixture_log_prob(x, params, nets.raw["pixelcnn"].nr_mix).sum(dim=(1, 2))
        return -logp / (x[0].numel() * math.log(2)), {}  # bits per dimension

    def log_likelihood(self, nets, images, labels, generators):
        net = nets["pixelcnn"]
        x = images.float() / 127.5 - 1
        params = net(x, self._labels(labels))
        return logistic_mixture_log_prob(x, params, net.nr_mix).double().sum(dim=(1, 2))

    @torch.no_grad()
    def sample(self, nets, generators, *, labels=None):
        """Pixel after pixel in raster order, every channel of a pixel from one network pass."""
        net = nets["pixelcnn"]
        device = next(net.parameters()).device
        n, c, r = len(generators), self.data.channels, self.data.resolution
        if self.num_classes:
            labels = (labels if labels is not None else torch.arange(n) % self.num_classes).to(device)
        else:
            labels = None
        x = torch.zeros(n, c, r, r, device=device)
        # Rows below i cannot change row i's output: a pass needs the rows up to i only, rounded up
        # to a multiple of 4 for the two halvings.
        rows = [min(r, 4 * math.ceil((i + 1) / 4)) for i in range(r)]
        progress = PixelProgress(f"PixelCNN++ sampling {n} image(s)", r * r)
        for i in range(r):
            for j in range(r):
                params = net(x[:, :, :rows[i]], labels)[:, :, i, j]
                x[:, :, i, j] = logistic_mixture_sample(params, net.nr_mix, c, generators)
                progress.update()
        progress.close()
        return x

    def export(self, nets, out_dir):
        save_module(out_dir, self.EXPORT, nets["pixelcnn"], {"class": "PixelCNNpp", "kwargs": self.net_kwargs()})

    def load_export(self, out_dir):
        return {"pixelcnn": load_module(out_dir, self.EXPORT, lambda spec: PixelCNNpp(**spec["kwargs"]))}

    def onnx_graphs(self, nets):
        return [autoregressive_graph(nets["pixelcnn"], self.data, self.num_classes)]

    def onnx_sampler(self, nets):
        return {"kind": "autoregressive", "graph": "network", "nr_mix": nets["pixelcnn"].nr_mix,
                "channels": self.data.channels, "resolution": self.data.resolution, "num_classes": self.num_classes}


class _NetworkGraph(nn.Module):
    """One pass of an autoregressive network: images (and classes) -> the logistic mixture's parameters."""

    def __init__(self, net: nn.Module, conditional: bool, takes_labels: bool):
        super().__init__()
        self.net, self.conditional, self.takes_labels = net, conditional, takes_labels

    def forward(self, image, labels=None):
        if not self.takes_labels:
            return self.net(image).float()
        return self.net(image, labels if self.conditional else None).float()


def autoregressive_graph(net: nn.Module, data: DataInfo, num_classes: int, takes_labels: bool = True):
    """The ONNX graph of a network whose output at pixel i depends on the pixels before i only (PixelCNN++,
    PixelRNN): ``sample_onnx.py`` fills the image pixel by pixel, one call per pixel."""
    c, r = data.channels, data.resolution
    inputs = {"image": torch.rand(2, c, r, r) * 2 - 1}
    docs = {"image": f"[batch, {c}, {r}, {r}] float32 on the 256 values of [-1, 1]; the output at pixel i "
                     f"depends on the pixels before i (raster order) only",
            "params": f"[batch, {logistic_mixture_params(c, net.nr_mix)}, {r}, {r}] float32 per pixel: the "
                      f"discretised logistic mixture's {net.nr_mix} logits, then per component the channels' "
                      f"means, log-scales and channel coefficients (PixelCNN++'s layout)"}
    if num_classes:
        inputs["labels"] = torch.arange(2) % num_classes
        docs["labels"] = f"[batch] int64 class indices in [0, {num_classes})"
    return OnnxGraph("network", _NetworkGraph(net, num_classes > 0, takes_labels), inputs, ["params"], docs)

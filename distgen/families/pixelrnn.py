"""PixelRNN (van den Oord, Kalchbrenner and Kavukcuoglu 2016, "Pixel Recurrent Neural Networks").

Two architectures of the paper, ``model.arch``:

- ``row_lstm``: an LSTM runs over the image row by row, top to bottom. Its input-to-state part is a
  masked 1x3 convolution along the current row (the pixel's own features and its left neighbour's), its
  state-to-state part a 1x3 convolution over the row above's hidden state; the receptive field is a
  triangle above the pixel (it misses part of the context, as the paper says).
- ``diagonal_bilstm``: the feature map is skewed (row r moved r columns right) so that the diagonals become
  columns; a 1x1 input-to-state convolution and a 2x1 column-wise state-to-state convolution make each
  hidden state depend on the pixel to its left and the one above. A second LSTM does the same right to
  left; its output is moved down one row before the two are added, so that no pixel of the current row
  to the right leaks in. The receptive field is the whole context (see DiagonalBiLSTM for the one
  addition that makes it so).

Both start with a 7x7 convolution under mask A (the pixel itself excluded), keep residual connections
around every LSTM layer (2h features in, an LSTM of h units, a 1x1 convolution back to 2h), and end with
two 1x1 ReLU layers. Deviation from the paper: the output is PixelCNN++'s discretised logistic mixture
(:mod:`distgen.families.likelihoods`) instead of the 256-way softmax. The mixture models a pixel's R, G
and B jointly (later channels' means depend on earlier values), so the network's output at a pixel must
not see any channel of that pixel: mask A excludes the whole centre and the recurrent layers keep it so.
Bits/dim stay exact.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from distgen.config.models import PixelRNNConfig
from distgen.families.base import Family, Phase, load_module, save_module
from distgen.families.capabilities import ExportsOnnx, Likelihood
from distgen.families.likelihoods import (logistic_mixture_log_prob, logistic_mixture_params,
                                         logistic_mixture_sample)
from distgen.families.progress import PixelProgress

# layers LSTM layers of hidden units, nr_mix logistics; paper: the CIFAR-10 models (12 layers of 128 units;
# the paper's softmax there, a 10-component mixture here as in PixelCNN++)
PRESETS: dict[str, dict] = {
    "tiny": dict(layers=2, hidden=8, nr_mix=2),
    "small": dict(layers=3, hidden=24, nr_mix=5),
    "paper": dict(layers=12, hidden=128, nr_mix=10),
}


# ---------------------------------------------------------------- masked input convolution

class MaskedConv2d(nn.Conv2d):
    """A k x k convolution that sees the rows above and the pixels to the left only (the paper's mask A,
    with the centre excluded for every channel: the mixture head handles the channel order)."""

    def __init__(self, cin: int, cout: int, k: int = 7):
        super().__init__(cin, cout, k, padding=k // 2)
        mask = torch.ones_like(self.weight)
        mask[:, :, k // 2, k // 2:] = 0  # the centre and right of it
        mask[:, :, k // 2 + 1:] = 0  # the rows below
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x):
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


def _lstm(gates: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM update from pre-activations [B, 4h, ...] (input, forget, output gates, candidate)."""
    i, f, o, g = gates.chunk(4, 1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


# ---------------------------------------------------------------- Row LSTM

class RowLSTM(nn.Module):
    """Row LSTM layer (paper section 3.1): [B, 2h, H, W] -> hidden states [B, h, H, W], row by row."""

    def __init__(self, cin: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        # input-to-state: the 1x3 kernel under mask B is the pixel and its left neighbour (the features at the
        # pixel already exclude it; the one to its right would see the pixel itself)
        self.i2s = nn.Conv2d(cin, 4 * hidden, (1, 2))
        # state-to-state: 1x3 over the previous row's hidden states
        self.s2s = nn.Conv1d(hidden, 4 * hidden, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor, image: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, _, rows, w = x.shape
        inp = self.i2s(F.pad(x, (1, 0)))  # [B, 4h, H, W], for all rows at once
        h = c = x.new_zeros(b, self.hidden, w)
        out = []
        for r in range(rows):
            h, c = _lstm(inp[:, :, r] + self.s2s(h), c)
            out.append(h)
        return torch.stack(out, 2)


# ---------------------------------------------------------------- Diagonal BiLSTM

def skew(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, H, W + H - 1], row r moved r columns right: a column is then a diagonal."""
    rows = x.shape[2]
    return torch.stack([F.pad(x[:, :, r], (r, rows - 1 - r)) for r in range(rows)], 2)


def unskew(x: torch.Tensor, width: int) -> torch.Tensor:
    return torch.stack([x[:, :, r, r:r + width] for r in range(x.shape[2])], 2)


class DiagonalLSTM(nn.Module):
    """One direction of the Diagonal BiLSTM (paper section 3.2), left to right over the skewed map."""

    def __init__(self, cin: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.i2s = nn.Conv2d(cin, 4 * hidden, 1)
        # column-wise 2x1 kernel: a state sees, in the previous column, its own row (the pixel to its left
        # once unskewed) and the row above (the pixel above)
        self.s2s = nn.Conv1d(hidden, 4 * hidden, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, rows, w = x.shape
        inp = self.i2s(skew(x))  # [B, 4h, H, W + H - 1]
        h = c = x.new_zeros(b, self.hidden, rows)
        out = []
        for j in range(inp.shape[3]):
            h, c = _lstm(inp[:, :, :, j] + self.s2s(F.pad(h, (1, 0))), c)
            out.append(h)
        return unskew(torch.stack(out, 3), w)


class DiagonalBiLSTM(nn.Module):
    """Both directions; the right-to-left one, run on the mirrored map, is moved down a row (it sees the
    pixels to the right, which are in the future on the current row).

    Deviation: the right-to-left direction also reads the image itself. In the paper's arrangement its
    states on row r-1 are built from features that exclude their own pixel, and nothing else carries the
    last pixel of row r-1 leftwards, so the first pixels of row r never see it; with the image as input
    (causal, since the output moves down a row) the field is the whole context, as the paper intends.
    """

    def __init__(self, cin: int, hidden: int, channels: int):
        super().__init__()
        self.left, self.right = DiagonalLSTM(cin, hidden), DiagonalLSTM(cin + channels, hidden)

    def forward(self, h: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        right = self.right(torch.cat([h, image], 1).flip(3)).flip(3)
        return self.left(h) + F.pad(right, (0, 0, 1, 0))[:, :, :-1]


# ---------------------------------------------------------------- the network

class PixelRNNNet(nn.Module):
    """images [B, C, H, W] on [-1, 1] -> mixture parameters at every pixel, from the pixels before it only."""

    def __init__(self, channels: int = 3, arch: str = "diagonal_bilstm", layers: int = 12, hidden: int = 128,
                 nr_mix: int = 10):
        super().__init__()
        self.channels, self.nr_mix, self.arch = channels, nr_mix, arch
        # + a channel of ones: image and zero padding look different at the borders
        self.inp = MaskedConv2d(channels + 1, 2 * hidden, 7)
        if arch == "row_lstm":
            self.lstms = nn.ModuleList(RowLSTM(2 * hidden, hidden) for _ in range(layers))
        else:
            self.lstms = nn.ModuleList(DiagonalBiLSTM(2 * hidden, hidden, channels + 1) for _ in range(layers))
        self.ups = nn.ModuleList(nn.Conv2d(hidden, 2 * hidden, 1) for _ in range(layers))  # residual branch
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(2 * hidden, 2 * hidden, 1), nn.ReLU(),
                                  nn.Conv2d(2 * hidden, logistic_mixture_params(channels, nr_mix), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image = torch.cat([x, torch.ones_like(x[:, :1])], 1)
        h = self.inp(image)
        for lstm, up in zip(self.lstms, self.ups):
            h = h + up(lstm(h, image))  # residual connection (paper figure 5)
        return self.head(h)


# ---------------------------------------------------------------- the family

class PixelRNN(Family, Likelihood, ExportsOnnx):
    name = "pixelrnn"
    config_cls = PixelRNNConfig
    likelihood = "exact"
    sample_options = ("temperature",)
    EXPORT = "pixelrnn"

    def net_kwargs(self) -> dict:
        kw = dict(PRESETS[self.cfg.preset])
        kw.update({k: getattr(self.cfg, k) for k in ("layers", "hidden", "nr_mix") if getattr(self.cfg, k)})
        return dict(channels=self.data.channels, arch=self.cfg.arch, **kw)

    def build_networks(self):
        return {"pixelrnn": PixelRNNNet(**self.net_kwargs())}

    def phases(self):
        return [Phase("nll", "pixelrnn")]

    # engine_problem: none. The loss is one forward and one backward; ZeRO-3 gathers a layer's weights for
    # its forward and keeps them while the recurrence calls it again (tests/test_deepspeed.py runs 1, 2 and 3).
    # compile_problem: none (no double backward); the unrolled recurrence compiles slowly for large images.

    def loss(self, ctx, nets, batch, generator):
        # back onto the 256-value grid (a resize can leave values between)
        x = ((batch["image"] + 1) * 127.5).round() / 127.5 - 1
        params = nets["pixelrnn"](x)
        logp = logistic_mixture_log_prob(x, params, nets.raw["pixelrnn"].nr_mix).sum(dim=(1, 2))
        return -logp / (x[0].numel() * math.log(2)), {}  # bits per dimension

    def log_likelihood(self, nets, images, labels, generators):
        net = nets["pixelrnn"]
        x = images.float() / 127.5 - 1
        return logistic_mixture_log_prob(x, net(x), net.nr_mix).double().sum(dim=(1, 2))

    @torch.no_grad()
    def sample(self, nets, generators, *, labels=None, temperature: Optional[float] = None):
        """Pixel after pixel in raster order, every channel of a pixel from one network pass over the rows
        up to it (rows below cannot change it). Each image's draws come from its own generator."""
        t = self.cfg.temperature if temperature is None else temperature
        self.validate_sample_options({"temperature": t})
        net = nets["pixelrnn"]
        device = next(net.parameters()).device
        n, c, r = len(generators), self.data.channels, self.data.resolution
        x = torch.zeros(n, c, r, r, device=device)
        progress = PixelProgress(f"PixelRNN sampling {n} image(s)", r * r)
        for i in range(r):
            for j in range(r):
                params = net(x[:, :, :i + 1])[:, :, i, j]
                x[:, :, i, j] = logistic_mixture_sample(params, net.nr_mix, c, generators, temperature=t)
                progress.update()
        progress.close()
        return x

    def export(self, nets, out_dir):
        save_module(out_dir, self.EXPORT, nets["pixelrnn"], {"class": "PixelRNNNet", "kwargs": self.net_kwargs()})

    def load_export(self, out_dir):
        return {"pixelrnn": load_module(out_dir, self.EXPORT, lambda spec: PixelRNNNet(**spec["kwargs"]))}

    def onnx_graphs(self, nets):
        from distgen.families.pixelcnn import autoregressive_graph

        return [autoregressive_graph(nets["pixelrnn"], self.data, 0, takes_labels=False)]

    def onnx_sampler(self, nets):
        return {"kind": "autoregressive", "graph": "network", "nr_mix": nets["pixelrnn"].nr_mix,
                "channels": self.data.channels, "resolution": self.data.resolution, "num_classes": 0,
                "temperature": self.cfg.temperature}

"""EDM2's magnitude-preserving U-Net (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", config G), written for distgen from the paper.

Every layer keeps the expected magnitude (RMS) of unit-magnitude inputs at 1, so activations and weights cannot
drift during training:

- **Forced weight normalisation** (:class:`MPConv`): every forward divides each output channel's weight by its
  norm (the effective weight has unit norm per output channel, so unit-variance iid inputs give unit-variance
  outputs), and the *stored* weight is kept at unit RMS per output channel (norm sqrt(fan_in)): an optimizer
  step then changes a weight by a fraction of its size that does not depend on the fan-in, so the paper's
  learning rates apply, and the weights stay on the sphere (no weight decay needed, the effective learning rate
  does not decay as norms grow). The paper's code renormalises the stored weight in place at the start of each
  training-mode forward; here it starts normalised and the training engine renormalises it after every
  optimizer step (:meth:`MPConv.parameter_projections`, :func:`distgen.engines.projections`): the same weights
  reach every forward, and under DeepSpeed the optimizer's own fp32 copy is renormalised too, which a write
  into the module's weight inside forward cannot reach (ZeRO's next step would overwrite it).
- **MP-SiLU** (silu(x) / 0.596), **MP-Sum** (lerp(a, b, t) / sqrt((1-t)^2 + t^2)), **MP-Cat** (each part scaled so
  that the concatenation has unit magnitude and part b has weight t), **MP-Fourier** noise embedding
  (sqrt(2) cos(2 pi (f x + phi)) with frozen random f, phi).
- No biases and no normalisation layers: a constant-one input channel stands in for the bias, encoder blocks
  pixel-normalise their input, attention is cosine attention (q, k, v pixel-normalised per head), and the
  output has a learned gain initialised to 0 (the network starts by predicting 0).
- Class labels enter as a one-hot vector (times sqrt(num_classes), unit magnitude) through an MP linear layer,
  MP-summed with the noise embedding; the null class is the zero vector.

Presets: ``tiny`` (tests), ``small`` (Fashion-MNIST 28/32 px) and the paper's ImageNet-512 sizes ``xs`` ... ``xxl``
for 64x64x4 latents (model channels 128/192/256/320/384/448, multipliers [1, 2, 3, 4], 3 blocks per resolution,
attention at 16x16 and 8x8, 64 channels per head, dropout 0 for xs and s and 0.1 above, as in EDM2's released
training presets).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from distgen.config.backbones import EDM2_PRESETS
from distgen.families.backbones.common import check_input, conditioning_labels, jsonable
from distgen.families.base import learned_scalar
from distgen.families.checkpointing import Checkpointable

# sqrt(E[silu(x)^2]) for x ~ N(0, 1) is 0.5964: dividing by it gives silu unit expected magnitude
SILU_GAIN = 0.596


def normalize(x: torch.Tensor, dim=None, eps: float = 1e-4) -> torch.Tensor:
    """``x`` divided by its RMS over ``dim`` (default: every dimension but the first), plus ``eps``."""
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    # the RMS is the norm / sqrt(the reduced size): counted from the reduced dimensions (never the batch), so an
    # ONNX export with a dynamic batch sees a constant, not a symbolic square root
    reduced = math.prod(x.shape[d] for d in ([dim] if isinstance(dim, int) else dim))
    norm = torch.add(eps, norm, alpha=1 / math.sqrt(reduced))
    return x / norm.to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x) / SILU_GAIN


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """(1 - t) a + t b, rescaled to unit magnitude for independent unit-magnitude a and b."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """a and b concatenated along ``dim``, b weighted by t and a by 1 - t, the whole of unit magnitude."""
    na, nb = a.shape[dim], b.shape[dim]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (c / math.sqrt(na) * (1 - t)), b * (c / math.sqrt(nb) * t)], dim=dim)


class MPFourier(nn.Module):
    """Fourier features of a scalar: sqrt(2) cos(2 pi (f x + phi)), f ~ N(0, bandwidth^2) and phi ~ U[0, 1) fixed
    at construction (stored buffers, so a loaded network embeds the noise level as the saved one did)."""

    def __init__(self, num_channels: int, bandwidth: float = 1.0):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.to(torch.float32)[:, None] * self.freqs.to(torch.float32)[None] + self.phases.to(torch.float32)
        return (torch.cos(y) * math.sqrt(2)).to(x.dtype if x.is_floating_point() else torch.float32)


class MPConv(nn.Module):
    """A bias-free convolution (``kernel`` (k, k)) or linear layer (``kernel`` ()) with forced weight normalisation."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int]):
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(normalize(torch.randn(out_channels, in_channels, *kernel)))  # on the sphere

    def parameter_projections(self) -> dict:
        """What the training engine applies to the stored weight after every optimizer step (see
        :func:`distgen.engines.projections`): unit RMS per output channel, so the optimizer steps on the sphere."""
        return {"weight": normalize}

    def unit_weight(self, gain=1.0) -> torch.Tensor:
        """The weight used: each output channel's row of unit norm (times ``gain``), whatever the stored scale."""
        w = normalize(self.weight.to(torch.float32))
        return w * (gain / math.sqrt(w[0].numel()))

    def forward(self, x: torch.Tensor, gain=1.0) -> torch.Tensor:
        w = self.unit_weight(gain).to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


class Block(nn.Module):
    """An encoder or decoder residual block: [resample] -> (encoder: [1x1 skip conv], pixel norm) -> two 3x3 MP
    convolutions with the embedding as a multiplicative scale -> MP-Sum with the skip -> [cosine attention]."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, *, flavor: str = "enc",
                 resample: str = "keep", attention: bool = False, channels_per_head: int = 64,
                 dropout: float = 0.0, res_balance: float = 0.3, attn_balance: float = 0.3, clip_act: float = 256):
        super().__init__()
        self.out_channels, self.flavor, self.resample = out_channels, flavor, resample
        self.num_heads = out_channels // channels_per_head if attention else 0
        if attention and not self.num_heads:
            raise ValueError(f"attention in a block of {out_channels} channels needs channels_per_head <= "
                             f"{out_channels}, got {channels_per_head}")
        self.dropout, self.res_balance, self.attn_balance, self.clip_act = dropout, res_balance, attn_balance, clip_act
        self.emb_gain = learned_scalar(0.0)
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, [3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, [])
        self.conv_res1 = MPConv(out_channels, out_channels, [3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, [1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, [1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, [1, 1]) if self.num_heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            x = F.avg_pool2d(x, 2)
        elif self.resample == "up":
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm: each pixel's channel vector at unit RMS
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1  # per-channel scale, 1 at init (emb_gain = 0)
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.training and self.dropout:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)
        if self.num_heads:
            b, ch, h, w = x.shape
            qkv = self.attn_qkv(x).reshape(b, self.num_heads, -1, 3, h * w)
            q, k, v = normalize(qkv, dim=2).unbind(3)  # cosine attention: unit RMS per head and position
            att = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(q.shape[2])).softmax(dim=3)
            y = torch.einsum("nhqk,nhck->nhcq", att, v)
            x = mp_sum(x, self.attn_proj(y.reshape(b, ch, h, w)), t=self.attn_balance)
        if self.clip_act is not None:
            x = x.clip(-self.clip_act, self.clip_act)
        return x


PRESETS: dict[str, dict] = EDM2_PRESETS  # distgen.config.backbones: the one home of the presets


class EDM2UNet(nn.Module, Checkpointable):
    """EDM2's U-Net: ``net(x, noise_cond, class_labels)`` with ``noise_cond`` EDM's c_noise = ln(sigma) / 4 (the
    preconditioning c_in, c_skip, c_out belongs to the formulation, outside the backbone)."""

    name = "edm2"
    PRESETS = PRESETS

    def __init__(self, channels: int, resolution: int, num_classes: int = 0, *, model_channels: int = 192,
                 channel_mult: Sequence[int] = (1, 2, 3, 4), num_blocks: int = 3,
                 attn_resolutions: Sequence[int] = (16, 8), channels_per_head: int = 64, dropout: float = 0.0,
                 res_balance: float = 0.3, attn_balance: float = 0.3, label_balance: float = 0.5,
                 concat_balance: float = 0.5, clip_act: Optional[float] = 256):
        super().__init__()
        levels = len(channel_mult)
        if resolution % 2 ** (levels - 1):
            raise ValueError(f"edm2: resolution {resolution} must be divisible by 2^{levels - 1} "
                             f"({levels} levels of channel_mult)")
        self.channels, self.resolution, self.num_classes = channels, resolution, num_classes
        self.config = jsonable(dict(
            channels=channels, resolution=resolution, num_classes=num_classes, model_channels=model_channels,
            channel_mult=channel_mult, num_blocks=num_blocks, attn_resolutions=attn_resolutions,
            channels_per_head=channels_per_head, dropout=dropout, res_balance=res_balance,
            attn_balance=attn_balance, label_balance=label_balance, concat_balance=concat_balance, clip_act=clip_act))
        self.label_balance, self.concat_balance = label_balance, concat_balance
        cblock = [model_channels * m for m in channel_mult]
        cnoise, cemb = cblock[0], max(cblock)
        kw = dict(channels_per_head=channels_per_head, dropout=dropout, res_balance=res_balance,
                  attn_balance=attn_balance, clip_act=clip_act)
        self.out_gain = learned_scalar(0.0)
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, [])
        self.emb_label = MPConv(num_classes, cemb, []) if num_classes else None

        self.enc = nn.ModuleDict()
        cout = channels + 1  # the constant-one channel: what a bias would give
        for level, width in enumerate(cblock):
            res = resolution >> level
            if level == 0:
                cin, cout = cout, width
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, [3, 3])
            else:
                self.enc[f"{res}x{res}_down"] = Block(cout, cout, cemb, flavor="enc", resample="down", **kw)
            for i in range(num_blocks):
                cin, cout = cout, width
                self.enc[f"{res}x{res}_block{i}"] = Block(cin, cout, cemb, flavor="enc",
                                                          attention=res in attn_resolutions, **kw)

        self.dec = nn.ModuleDict()
        skips = [m.out_channels for m in self.enc.values()]
        for level, width in reversed(list(enumerate(cblock))):
            res = resolution >> level
            if level == levels - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cout, cout, cemb, flavor="dec", attention=True, **kw)
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, cemb, flavor="dec", **kw)
            else:
                self.dec[f"{res}x{res}_up"] = Block(cout, cout, cemb, flavor="dec", resample="up", **kw)
            for i in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), width
                self.dec[f"{res}x{res}_block{i}"] = Block(cin, cout, cemb, flavor="dec",
                                                          attention=res in attn_resolutions, **kw)
        self.conv_out = MPConv(cout, channels, [3, 3])

    def checkpoint_blocks(self) -> list[nn.Module]:
        """The encoder's and decoder's residual blocks (train.activation_checkpointing); not the first conv."""
        return [b for b in [*self.enc.values(), *self.dec.values()] if isinstance(b, Block)]

    def embedding(self, noise_cond: torch.Tensor, class_labels: Optional[torch.Tensor]) -> torch.Tensor:
        emb = self.emb_noise(self.emb_fourier(noise_cond))
        if self.emb_label is not None:
            # one-hot of unit magnitude; the null class (index num_classes) is the zero vector
            onehot = F.one_hot(class_labels, self.num_classes + 1)[:, :self.num_classes].to(emb.dtype)
            emb = mp_sum(emb, self.emb_label(onehot * math.sqrt(self.num_classes)), t=self.label_balance)
        return mp_silu(emb)

    def forward(self, x: torch.Tensor, noise_cond: torch.Tensor, class_labels: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        check_input(x, self.channels, self.resolution)
        labels = conditioning_labels(class_labels, self.num_classes, x)
        emb = self.embedding(noise_cond.reshape(-1).expand(x.shape[0]).to(x.dtype), labels)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if name.endswith("_conv") else block(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if "_block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        return self.conv_out(x, gain=self.out_gain)

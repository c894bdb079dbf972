"""Progressive GAN (Karras et al. 2018, "Progressive Growing of GANs for Improved Quality, Stability, and
Variation"): the paper's generator and discriminator (G_paper / D_paper of tkarras/progressive_growing_of_gans).

Both networks are built at the full resolution from the start, so that optimizers and engines see one fixed
parameter set, and run only the blocks of the current resolution ``res``. While a new block fades in, its
output is blended with the previous resolution's by ``alpha`` (0: the previous resolution alone, upsampled;
1: the new block alone). The growth schedule (``res``, ``alpha`` as a function of the images seen, :func:`growth`)
is run by the ProGAN arch of the GAN family (:class:`distgen.families.gan.archs.ProGAN`) from the step context's
count; the generator keeps the state it was last run at in its ``growth`` buffer, so that its EMA copy and an
export sample at the resolution they were trained to.

Blocks that are not run take part in the graph through a zero-weighted term: DDP (without unused-parameter
search) then finds a gradient, zero, for every parameter, and Adam leaves a parameter with zero gradients from
a zero start unchanged, so a resumed run and a straight one agree.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from distgen.families.checkpointing import Checkpointable

PRESETS: dict[str, dict] = {
    # Fast CPU tests: 16 feature maps at every resolution (nf = min(64 / 2^stage, 16)).
    "tiny": dict(z_dim=16, fmap_base=64, fmap_max=16),
    # A CPU demo (Fashion-MNIST recipe): 128 maps at 4x4, 64 at 8x8, 32 at 16x16, 16 at 32x32 (0.56M in G).
    "small": dict(z_dim=128, fmap_base=256, fmap_max=128),
    # The paper's networks (Table 2): 512-d latents, 512 maps up to 32x32, halving from 64x64 on.
    "paper": dict(z_dim=512, fmap_base=8192, fmap_max=512),
}


def nf(stage: int, fmap_base: int, fmap_max: int) -> int:
    """Feature maps at ``stage`` (resolution 2^(stage+1)), as networks.py: fmap_base / 2^stage, capped."""
    return max(min(int(fmap_base / 2.0 ** stage), fmap_max), 1)


def growth(nimg: int, resolution: int, stable_kimg: float, fade_kimg: float) -> tuple[int, float]:
    """(current resolution, fade-in alpha) after ``nimg`` training images: ``stable_kimg`` at 4x4, then for each
    doubling ``fade_kimg`` fading the new block in and ``stable_kimg`` at the new resolution (train.py's
    TrainingSchedule, in images). A pure function of the images seen, so a resume restores it exactly."""
    levels = int(math.log2(resolution)) - 2
    kimg, dur = nimg / 1000, stable_kimg + fade_kimg
    if dur <= 0:
        return resolution, 1.0
    phase = int(kimg // dur)
    lod = levels - phase - (max(kimg - phase * dur - stable_kimg, 0.0) / fade_kimg if fade_kimg > 0 else 0.0)
    if lod <= 0:
        return resolution, 1.0
    base = math.floor(lod)
    return 2 ** (levels - base + 2), 1.0 - (lod - base)


def box_down(x: torch.Tensor, res: int) -> torch.Tensor:
    """``x`` box-filtered (averaged over squares) down to ``res`` x ``res`` (the paper's downscale2d)."""
    f = x.shape[-1] // res
    return F.avg_pool2d(x, f) if f > 1 else x


def nearest_up(x: torch.Tensor, res: int) -> torch.Tensor:
    """``x`` repeated up to ``res`` x ``res`` (the paper's upscale2d)."""
    f = res // x.shape[-1]
    return x.repeat_interleave(f, 2).repeat_interleave(f, 3) if f > 1 else x


def fade_reals(x: torch.Tensor, res: int, alpha: float) -> torch.Tensor:
    """Training images as the discriminator sees them at ``res``: box-downsampled, and while a block fades in
    (alpha < 1) blended with the previous resolution upsampled back (train.py's process_reals)."""
    y = box_down(x, res)
    if alpha < 1 and res > 4:
        y = torch.lerp(nearest_up(box_down(y, res // 2), res), y, alpha)
    return y


def pixel_norm(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pixelwise feature vector normalisation (paper section 4.2): each pixel's features to unit mean square."""
    return x * torch.rsqrt(x.square().mean(1, keepdim=True) + eps)


def minibatch_stddev(x: torch.Tensor, group_size: int = 4) -> torch.Tensor:
    """The minibatch standard-deviation layer (paper section 3): the features' standard deviation over a group
    of samples, averaged to one number per group, appended as one more feature map. Sample n is in group
    n mod (N / G), as networks.py groups them."""
    n, c, h, w = x.shape
    g = max(d for d in range(1, min(group_size, n) + 1) if n % d == 0)  # the largest group size <= 4 dividing N
    y = x.float().reshape(g, -1, c, h, w)
    y = (y - y.mean(0)).square().mean(0).add(1e-8).sqrt().mean([1, 2, 3])  # [N / G]
    y = y.repeat(g).reshape(n, 1, 1, 1).expand(n, 1, h, w).to(x.dtype)
    return torch.cat([x, y], 1)


class EqualizedLinear(nn.Module):
    """Linear layer with the equalised learning rate (paper section 4.1): weights drawn from N(0, 1) and scaled
    at run time by He's constant gain / sqrt(fan_in), so Adam's per-parameter step moves every layer alike."""

    def __init__(self, in_features: int, out_features: int, gain: float = math.sqrt(2)):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.scale = gain / math.sqrt(in_features)

    def forward(self, x):
        return F.linear(x, self.weight * self.scale, self.bias)


class EqualizedConv2d(nn.Module):
    """k x k convolution (same padding) with the equalised learning rate: scale = gain / sqrt(in x k x k)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, gain: float = math.sqrt(2)):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.scale = gain / math.sqrt(in_channels * kernel * kernel)

    def forward(self, x):
        return F.conv2d(x, self.weight * self.scale, self.bias, padding=self.weight.shape[-1] // 2)


def _act(x):
    return F.leaky_relu(x, 0.2)


def _zero_term(modules: Iterable[nn.Module]) -> torch.Tensor | float:
    """0 x the sum of the parameters of blocks not run: every parameter stays in the graph with a zero gradient
    (DDP without unused-parameter search needs each one to get a gradient)."""
    if not torch.is_grad_enabled():
        return 0.0
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    return sum(p.sum() for p in params) * 0 if params else 0.0


class GBlock(nn.Module):
    """Upsample x2 (nearest), then two 3x3 conv + leaky ReLU + pixel norm (G_paper's block for res >= 8)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv0, self.conv1 = EqualizedConv2d(cin, cout, 3), EqualizedConv2d(cout, cout, 3)

    def forward(self, x):
        x = nearest_up(x, 2 * x.shape[-1])
        return pixel_norm(_act(self.conv1(pixel_norm(_act(self.conv0(x))))))


class Generator(nn.Module, Checkpointable):
    """G_paper: normalised latent (with one-hot labels) -> dense 4x4 -> 3x3 conv, then per doubling an upsampling
    block; a 1x1 toRGB at every resolution (linear, gain 1). Outputs images at the full resolution (lower
    resolutions upsampled by repetition, as the paper's linear structure does) unless ``upsample=False``."""

    def __init__(self, resolution: int, channels: int, num_classes: int = 0, *, z_dim: int, fmap_base: int,
                 fmap_max: int):
        super().__init__()
        self.resolution, self.channels, self.num_classes, self.z_dim = resolution, channels, num_classes, z_dim
        levels = int(math.log2(resolution)) - 2
        n = lambda s: nf(s, fmap_base, fmap_max)  # noqa: E731
        # gain sqrt(2)/4: the dense layer is a 4x4 transposed convolution of a 1x1 input (networks.py)
        self.dense = EqualizedLinear(z_dim + num_classes, n(1) * 16, gain=math.sqrt(2) / 4)
        self.conv4 = EqualizedConv2d(n(1), n(1), 3)
        self.blocks = nn.ModuleList([GBlock(n(i), n(i + 1)) for i in range(1, levels + 1)])
        self.to_rgb = nn.ModuleList([EqualizedConv2d(n(i + 1), channels, 1, gain=1.0) for i in range(levels + 1)])
        # (resolution, alpha) the network was last run at in training: what sampling uses by default
        self.register_buffer("growth", torch.tensor([float(resolution), 1.0]))

    def checkpoint_blocks(self) -> list[nn.Module]:
        return list(self.blocks)  # train.activation_checkpointing

    def forward(self, z, labels=None, *, res: Optional[int] = None, alpha: Optional[float] = None,
                upsample: bool = True):
        if res is None:
            res, alpha = int(round(self.growth[0].item())), float(self.growth[1].item())
        alpha = 1.0 if alpha is None else alpha
        level = int(math.log2(res)) - 2
        if not (0 <= level < len(self.to_rgb) and 2 ** (level + 2) == res):
            raise ValueError(f"res must be a power of two from 4 to {self.resolution}, got {res}")
        if self.num_classes:
            if labels is None:
                raise ValueError("a conditional generator needs labels")
            z = torch.cat([z, F.one_hot(labels, self.num_classes).to(z.dtype)], 1)
        elif labels is not None:
            raise ValueError("an unconditional generator takes no labels")
        x = pixel_norm(z)  # normalize_latents
        x = pixel_norm(_act(self.dense(x).view(z.shape[0], -1, 4, 4)))
        x = pixel_norm(_act(self.conv4(x)))
        prev = x
        for block in self.blocks[:level]:
            prev, x = x, block(x)
        img = self.to_rgb[level](x)
        fading = level > 0 and alpha < 1
        if fading:  # lerp_clip: alpha 0 is the previous resolution's image, upsampled; 1 the new block's alone
            img = torch.lerp(nearest_up(self.to_rgb[level - 1](prev), res), img, float(alpha))
        unused = list(self.blocks[level:]) + [m for i, m in enumerate(self.to_rgb)
                                               if i != level and not (fading and i == level - 1)]
        img = img + _zero_term(unused)
        return nearest_up(img, self.resolution) if upsample else img


class DBlock(nn.Module):
    """Two 3x3 conv + leaky ReLU, then a 2x2 box downsample (D_paper's block for res >= 8)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv0, self.conv1 = EqualizedConv2d(cin, cin, 3), EqualizedConv2d(cin, cout, 3)

    def forward(self, x):
        return F.avg_pool2d(_act(self.conv1(_act(self.conv0(x)))), 2)


class Discriminator(nn.Module, Checkpointable):
    """D_paper: a 1x1 fromRGB at the current resolution, a downsampling block per halving, and at 4x4 the
    minibatch-stddev layer, a 3x3 conv, a dense layer and the linear output. Returns (logits [B], features).
    Conditional: a projection term <embed(y), features> (the paper's AC-GAN head is left out)."""

    def __init__(self, resolution: int, channels: int, num_classes: int = 0, *, fmap_base: int, fmap_max: int,
                 z_dim: int = 0, mbstd_group_size: int = 4):
        super().__init__()
        self.resolution, self.group = resolution, mbstd_group_size
        levels = int(math.log2(resolution)) - 2
        n = lambda s: nf(s, fmap_base, fmap_max)  # noqa: E731
        self.from_rgb = nn.ModuleList([EqualizedConv2d(channels, n(i + 1), 1) for i in range(levels + 1)])
        # blocks[i - 1] takes resolution 2^(i+2) to 2^(i+1)
        self.blocks = nn.ModuleList([DBlock(n(i + 1), n(i)) for i in range(1, levels + 1)])
        self.conv4 = EqualizedConv2d(n(1) + 1, n(1), 3)
        self.dense = EqualizedLinear(n(1) * 16, n(0))
        self.out = EqualizedLinear(n(0), 1, gain=1.0)
        self.embed = nn.Embedding(num_classes, n(0)) if num_classes else None

    def checkpoint_blocks(self) -> list[nn.Module]:
        return list(self.blocks)  # train.activation_checkpointing

    def forward(self, x, labels=None, *, res: Optional[int] = None, alpha: float = 1.0):
        res = x.shape[-1] if res is None else res
        level = int(math.log2(res)) - 2
        if not (0 <= level < len(self.from_rgb) and 2 ** (level + 2) == res and x.shape[-1] >= res):
            raise ValueError(f"res must be a power of two from 4 to {self.resolution} and <= the image size, "
                             f"got {res} for {x.shape[-1]}x{x.shape[-1]} images")
        x = box_down(x, res)
        h = _act(self.from_rgb[level](x))
        fading = level > 0 and alpha < 1
        if level > 0:
            h = self.blocks[level - 1](h)
            if fading:  # lerp_clip: alpha 0 reads the half-resolution image through the previous fromRGB
                h = torch.lerp(_act(self.from_rgb[level - 1](box_down(x, res // 2))), h, float(alpha))
            for block in reversed(self.blocks[:level - 1]):
                h = block(h)
        h = _act(self.conv4(minibatch_stddev(h, self.group)))
        h = _act(self.dense(h.flatten(1)))
        logits = self.out(h).squeeze(1)
        if self.embed is not None:
            if labels is None:
                raise ValueError("a conditional discriminator needs labels")
            logits = logits + (self.embed(labels) * h).sum(1)
        unused = list(self.blocks[level:]) + [m for i, m in enumerate(self.from_rgb)
                                              if i != level and not (fading and i == level - 1)]
        return logits + _zero_term(unused), h

"""StyleGAN2 generator and discriminator (Karras et al. 2020, "Analyzing and Improving
the Image Quality of StyleGAN"), in plain PyTorch.

The design follows NVlabs/stylegan2-ada-pytorch (Karras et al. 2020b) in spirit:

* Generator: a mapping network z -> w (8 equalised-LR linear layers at lr x 0.01 in the
  paper), a learned 4x4 constant, and per resolution two 3x3 modulated convolutions with
  weight demodulation (paper Sec. 2.2, Eq. 1-3), per-layer noise, and the "skip" output
  architecture (paper Sec. 4.1, Fig. 7b): a toRGB at every resolution, summed with the
  upsampled RGB image of the previous resolution.
* Discriminator: the "resnet" architecture (paper Fig. 7c) with a minibatch standard
  deviation layer at 4x4 (Karras et al. 2018) and, when class-conditional, the projection
  discriminator of StyleGAN2-ADA (Miyato & Koyama 2018).

The layers (FIR resampling, equalised learning rate, the mapping network, modulated
convolutions) are in :mod:`distgen.families.gan.stylegan2_layers`; this module assembles
the networks from them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from distgen.families.checkpointing import Checkpointable
from distgen.families.gan.stylegan2_layers import (EqualizedConv2d, EqualizedLinear, MappingNetwork, SynthesisLayer,
                                                   ToRGBLayer, binomial_filter, channels_at, check_common,
                                                   check_labels, check_positive, upsample2d)

__all__ = ["PRESETS", "Generator", "Discriminator", "SynthesisLayer"]

# Size presets; every key is accepted by both constructors (Generator(**PRESETS[n]) and
# Discriminator(**PRESETS[n]) both work). Channels at resolution r: min(channel_base // r, channel_max).
PRESETS: dict[str, dict] = {
    # Fast CPU tests: 32 channels at every resolution up to 32x32 (~0.17M parameters for G + D at 32x32).
    "tiny": dict(z_dim=32, w_dim=32, mapping_layers=2, channel_base=1024, channel_max=32),
    # A CPU demo (~1 s a step at batch 32 per process on 2 cores): 128 channels at 4..16, 64 at 32x32.
    "small": dict(z_dim=128, w_dim=128, mapping_layers=4, channel_base=2048, channel_max=128),
    # Config F of the paper (Table 1): 512-d latents, 8 mapping layers, up to 512 channels.
    "paper": dict(z_dim=512, w_dim=512, mapping_layers=8, channel_base=32768, channel_max=512),
}

# ---------------------------------------------------------------------------------------
# Generator
# ---------------------------------------------------------------------------------------

class SynthesisBlock(nn.Module):
    """One resolution of the synthesis network with the "skip" output architecture (paper Fig. 7b).

    The 4x4 block starts from a learned constant (StyleGAN Sec. 2) and has one conv; the others
    upsample in their first conv. Every block adds its toRGB output to the upsampled image so far.
    Consumes 2 ws (4x4) or 3 ws (others): the toRGB shares its w with the next block's first conv,
    which is why num_ws = 2 * log2(resolution) - 2.
    """

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, image_channels: int):
        super().__init__()
        self.resolution = resolution
        if resolution == 4:
            self.const = nn.Parameter(torch.randn(out_channels, 4, 4))
            self.conv0 = None
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim, resolution, up=True)
            self.register_buffer("resample_filter", binomial_filter(), persistent=False)
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim, resolution, up=False)
        self.torgb = ToRGBLayer(out_channels, image_channels, w_dim)
        self.num_ws = 2 if resolution == 4 else 3

    def forward(self, x: torch.Tensor | None, img: torch.Tensor | None, ws: torch.Tensor,
                noise_gen: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        i = 0
        if self.conv0 is None:
            x = self.const[None].expand(ws.shape[0], -1, -1, -1)
        else:
            x = self.conv0(x, ws[:, i], noise_gen)
            i += 1
        x = self.conv1(x, ws[:, i], noise_gen)
        y = self.torgb(x, ws[:, i + 1])
        img = y if img is None else upsample2d(img, self.resample_filter) + y
        return x, img


class Generator(nn.Module, Checkpointable):
    """StyleGAN2 generator (config F architecture with "skip" outputs), returning linear (no tanh) images."""

    def __init__(self, resolution: int, channels: int, num_classes: int = 0, *, z_dim: int, w_dim: int,
                 mapping_layers: int, channel_base: int, channel_max: int, mapping_lr_mult: float = 0.01,
                 w_avg_beta: float = 0.995):
        super().__init__()
        check_common(resolution, channels, num_classes)
        check_positive(z_dim=z_dim, w_dim=w_dim, mapping_layers=mapping_layers, channel_base=channel_base,
                        channel_max=channel_max)
        if not 0.0 <= w_avg_beta < 1.0:
            raise ValueError(f"w_avg_beta must be in [0, 1), got {w_avg_beta!r}")
        self.resolution, self.channels, self.num_classes = resolution, channels, num_classes
        self.z_dim, self.w_dim = z_dim, w_dim
        self.w_avg_beta = w_avg_beta

        self.mapping = MappingNetwork(z_dim, num_classes, w_dim, mapping_layers, mapping_lr_mult)
        resolutions = [2 ** i for i in range(2, int(math.log2(resolution)) + 1)]
        ch = {r: channels_at(r, channel_base, channel_max) for r in resolutions}
        if min(ch.values()) < 1:
            raise ValueError(f"channel_base={channel_base} gives 0 channels at resolution {resolution}")
        self.blocks = nn.ModuleList(
            SynthesisBlock(ch[r // 2] if r > 4 else 0, ch[r], w_dim, r, channels) for r in resolutions)
        self.num_ws = sum(b.num_ws for b in self.blocks) - (len(self.blocks) - 1)  # toRGB ws are shared
        # Running mean of w, the centre for the truncation trick (StyleGAN Sec. 3 / Appendix B).
        self.register_buffer("w_avg", torch.zeros(w_dim, dtype=torch.float32))

    def checkpoint_blocks(self) -> list[nn.Module]:
        return list(self.blocks)  # train.activation_checkpointing (their noise generator is replayed)

    def _truncate(self, w: torch.Tensor, psi: float | None) -> torch.Tensor:
        # Truncation trick: pull w towards the mean, trading diversity for fidelity.
        if psi is None or (not torch.is_tensor(psi) and psi == 1):  # a tensor psi (an ONNX input) always lerps
            return w
        return self.w_avg.lerp(w, psi)  # w_avg + psi * (w - w_avg)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None, *, truncation: float | None = None,
                mix_z: torch.Tensor | None = None, mix_cutoff: torch.Tensor | None = None,
                noise_gen: torch.Generator | None = None, update_w_avg: bool = False, return_ws: bool = False):
        """Generate images [B, channels, resolution, resolution] (float32) from z [B, z_dim].

        labels: LongTensor [B], required iff num_classes > 0.
        truncation: psi of the truncation trick, w <- w_avg + psi (w - w_avg); None or 1 disables it.
        mix_z, mix_cutoff: style mixing regularisation (StyleGAN Sec. 3.1): ws[i, mix_cutoff[i]:] come
            from mix_z[i] (mix_cutoff LongTensor [B] with values in [1, num_ws]; num_ws means no mixing).
        noise_gen: draw per-layer noise from this generator; otherwise use the fixed noise buffers.
        update_w_avg: move w_avg towards the batch mean of w (unmixed, untruncated), a training-time EMA.
        return_ws: also return ws [B, num_ws, w_dim], the exact tensor fed to synthesis, so the
            path-length regulariser can differentiate the images with respect to it.
        """
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"z must have shape [B, {self.z_dim}], got {tuple(z.shape)}")
        check_labels(labels, self.num_classes, z.shape[0])
        if (mix_z is None) != (mix_cutoff is None):
            raise ValueError("mix_z and mix_cutoff must be given together")

        w = self.mapping(z, labels)
        if update_w_avg:
            with torch.no_grad():
                self.w_avg.copy_(w.detach().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))
        ws = self._truncate(w, truncation)[:, None].repeat(1, self.num_ws, 1)

        if mix_z is not None:
            if mix_z.shape != z.shape:
                raise ValueError(f"mix_z must have the shape of z {tuple(z.shape)}, got {tuple(mix_z.shape)}")
            if mix_cutoff.shape != (z.shape[0],):
                raise ValueError(f"mix_cutoff must have shape [{z.shape[0]}], got {tuple(mix_cutoff.shape)}")
            ws_mix = self._truncate(self.mapping(mix_z, labels), truncation)[:, None].expand(-1, self.num_ws, -1)
            # Layer l of sample i uses the main w iff l < cutoff[i]; torch.where keeps this branchless
            # (no host sync), and the mixing branch stays in the graph even when nothing is mixed.
            layer = torch.arange(self.num_ws, device=ws.device)
            keep = layer[None, :] < mix_cutoff.to(ws.device)[:, None]
            ws = torch.where(keep[:, :, None], ws, ws_mix)

        x = img = None
        i = 0
        for block in self.blocks:
            x, img = block(x, img, ws[:, i:i + block.num_ws], noise_gen)
            i += block.num_ws - 1  # the toRGB's w is shared with the next block's first conv
        img = img.float()
        return (img, ws) if return_ws else img


# ---------------------------------------------------------------------------------------
# Discriminator
# ---------------------------------------------------------------------------------------

class DiscriminatorBlock(nn.Module):
    """Residual block (paper Fig. 7c): two 3x3 convs (the second downsamples) plus a 1x1 downsampling
    skip, summed with gain 1/sqrt(2) on each branch to keep the output variance unchanged."""

    def __init__(self, in_channels: int, tmp_channels: int, out_channels: int, image_channels: int):
        super().__init__()
        # fromRGB only in the first (full-resolution) block: the resnet D has no multi-scale inputs.
        self.fromrgb = EqualizedConv2d(image_channels, tmp_channels, 1, activation="lrelu") if in_channels == 0 \
            else None
        self.conv0 = EqualizedConv2d(tmp_channels, tmp_channels, 3, activation="lrelu")
        self.conv1 = EqualizedConv2d(tmp_channels, out_channels, 3, activation="lrelu", down=True)
        self.skip = EqualizedConv2d(tmp_channels, out_channels, 1, bias=False, down=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fromrgb is not None:
            x = self.fromrgb(x)
        y = self.skip(x, gain=math.sqrt(0.5))
        x = self.conv1(self.conv0(x), gain=math.sqrt(0.5))
        return x + y


class MinibatchStdLayer(nn.Module):
    """Appends the average std of features over groups of samples (Karras et al. 2018, Sec. 3),
    which lets D detect a lack of variation in generated batches."""

    def __init__(self, group_size: int, num_channels: int):
        super().__init__()
        self.group_size, self.num_channels = group_size, num_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        # Largest group size <= group_size that divides the batch (1 for a single sample).
        g = next(d for d in range(min(self.group_size, n), 0, -1) if n % d == 0)
        f = self.num_channels
        # Sample i goes to group i % (n // g), as in the official code; statistics in float32.
        y = x.float().reshape(g, -1, f, c // f, h, w)
        y = (y - y.mean(dim=0)).square().mean(dim=0)   # variance over the group
        y = (y + 1e-8).sqrt().mean(dim=[2, 3, 4])       # std, averaged over channels and pixels: [n/g, F]
        y = y.reshape(-1, f, 1, 1).repeat(g, 1, h, w)   # back to [N, F, H, W]
        return torch.cat([x, y.to(x.dtype)], dim=1)


class Discriminator(nn.Module, Checkpointable):
    """StyleGAN2 residual discriminator; returns (logits [B], penultimate features [B, F])."""

    def __init__(self, resolution: int, channels: int, num_classes: int = 0, *, channel_base: int,
                 channel_max: int, mbstd_group_size: int = 4, mbstd_channels: int = 1,
                 z_dim: int | None = None, w_dim: int | None = None, mapping_layers: int | None = None,
                 mapping_lr_mult: float = 0.01):
        super().__init__()
        # z_dim / w_dim size the generator only; accepted so that Discriminator(**PRESETS[name]) works.
        del z_dim, w_dim
        check_common(resolution, channels, num_classes)
        check_positive(channel_base=channel_base, channel_max=channel_max, mbstd_group_size=mbstd_group_size,
                        mbstd_channels=mbstd_channels)
        self.resolution, self.channels, self.num_classes = resolution, channels, num_classes

        resolutions = [2 ** i for i in range(int(math.log2(resolution)), 1, -1)]  # resolution .. 4
        ch = {r: channels_at(r, channel_base, channel_max) for r in resolutions}
        if min(ch.values()) < 1:
            raise ValueError(f"channel_base={channel_base} gives 0 channels at resolution {resolution}")
        self.blocks = nn.ModuleList(
            DiscriminatorBlock(ch[r] if r < resolution else 0, ch[r], ch[r // 2], channels) for r in resolutions[:-1])

        c4 = ch[4]
        if c4 % mbstd_channels != 0:
            raise ValueError(f"mbstd_channels={mbstd_channels} must divide the 4x4 channel count {c4}")
        self.mbstd = MinibatchStdLayer(mbstd_group_size, mbstd_channels)
        self.conv = EqualizedConv2d(c4 + mbstd_channels, c4, 3, activation="lrelu")
        self.fc = EqualizedLinear(c4 * 4 * 4, c4, activation="lrelu")
        self.feature_dim = c4
        # Projection conditioning (StyleGAN2-ADA): the label is mapped to cmap, and the logit is the
        # scaled dot product of the output vector with it.
        if num_classes > 0:
            mapping_layers = 8 if mapping_layers is None else mapping_layers  # StyleGAN2-ADA's default
            check_positive(mapping_layers=mapping_layers)
            self.cmap_dim = c4
            self.mapping = MappingNetwork(0, num_classes, self.cmap_dim, mapping_layers, mapping_lr_mult)
        else:
            self.cmap_dim = 0
            self.mapping = None
        self.out = EqualizedLinear(c4, self.cmap_dim if num_classes > 0 else 1)

    def checkpoint_blocks(self) -> list[nn.Module]:
        return list(self.blocks)  # train.activation_checkpointing

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, channels, R, R] -> (logits [B], features [B, F] after the last hidden FC layer), both float32."""
        if x.ndim != 4 or x.shape[1:] != (self.channels, self.resolution, self.resolution):
            raise ValueError(f"x must have shape [B, {self.channels}, {self.resolution}, {self.resolution}], "
                             f"got {tuple(x.shape)}")
        check_labels(labels, self.num_classes, x.shape[0])
        for block in self.blocks:
            x = block(x)
        x = self.conv(self.mbstd(x))
        features = self.fc(x.flatten(1))
        out = self.out(features).float()
        if self.mapping is not None:
            cmap = self.mapping(None, labels)
            logits = (out * cmap).sum(dim=1) / math.sqrt(self.cmap_dim)
        else:
            logits = out[:, 0]
        return logits, features.float()

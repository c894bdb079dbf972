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

No custom CUDA kernels: upfirdn2d resampling with the [1, 3, 3, 1] binomial filter is
written with depthwise (grouped) convolutions, and modulated convolution scales the
activations around one shared convolution (the official code's training path, equal to
per-sample kernels). Everything is double-differentiable,
so R1 and path-length regularisation work, and runs under CPU/GPU autocast (the numerically
sensitive parts, normalisation and demodulation, are computed in float32).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from distgen.families.base import accept_0dim, learned_scalar

__all__ = ["PRESETS", "Generator", "Discriminator"]

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

_LRELU_SLOPE = 0.2
_LRELU_GAIN = math.sqrt(2.0)  # keeps activations' second moment unchanged through leaky ReLU (He et al. 2015)


# ---------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------

def _check_common(resolution: int, channels: int, num_classes: int) -> None:
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 8 \
            or resolution & (resolution - 1) != 0:
        raise ValueError(f"resolution must be a power of two >= 8, got {resolution!r}")
    if isinstance(channels, bool) or channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")


def _check_positive(**kwargs) -> None:
    for name, value in kwargs.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_labels(labels: torch.Tensor | None, num_classes: int, batch: int) -> None:
    if num_classes == 0:
        if labels is not None:
            raise ValueError("labels must be None for an unconditional model (num_classes=0)")
        return
    if labels is None:
        raise ValueError(f"labels are required for a class-conditional model (num_classes={num_classes})")
    if labels.shape != (batch,) or labels.dtype != torch.long:
        raise ValueError(f"labels must be a LongTensor of shape [{batch}], got {labels.dtype} {tuple(labels.shape)}")


def _channels_at(res: int, channel_base: int, channel_max: int) -> int:
    return min(channel_base // res, channel_max)


# ---------------------------------------------------------------------------------------
# FIR resampling (upfirdn2d with the [1, 3, 3, 1] filter), plain torch ops
# ---------------------------------------------------------------------------------------
# StyleGAN2 low-pass filters every up/downsampling with a separable binomial filter (paper
# Sec. 4 / Appendix B, following Zhang 2019 "Making Convolutional Networks Shift-Invariant
# Again") to suppress aliasing. We apply the 4x4 outer product of [1, 3, 3, 1] (normalised
# to sum 1) as a depthwise convolution: one filter per channel via groups=C. The filter is
# symmetric, so convolution and cross-correlation coincide and no flip is needed.
#   * 2x upsampling = zero insertion followed by filtering with gain 4 (to keep the mean),
#     which is exactly conv_transpose2d(stride=2) with the filter as kernel; with padding=1
#     this matches upfirdn2d(up=2, padding=[2, 1]) and maps H -> 2H.
#   * 2x downsampling = filtering then keeping every 2nd sample, i.e. a stride-2 depthwise
#     convolution after padding by 1 on each side (upfirdn2d(down=2, padding=1)): H -> H/2.


def _binomial_filter() -> torch.Tensor:
    f = torch.tensor([1.0, 3.0, 3.0, 1.0])
    f = f[:, None] * f[None, :]
    return f / f.sum()


def _depthwise(f: torch.Tensor, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """The [kh, kw] filter as a [C, 1, kh, kw] depthwise kernel in x's dtype."""
    c = x.shape[1]
    return (f * gain).to(x.dtype)[None, None].repeat(c, 1, 1, 1)


def fir_filter2d(x: torch.Tensor, f: torch.Tensor, pad: int) -> torch.Tensor:
    """Low-pass filter every channel of x, zero-padding by `pad` on each side."""
    return F.conv2d(F.pad(x, [pad] * 4), _depthwise(f, x), groups=x.shape[1])


def upsample2d(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """2x FIR upsampling, [N, C, H, W] -> [N, C, 2H, 2W]."""
    return F.conv_transpose2d(x, _depthwise(f, x, gain=4.0), stride=2, padding=1, groups=x.shape[1])


def downsample2d(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """2x FIR downsampling, [N, C, H, W] -> [N, C, H/2, W/2]."""
    return F.conv2d(F.pad(x, [1] * 4), _depthwise(f, x), stride=2, groups=x.shape[1])


def _bias_act(x: torch.Tensor, bias: torch.Tensor | None, act: str, gain: float = 1.0) -> torch.Tensor:
    """Add a per-channel bias, apply 'lrelu' (with its sqrt(2) gain) or 'linear', then scale by gain."""
    if bias is not None:
        x = x + bias.to(x.dtype).reshape([1, -1] + [1] * (x.ndim - 2))
    if act == "lrelu":
        x = F.leaky_relu(x, _LRELU_SLOPE)
        gain = gain * _LRELU_GAIN
    return x * gain if gain != 1.0 else x


def _normalize_2nd_moment(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale each row to unit mean square ("pixel norm"), in float32 for bf16/fp16 safety."""
    x = x.float()
    return x * (x.square().mean(dim=1, keepdim=True) + eps).rsqrt()


# ---------------------------------------------------------------------------------------
# Equalised learning rate layers
# ---------------------------------------------------------------------------------------
# Equalised learning rate (Karras et al. 2018, Sec. 4.1): parameters are stored at unit
# scale and multiplied by the He constant 1/sqrt(fan_in) at runtime, so Adam's per-parameter
# normalisation gives every layer the same effective learning rate. An lr multiplier scales
# the runtime gain; as in StyleGAN2-ADA the stored weights are initialised N(0, 1/lr_mult^2)
# (and biases at bias_init/lr_mult) so the effective initial weights are He-initialised
# regardless of the multiplier, while updates are lr_mult times smaller.


class EqualizedLinear(nn.Module):
    """Fully-connected layer with equalised learning rate, bias and optional leaky ReLU."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, bias_init: float = 0.0,
                 lr_mult: float = 1.0, activation: str = "linear"):
        super().__init__()
        self.activation = activation
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mult)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init) / lr_mult)) if bias else None
        self.weight_gain = lr_mult / math.sqrt(in_features)
        self.bias_gain = lr_mult

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight * self.weight_gain
        x = F.linear(x, w)
        b = self.bias * self.bias_gain if self.bias is not None else None
        return _bias_act(x, b, self.activation)


class EqualizedConv2d(nn.Module):
    """Conv layer of the discriminator: k x k conv, optional 2x FIR downsampling, bias and activation."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, bias: bool = True,
                 activation: str = "linear", down: bool = False):
        super().__init__()
        self.kernel_size = kernel_size
        self.activation = activation
        self.down = down
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        if down:
            self.register_buffer("resample_filter", _binomial_filter(), persistent=False)

    def forward(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        w = self.weight * self.weight_gain
        if not self.down:
            x = F.conv2d(x, w.to(x.dtype), padding=self.kernel_size // 2)
        elif self.kernel_size == 1:
            # 1x1 skip path: downsample first (cheaper, and 1x1 conv commutes with the filter).
            x = F.conv2d(downsample2d(x, self.resample_filter), w.to(x.dtype))
        else:
            # Blur then stride-2 conv, as in upfirdn2d-based conv2d_resample: padding 2 on
            # each side gives H+1 after the 4x4 filter, and the 3x3 stride-2 conv gives H/2.
            x = F.conv2d(fir_filter2d(x, self.resample_filter, pad=2), w.to(x.dtype), stride=2)
        return _bias_act(x, self.bias, self.activation, gain)


# ---------------------------------------------------------------------------------------
# Generator
# ---------------------------------------------------------------------------------------

class MappingNetwork(nn.Module):
    """z (and optionally a class label) -> w. Also used, with z_dim=0, for the discriminator's cmap."""

    def __init__(self, z_dim: int, num_classes: int, w_dim: int, num_layers: int, lr_mult: float):
        super().__init__()
        self.z_dim, self.num_classes = z_dim, num_classes
        # Labels enter as one-hot vectors through a linear embedding (same as nn.Embedding but with
        # equalised LR); as in StyleGAN2-ADA the embedding is normalised and concatenated to z.
        self.embed = EqualizedLinear(num_classes, w_dim) if num_classes > 0 else None
        features = [z_dim + (w_dim if num_classes > 0 else 0)] + [w_dim] * num_layers
        # The paper's reduced lr (x0.01) for the mapping network stabilises training (StyleGAN, App. C).
        self.layers = nn.ModuleList(
            EqualizedLinear(i, o, lr_mult=lr_mult, activation="lrelu") for i, o in zip(features[:-1], features[1:]))

    def forward(self, z: torch.Tensor | None, labels: torch.Tensor | None) -> torch.Tensor:
        parts = []
        if self.z_dim > 0:
            parts.append(_normalize_2nd_moment(z))
        if self.embed is not None:
            onehot = F.one_hot(labels, self.num_classes).to(self.embed.weight.dtype)
            parts.append(_normalize_2nd_moment(self.embed(onehot)))
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        for layer in self.layers:
            x = layer(x)
        return x.float()


def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, *, demodulate: bool,
                     up: bool = False, resample_filter: torch.Tensor | None = None) -> torch.Tensor:
    """Modulated (and optionally demodulated) convolution, paper Sec. 2.2, Eq. 1-3.

    x [B, I, H, W], weight [O, I, k, k] (already scaled), styles [B, I]. Each sample's kernel is
    w'_ijk = s_i w_ijk (Eq. 1), optionally rescaled so each output feature map has unit expected
    std, w''_ijk = w'_ijk / sqrt(sum_ik w'_ijk^2 + eps) (Eq. 3): demodulation replaces AdaIN's
    data-dependent instance norm, which caused the "droplet" artefacts. Both factors are applied
    to the activations around one shared convolution (scale the inputs by s, convolve, scale the
    outputs by the demodulation coefficients): the same result as per-sample kernels, and the
    official code's training path, several times faster on CPUs than a grouped convolution.
    """
    kh = weight.shape[2]
    w, s = weight.float(), styles.float()
    x = x * s.to(x.dtype)[:, :, None, None]
    if up:
        # Transposed stride-2 conv (zero insertion + conv), then the FIR low-pass with gain 4 and
        # padding 1, which gives exactly 2H: the conv2d_resample "fast path" of the official code.
        x = F.conv_transpose2d(x, w.transpose(0, 1).to(x.dtype), stride=2)
        x = F.conv2d(F.pad(x, [1] * 4), _depthwise(resample_filter, x, gain=4.0), groups=x.shape[1])
    else:
        x = F.conv2d(x, w.to(x.dtype), padding=kh // 2)
    if demodulate:
        # sum_ik (s_i w_oik)^2 for every sample and output channel, in float32 (precision-sensitive)
        d = (s.square() @ w.square().sum(dim=[2, 3]).T + 1e-8).rsqrt()  # [B, O]
        x = x * d.to(x.dtype)[:, :, None, None]
    return x


class SynthesisLayer(nn.Module):
    """Modulated 3x3 conv (+ optional 2x upsampling), noise, bias, leaky ReLU."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, *, up: bool):
        super().__init__()
        self.up = up
        # Styles start at 1 (bias_init=1) so the initial network behaves like an unmodulated one.
        self.affine = EqualizedLinear(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.weight_gain = 1.0 / math.sqrt(in_channels * 9)  # equalised LR; a no-op after demodulation
        # Per-layer noise strength, a learned scalar initialised to 0 (StyleGAN Sec. 3.2).
        self.noise_strength = learned_scalar(0.0)
        # Fixed noise image used when no generator is given, so sampling is deterministic.
        self.register_buffer("noise_const", torch.randn(resolution, resolution))
        if up:
            self.register_buffer("resample_filter", _binomial_filter(), persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        accept_0dim(state_dict, prefix + "noise_strength")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_gen: torch.Generator | None) -> torch.Tensor:
        styles = self.affine(w)
        x = modulated_conv2d(x, self.weight * self.weight_gain, styles, demodulate=True, up=self.up,
                             resample_filter=self.resample_filter if self.up else None)
        if noise_gen is None:
            noise = self.noise_const[None, None]
        else:
            shape = (x.shape[0], 1, x.shape[2], x.shape[3])
            noise = torch.randn(shape, generator=noise_gen, device=noise_gen.device).to(x.device)
        x = x + noise * self.noise_strength
        return _bias_act(x, self.bias, "lrelu")


class ToRGBLayer(nn.Module):
    """Modulated 1x1 conv to image channels, without demodulation (the output's scale matters)."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int):
        super().__init__()
        self.affine = EqualizedLinear(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.weight_gain = 1.0 / math.sqrt(in_channels)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # As in the official code, the equalised-LR gain is folded into the styles.
        styles = self.affine(w) * self.weight_gain
        x = modulated_conv2d(x, self.weight, styles, demodulate=False)
        return _bias_act(x, self.bias, "linear")


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
            self.register_buffer("resample_filter", _binomial_filter(), persistent=False)
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


class Generator(nn.Module):
    """StyleGAN2 generator (config F architecture with "skip" outputs), returning linear (no tanh) images."""

    def __init__(self, resolution: int, channels: int, num_classes: int = 0, *, z_dim: int, w_dim: int,
                 mapping_layers: int, channel_base: int, channel_max: int, mapping_lr_mult: float = 0.01,
                 w_avg_beta: float = 0.995):
        super().__init__()
        _check_common(resolution, channels, num_classes)
        _check_positive(z_dim=z_dim, w_dim=w_dim, mapping_layers=mapping_layers, channel_base=channel_base,
                        channel_max=channel_max)
        if not 0.0 <= w_avg_beta < 1.0:
            raise ValueError(f"w_avg_beta must be in [0, 1), got {w_avg_beta!r}")
        self.resolution, self.channels, self.num_classes = resolution, channels, num_classes
        self.z_dim, self.w_dim = z_dim, w_dim
        self.w_avg_beta = w_avg_beta

        self.mapping = MappingNetwork(z_dim, num_classes, w_dim, mapping_layers, mapping_lr_mult)
        resolutions = [2 ** i for i in range(2, int(math.log2(resolution)) + 1)]
        ch = {r: _channels_at(r, channel_base, channel_max) for r in resolutions}
        if min(ch.values()) < 1:
            raise ValueError(f"channel_base={channel_base} gives 0 channels at resolution {resolution}")
        self.blocks = nn.ModuleList(
            SynthesisBlock(ch[r // 2] if r > 4 else 0, ch[r], w_dim, r, channels) for r in resolutions)
        self.num_ws = sum(b.num_ws for b in self.blocks) - (len(self.blocks) - 1)  # toRGB ws are shared
        # Running mean of w, the centre for the truncation trick (StyleGAN Sec. 3 / Appendix B).
        self.register_buffer("w_avg", torch.zeros(w_dim, dtype=torch.float32))

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
        _check_labels(labels, self.num_classes, z.shape[0])
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


class Discriminator(nn.Module):
    """StyleGAN2 residual discriminator; returns (logits [B], penultimate features [B, F])."""

    def __init__(self, resolution: int, channels: int, num_classes: int = 0, *, channel_base: int,
                 channel_max: int, mbstd_group_size: int = 4, mbstd_channels: int = 1,
                 z_dim: int | None = None, w_dim: int | None = None, mapping_layers: int | None = None,
                 mapping_lr_mult: float = 0.01):
        super().__init__()
        # z_dim / w_dim size the generator only; accepted so that Discriminator(**PRESETS[name]) works.
        del z_dim, w_dim
        _check_common(resolution, channels, num_classes)
        _check_positive(channel_base=channel_base, channel_max=channel_max, mbstd_group_size=mbstd_group_size,
                        mbstd_channels=mbstd_channels)
        self.resolution, self.channels, self.num_classes = resolution, channels, num_classes

        resolutions = [2 ** i for i in range(int(math.log2(resolution)), 1, -1)]  # resolution .. 4
        ch = {r: _channels_at(r, channel_base, channel_max) for r in resolutions}
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
            _check_positive(mapping_layers=mapping_layers)
            self.cmap_dim = c4
            self.mapping = MappingNetwork(0, num_classes, self.cmap_dim, mapping_layers, mapping_lr_mult)
        else:
            self.cmap_dim = 0
            self.mapping = None
        self.out = EqualizedLinear(c4, self.cmap_dim if num_classes > 0 else 1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, channels, R, R] -> (logits [B], features [B, F] after the last hidden FC layer), both float32."""
        if x.ndim != 4 or x.shape[1:] != (self.channels, self.resolution, self.resolution):
            raise ValueError(f"x must have shape [B, {self.channels}, {self.resolution}, {self.resolution}], "
                             f"got {tuple(x.shape)}")
        _check_labels(labels, self.num_classes, x.shape[0])
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

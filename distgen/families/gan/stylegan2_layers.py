"""The layers of StyleGAN2 (Karras et al. 2020, "Analyzing and Improving the Image Quality of StyleGAN"), in plain
PyTorch: argument checks, FIR resampling with the [1, 3, 3, 1] binomial filter, equalised-learning-rate layers,
the mapping network, and the modulated convolutions of the synthesis network (paper Sec. 2.2). The networks
built from them are in :mod:`distgen.families.gan.stylegan2`.

No custom CUDA kernels: upfirdn2d resampling is written with depthwise (grouped) convolutions, and modulated
convolution scales the activations around one shared convolution (the official code's training path, equal to
per-sample kernels). Everything is double-differentiable, so R1 and path-length regularisation work, and runs
under CPU/GPU autocast (the numerically sensitive parts, normalisation and demodulation, are computed in float32).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from distgen.families.base import accept_0dim, learned_scalar

_LRELU_SLOPE = 0.2
_LRELU_GAIN = math.sqrt(2.0)  # keeps activations' second moment unchanged through leaky ReLU (He et al. 2015)


# ---------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------

def check_common(resolution: int, channels: int, num_classes: int) -> None:
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 8 \
            or resolution & (resolution - 1) != 0:
        raise ValueError(f"resolution must be a power of two >= 8, got {resolution!r}")
    if isinstance(channels, bool) or channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")


def check_positive(**kwargs) -> None:
    for name, value in kwargs.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_labels(labels: torch.Tensor | None, num_classes: int, batch: int) -> None:
    if num_classes == 0:
        if labels is not None:
            raise ValueError("labels must be None for an unconditional model (num_classes=0)")
        return
    if labels is None:
        raise ValueError(f"labels are required for a class-conditional model (num_classes={num_classes})")
    if labels.shape != (batch,) or labels.dtype != torch.long:
        raise ValueError(f"labels must be a LongTensor of shape [{batch}], got {labels.dtype} {tuple(labels.shape)}")


def channels_at(res: int, channel_base: int, channel_max: int) -> int:
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


def binomial_filter() -> torch.Tensor:
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
            self.register_buffer("resample_filter", binomial_filter(), persistent=False)

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
# The generator's layers: mapping network and modulated convolutions
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
            self.register_buffer("resample_filter", binomial_filter(), persistent=False)

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

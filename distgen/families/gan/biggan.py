"""BigGAN generator and discriminator (Brock et al. 2019, "Large Scale GAN Training for High Fidelity Natural
Image Synthesis"), written after ajbrock/BigGAN-PyTorch.

* G: hierarchical latents -- z is split into one chunk per block plus one for the 4x4 input -- and conditional
  batch norm whose gains and biases are linear in [shared class embedding, z chunk] (BigGAN section 3 and
  appendix B). Residual up-blocks, SAGAN self-attention (Zhang et al. 2019) at one resolution, tanh output.
* D: residual down-blocks (the first is the "optimised" block of Miyato et al. 2018, without the leading ReLU),
  self-attention, global sum pooling and a projection head for labels (Miyato & Koyama 2018).
* Spectral norm (Miyato et al. 2018) on every conv / linear of both networks and on D's embedding (BigGAN
  applies it to G too, section 4), orthogonal initialisation, and the modified orthogonal regulariser for
  G (BigGAN section 3.1), which makes the truncation trick usable.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

from distgen.families.base import accept_0dim, learned_scalar
from distgen.families.checkpointing import Checkpointable

# Size presets, each accepted as **kwargs by both Generator and Discriminator (D ignores z_dim / shared_dim).
# attn_res must be a block resolution of both nets: 8 exists at every resolution, 16 from 32 up, 64 from 64 up
# (see attention_resolutions).
PRESETS: dict[str, dict] = {
    # fast CPU tests: ~0.075M G + ~0.07M D parameters at 32x32
    "tiny": dict(ch=8, z_dim=32, shared_dim=16, attn_res=8),
    # a 32x32 demo, half the width of BigGAN-PyTorch's CIFAR model
    "small": dict(ch=32, z_dim=64, shared_dim=64, attn_res=16),
    # BigGAN's 128x128 model (ch=96, z 120 = 6 chunks of 20, shared embedding 128, attention at 64x64); for a
    # resolution below 64 pass another attn_res (BigGAN-PyTorch's CIFAR model uses none: 0)
    "paper": dict(ch=96, z_dim=120, shared_dim=128, attn_res=64),
}

# Channel multipliers of ch per block, from BigGAN-PyTorch's G_arch / D_arch.
# G: (width of the 4x4 input, width after each up-block).
_G_ARCH = {
    32: (4, [4, 4, 4]),
    64: (16, [16, 8, 4, 2]),
    128: (16, [16, 8, 4, 2, 1]),
    256: (16, [16, 8, 8, 4, 2, 1]),
    512: (16, [16, 8, 8, 4, 2, 1, 1]),
}
# D: (width after each block, whether the block halves the resolution). From 64 up D works down to 4x4 and
# adds one block at 4x4; at 32 (CIFAR) it stops at 8x8 and adds two blocks there.
_D_ARCH = {
    32: ([4, 4, 4, 4], [True, True, False, False]),
    64: ([1, 2, 4, 8, 16], [True] * 4 + [False]),
    128: ([1, 2, 4, 8, 16, 16], [True] * 5 + [False]),
    256: ([1, 2, 4, 8, 8, 16, 16], [True] * 6 + [False]),
    512: ([1, 1, 2, 4, 8, 8, 16, 16], [True] * 7 + [False]),
}


def _check_resolution(resolution: int, channels: int, num_classes: int) -> None:
    if not isinstance(resolution, int) or resolution < 8 or resolution & (resolution - 1):
        raise ValueError(f"resolution must be a power of two >= 8, got {resolution!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")


def _g_arch(resolution: int) -> tuple[int, list[int]]:
    n = resolution.bit_length() - 3  # up-blocks from 4x4
    if resolution in _G_ARCH:
        return _G_ARCH[resolution]
    if resolution < 32:  # the CIFAR model, fewer blocks
        return 4, [4] * n
    start, out = _G_ARCH[512]  # beyond BigGAN's table: more blocks at width ch
    return start, out + [1] * (n - len(out))


def _d_arch(resolution: int) -> tuple[list[int], list[bool]]:
    if resolution in _D_ARCH:
        return _D_ARCH[resolution]
    if resolution < 32:  # as at 32: down to 8x8 (8: no downsampling), then two blocks at 8x8
        n_down = resolution.bit_length() - 4
        return [4] * (n_down + 2), [True] * n_down + [False, False]
    out, down = _D_ARCH[512]
    extra = resolution.bit_length() - 10
    return [1] * extra + out, [True] * extra + down


def _g_block_resolutions(resolution: int) -> list[int]:
    return [2 ** (i + 3) for i in range(resolution.bit_length() - 3)]


def _d_block_resolutions(resolution: int) -> list[int]:
    res, out = resolution, []
    for down in _d_arch(resolution)[1]:
        res = res // 2 if down else res
        out.append(res)
    return out


def attention_resolutions(resolution: int) -> tuple[int, ...]:
    """The attn_res values valid for both G and D at this resolution (0, no attention, is always valid)."""
    _check_resolution(resolution, 3, 0)
    both = set(_g_block_resolutions(resolution)) & set(_d_block_resolutions(resolution))
    return (0, *sorted(both))


def _check_attn_res(attn_res: int, valid: list[int]) -> None:
    if attn_res != 0 and attn_res not in valid:
        raise ValueError(f"attn_res must be 0 or one of the block resolutions {sorted(set(valid))}, got {attn_res!r}")


# --- spectrally normalised layers ---------------------------------------------------------------------------

def _sn(module: nn.Module) -> nn.Module:
    # Orthogonal init as in BigGAN (G_init / D_init 'ortho'), done before spectral norm wraps the weight so that
    # the power iteration starts from the final weight.
    nn.init.orthogonal_(module.weight)
    return spectral_norm(module)


def _conv(c_in: int, c_out: int, kernel: int = 3, bias: bool = True) -> nn.Module:
    return _sn(nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=bias))


def _linear(c_in: int, c_out: int, bias: bool = True) -> nn.Module:
    return _sn(nn.Linear(c_in, c_out, bias=bias))


def _weight_in_use(module: nn.Module) -> torch.Tensor:
    """The weight the module's forward uses, without advancing spectral norm's power iteration.

    In training mode ``module.weight`` runs one more power iteration and updates u, v; evaluating the
    parametrizations in eval mode instead divides by sigma from the current u, v, which are the ones the last
    training forward used (it iterates before normalising). So a penalty on this is a pure function of the state.
    """
    if not parametrize.is_parametrized(module, "weight"):
        return module.weight
    w = module.parametrizations.weight.original
    for p in module.parametrizations.weight:
        was_training = p.training
        p.train(False)
        try:
            w = p(w)
        finally:
            p.train(was_training)
    return w


def orthogonal_penalty(weights: Iterable[torch.Tensor]) -> torch.Tensor:
    """BigGAN's modified orthogonal regulariser, sum over W of || W W^T * (1 - I) ||_F^2 (W reshaped [out, -1]).

    Only the off-diagonal of the Gram matrix of the rows (filters) is penalised, so rows are pushed to be
    orthogonal without constraining their norms (Brock et al. 2019, eq. 3; the beta factor is the caller's).
    The penalty is exactly 0 for matrices with orthogonal (e.g. orthonormal) rows, up to rounding.
    For tall W (out > in, e.g. G's first linear, 24576 x 20 in the paper model) the out x out Gram matrix would
    not fit in memory, so it uses ||W W^T||_F^2 = ||W^T W||_F^2 and subtracts the diagonal, sum_i ||w_i||^4.
    """
    total = None
    for w in weights:
        w = w.float().reshape(w.shape[0], -1)
        if w.shape[0] <= w.shape[1]:
            gram = w @ w.t()
            term = (gram * (1.0 - torch.eye(w.shape[0], device=w.device, dtype=w.dtype))).square().sum()
        else:
            term = (w.t() @ w).square().sum() - w.square().sum(1).square().sum()
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return total


# --- blocks -------------------------------------------------------------------------------------------------

class ConditionalBatchNorm2d(nn.Module):
    """Batch norm whose per-channel gain and bias are linear in a conditioning vector (BigGAN's ccbn).

    gain = 1 + W_g c and bias = W_b c (no biases, spectral norm, as in BigGAN-PyTorch), so at init with c near
    0 it is plain batch norm. cond_dim 0 (unconditional G without hierarchical z) falls back to learned affine
    batch norm.
    """

    def __init__(self, num_features: int, cond_dim: int):
        super().__init__()
        self.cond_dim = cond_dim
        self.bn = nn.BatchNorm2d(num_features, affine=cond_dim == 0)
        if cond_dim:
            self.gain = _linear(cond_dim, num_features, bias=False)
            self.bias = _linear(cond_dim, num_features, bias=False)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        out = self.bn(x)
        if not self.cond_dim:
            return out
        gain = 1 + self.gain(cond)
        bias = self.bias(cond)
        return out * gain[:, :, None, None] + bias[:, :, None, None]


class SelfAttention(nn.Module):
    """SAGAN self-attention (Zhang et al. 2019) as in BigGAN: 1x1 convs to queries (C/8), keys (C/8) and values
    (C/2), keys and values max-pooled 2x2 to quarter the cost, output gamma * o(attention) + x.

    gamma starts at 0 so the block is the identity at init and the net learns to use attention gradually; gamma
    itself still gets a gradient (d out / d gamma = o(...) != 0), while the conv weights get exact zeros until
    gamma moves -- still a gradient, as DDP without find_unused_parameters needs.
    """

    def __init__(self, ch: int):
        super().__init__()
        self.ch_qk, self.ch_v = max(ch // 8, 1), max(ch // 2, 1)
        self.theta = _conv(ch, self.ch_qk, 1, bias=False)
        self.phi = _conv(ch, self.ch_qk, 1, bias=False)
        self.g = _conv(ch, self.ch_v, 1, bias=False)
        self.o = _conv(self.ch_v, ch, 1, bias=False)
        self.gamma = learned_scalar(0.0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        accept_0dim(state_dict, prefix + "gamma")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        theta = self.theta(x).flatten(2)  # [B, C/8, HW]
        phi = F.max_pool2d(self.phi(x), 2).flatten(2)  # [B, C/8, HW/4]
        g = F.max_pool2d(self.g(x), 2).flatten(2)  # [B, C/2, HW/4]
        # softmax in fp32: under bf16 autocast the logits of HW x HW/4 pairs lose too much precision
        attn = F.softmax(torch.bmm(theta.transpose(1, 2), phi).float(), dim=-1).to(g.dtype)  # [B, HW, HW/4]
        o = self.o(torch.bmm(g, attn.transpose(1, 2)).view(b, self.ch_v, h, w))
        return x + self.gamma * o


class GBlock(nn.Module):
    """BigGAN G residual block: CBN -> ReLU -> 2x nearest upsample -> conv3x3 -> CBN -> ReLU -> conv3x3, plus a
    1x1 conv on the upsampled input (the widths differ or the skip must match the new size)."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int):
        super().__init__()
        self.bn1 = ConditionalBatchNorm2d(c_in, cond_dim)
        self.conv1 = _conv(c_in, c_out)
        self.bn2 = ConditionalBatchNorm2d(c_out, cond_dim)
        self.conv2 = _conv(c_out, c_out)
        self.skip = _conv(c_in, c_out, 1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        h = F.interpolate(F.relu(self.bn1(x, cond)), scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(self.bn2(self.conv1(h), cond)))
        return h + self.skip(F.interpolate(x, scale_factor=2, mode="nearest"))


class DBlock(nn.Module):
    """BigGAN D residual block: [ReLU] -> conv3x3 -> ReLU -> conv3x3 -> [avgpool 2x2].

    The first block ("optimised", Miyato et al. 2018) skips the leading ReLU: on the image it would only cut
    away the negative half of [-1, 1]. The skip is avgpool + 1x1 conv (the two commute, pooling first is
    cheaper), or the identity when the widths match and the resolution is kept, as in BigGAN-PyTorch.
    """

    def __init__(self, c_in: int, c_out: int, preactivation: bool, downsample: bool):
        super().__init__()
        self.preactivation, self.downsample = preactivation, downsample
        self.conv1 = _conv(c_in, c_out)
        self.conv2 = _conv(c_out, c_out)
        self.skip = _conv(c_in, c_out, 1) if c_in != c_out or downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(x) if self.preactivation else x
        h = self.conv2(F.relu(self.conv1(h)))
        if self.downsample:
            h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
        return h + (x if self.skip is None else self.skip(x))


# --- networks -----------------------------------------------------------------------------------------------

class Generator(nn.Module, Checkpointable):
    """BigGAN generator from z [B, z_dim] (and labels [B] when num_classes > 0) to images in [-1, 1].

    hier=True (BigGAN): z is split into num_blocks + 1 chunks (the first ones one longer when z_dim does not
    divide evenly, so z_dim stays as given); chunk 0 -> linear -> 4x4 tensor, chunk i -> block i's conditional
    batch norms, concatenated with the shared class embedding when conditional. hier=False: all of z goes to
    the linear layer and the blocks are conditioned on the class embedding alone (plain batch norm with learned
    affine when also unconditional).
    """
    # read the weights beside forward: a sharding engine (FSDP2) gathers them around these as around forward
    forward_methods = ("orthogonal_penalty",)

    def __init__(self, resolution: int, channels: int, num_classes: int = 0, *, ch: int, z_dim: int,
                 shared_dim: int, attn_res: int, hier: bool = True):
        super().__init__()
        _check_resolution(resolution, channels, num_classes)
        if ch < 1:
            raise ValueError(f"ch must be >= 1, got {ch!r}")
        _check_attn_res(attn_res, _g_block_resolutions(resolution))
        start, widths = _g_arch(resolution)
        n_blocks = len(widths)
        if z_dim < (n_blocks + 1 if hier else 1):
            raise ValueError(f"z_dim must be >= {n_blocks + 1 if hier else 1} (hier: a chunk per block plus one), "
                             f"got {z_dim!r}")
        if num_classes and shared_dim < 1:
            raise ValueError(f"shared_dim must be >= 1 for a conditional generator, got {shared_dim!r}")
        self.resolution, self.channels, self.num_classes = resolution, channels, num_classes
        self.z_dim, self.hier = z_dim, hier

        n_chunks = n_blocks + 1
        self.z_chunks = ([z_dim // n_chunks + (i < z_dim % n_chunks) for i in range(n_chunks)] if hier else [z_dim])
        # One class embedding shared by all blocks (BigGAN's "shared embedding"), not spectrally normalised.
        self.shared = nn.Embedding(num_classes, shared_dim) if num_classes else None
        if self.shared is not None:
            nn.init.orthogonal_(self.shared.weight)
        class_dim = shared_dim if num_classes else 0
        cond_dims = [class_dim + (self.z_chunks[i + 1] if hier else 0) for i in range(n_blocks)]

        self.start_ch = start * ch
        self.linear = _linear(self.z_chunks[0], self.start_ch * 4 * 4)
        c_in = [start * ch] + [m * ch for m in widths[:-1]]
        self.blocks = nn.ModuleList(GBlock(i, m * ch, d) for i, m, d in zip(c_in, widths, cond_dims))
        # attention after the block whose output is attn_res x attn_res (block i outputs 2^(i+3))
        self.attn_index = _g_block_resolutions(resolution).index(attn_res) if attn_res else -1
        self.attn = SelfAttention(widths[self.attn_index] * ch) if attn_res else None
        self.out_bn = nn.BatchNorm2d(widths[-1] * ch)
        self.out_conv = _conv(widths[-1] * ch, channels)

    def checkpoint_blocks(self) -> list[nn.Module]:
        return list(self.blocks)  # train.activation_checkpointing (batch norms, spectral norms: replayed)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if z.dim() != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"z must be [B, {self.z_dim}], got {list(z.shape)}")
        if (labels is None) != (self.num_classes == 0):
            raise ValueError("labels are required iff num_classes > 0" if self.num_classes
                             else "labels must be None for an unconditional generator")
        y = self.shared(labels) if self.shared is not None else None
        if self.hier:
            z0, *chunks = torch.split(z, self.z_chunks, dim=1)
            conds = [c if y is None else torch.cat([y, c], dim=1) for c in chunks]
        else:
            z0, conds = z, [y] * len(self.blocks)
        h = self.linear(z0).view(z.shape[0], self.start_ch, 4, 4)
        for i, (block, cond) in enumerate(zip(self.blocks, conds)):
            h = block(h, cond)
            if i == self.attn_index:
                h = self.attn(h)
        return torch.tanh(self.out_conv(F.relu(self.out_bn(h))))

    def orthogonal_penalty(self) -> torch.Tensor:
        """The modified orthogonal regulariser (see :func:`orthogonal_penalty`; beta is the caller's) over every
        conv and linear weight as used in forward (spectrally normalised), except the conditional batch norms'
        gain / bias layers and the class embedding. 0 when every such weight has orthogonal rows."""
        skip = {id(m) for cbn in self.modules() if isinstance(cbn, ConditionalBatchNorm2d) for m in cbn.modules()}
        return orthogonal_penalty(_weight_in_use(m) for m in self.modules()
                                  if isinstance(m, (nn.Conv2d, nn.Linear)) and id(m) not in skip)


class Discriminator(nn.Module, Checkpointable):
    """BigGAN discriminator: images [B, channels, res, res] -> (logits [B], pooled features h [B, F]).

    logits = linear(h) + sum(embed(y) * h) when conditional -- the projection discriminator (Miyato & Koyama
    2018), which scores class agreement with an inner product instead of concatenating labels to the input.
    z_dim and shared_dim are accepted (so a preset fits both nets) and ignored. An R1 / gradient penalty alone
    gives linear.bias no gradient (it does not depend on x): under DDP add 0 * logits.sum() to such a loss, as
    StyleGAN2-ADA does.
    """

    def __init__(self, resolution: int, channels: int, num_classes: int = 0, *, ch: int, z_dim: int | None = None,
                 shared_dim: int | None = None, attn_res: int):
        super().__init__()
        _check_resolution(resolution, channels, num_classes)
        if ch < 1:
            raise ValueError(f"ch must be >= 1, got {ch!r}")
        block_res = _d_block_resolutions(resolution)
        _check_attn_res(attn_res, block_res)
        self.resolution, self.channels, self.num_classes = resolution, channels, num_classes
        widths, downs = _d_arch(resolution)
        c_in = [channels] + [m * ch for m in widths[:-1]]
        self.blocks = nn.ModuleList(DBlock(i, m * ch, preactivation=k > 0, downsample=d)
                                    for k, (i, m, d) in enumerate(zip(c_in, widths, downs)))
        self.attn_index = block_res.index(attn_res) if attn_res else -1  # first block with that output size
        self.attn = SelfAttention(widths[self.attn_index] * ch) if attn_res else None
        self.features = widths[-1] * ch
        self.linear = _linear(self.features, 1)
        self.embed = _sn(nn.Embedding(num_classes, self.features)) if num_classes else None

    def checkpoint_blocks(self) -> list[nn.Module]:
        return list(self.blocks)  # train.activation_checkpointing

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.channels, self.resolution, self.resolution):
            raise ValueError(f"x must be [B, {self.channels}, {self.resolution}, {self.resolution}], "
                             f"got {list(x.shape)}")
        if (labels is None) != (self.num_classes == 0):
            raise ValueError("labels are required iff num_classes > 0" if self.num_classes
                             else "labels must be None for an unconditional discriminator")
        h = x
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i == self.attn_index:
                h = self.attn(h)
        # global sum pooling, as SNGAN and BigGAN
        h = F.relu(h).sum(dim=(2, 3))
        logits = self.linear(h).squeeze(1)
        if self.embed is not None:
            logits = logits + (self.embed(labels) * h).sum(1)
        return logits, h

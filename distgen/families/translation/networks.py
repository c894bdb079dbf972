"""The networks of image-to-image translation: pix2pix's U-Net (Isola et al. 2017), CycleGAN's ResNet
generator (Zhu et al. 2017, after Johnson et al. 2016), the PatchGAN discriminator both use, and
CycleGAN's history of generated images (Shrivastava et al. 2017).

They follow the reference implementation (junyanz/pytorch-CycleGAN-and-pix2pix, models/networks.py and
util/image_pool.py) layer for layer; where they depart from it, a comment says so and why. Generators
map images in [-1, 1] to images in [-1, 1] (tanh); the discriminator gives a map of logits, one per
overlapping patch of the input.

``norm`` is ``"instance"`` (InstanceNorm2d without affine parameters or running statistics; the convs
before it keep their bias, which the normalisation would otherwise have to stand in for) or ``"batch"``
(BatchNorm2d with its affine parameters; the convs before it have no bias, which its shift makes
redundant) -- the reference's ``get_norm_layer`` and ``use_bias`` logic. pix2pix's paper trains with
batch norm at batch size 1, which is instance norm.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn

from distgen.families.checkpointing import Checkpointable

# Sizes: base channels of the generators (ngf) and the discriminator (ndf). The papers' models use 64.
PRESETS: dict[str, dict[str, dict]] = {
    "unet": {"tiny": dict(ngf=8), "small": dict(ngf=32), "paper": dict(ngf=64)},
    "resnet": {"tiny": dict(ngf=8), "small": dict(ngf=32), "paper": dict(ngf=64)},
    "patch": {"tiny": dict(ndf=8), "small": dict(ndf=32), "paper": dict(ndf=64)},
}
NORMS = ("instance", "batch")


def paper_blocks(resolution: int) -> int:
    """CycleGAN's residual blocks per generator: 6 for 128x128 training images, 9 for 256x256 and higher."""
    return 9 if resolution >= 256 else 6


def init_weights(module: nn.Module) -> nn.Module:
    """The reference's ``init_weights(net, 'normal', gain=0.02)``: conv and linear weights N(0, 0.02),
    their biases 0; batch-norm scales N(1, 0.02), shifts 0 (instance norm here has no parameters)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
    return module


def _norm(kind: str) -> tuple[Callable[[int], nn.Module], bool]:
    """(channels -> normalisation layer, whether the conv before it has a bias)."""
    if kind == "instance":
        return (lambda c: nn.InstanceNorm2d(c, affine=False, track_running_stats=False)), True
    if kind == "batch":
        return nn.BatchNorm2d, False
    raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {kind!r}")


# ---------------------------------------------------------------- pix2pix: U-Net


class _UNetBlock(nn.Module):
    """One level of the U-Net: x -> [x, up(inner(down(x)))] along channels, the skip connection that
    carries x's detail past the bottleneck. The outermost level returns up(...) alone (the image)."""

    def __init__(self, outer: int, inner: int, *, in_ch: Optional[int] = None, sub: Optional[nn.Module] = None,
                 outermost: bool = False, norm: str, dropout: float = 0.0):
        super().__init__()
        make_norm, bias = _norm(norm)
        self.outermost = outermost
        innermost = sub is None
        down = nn.Conv2d(outer if in_ch is None else in_ch, inner, 4, 2, 1, bias=bias)
        # The level below returns its input and its output stacked: twice the channels (not at the bottom).
        up_in = inner if innermost else 2 * inner
        if outermost:
            # No norm on the image-side conv (nor an activation before it); the output conv has its bias.
            layers = [down, sub, nn.ReLU(), nn.ConvTranspose2d(up_in, outer, 4, 2, 1), nn.Tanh()]
        elif innermost:
            # The bottleneck is 1x1: no norm after the down conv (a 1x1 map cannot be instance-normalised,
            # and batch norm over it would be one number per image).
            layers = [nn.LeakyReLU(0.2), down, nn.ReLU(), nn.ConvTranspose2d(up_in, outer, 4, 2, 1, bias=bias),
                      make_norm(outer)]
        else:
            layers = [nn.LeakyReLU(0.2), down, make_norm(inner), sub, nn.ReLU(),
                      nn.ConvTranspose2d(up_in, outer, 4, 2, 1, bias=bias), make_norm(outer)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        self.model = nn.Sequential(*layers)
        self._inner_at = None if sub is None else layers.index(sub)

    @property
    def inner(self) -> Optional["_UNetBlock"]:
        """The next level down (None at the bottleneck); registered only inside ``model``, so that its
        parameters have one name each in a state dict."""
        return None if self._inner_at is None else self.model[self._inner_at]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model(x)
        return y if self.outermost else torch.cat([x, y], 1)


class UNetGenerator(nn.Module):
    """pix2pix's generator: an encoder-decoder halving the image down to 1x1 (``log2(resolution)`` 4x4
    stride-2 convs, LeakyReLU(0.2); channels ngf, 2ngf, 4ngf, 8ngf, 8ngf, ...) and back (ReLU, 4x4 stride-2
    transposed convs), each decoder level also seeing the encoder's map of its size (Ronneberger et al. 2015's
    skip connections: "a great deal of low-level information shared between input and output"), tanh out.

    Dropout (probability ``dropout``; 0 turns it off) follows the decoder's three levels just outside the
    bottleneck, in training and not in eval: the paper's only source of noise, "applied on several layers of
    our generator at both training and test time" -- we keep the usual train/eval switch; a caller wanting
    the paper's test-time noise keeps the module in train mode. At 256 px these are the reference's three
    8ngf levels (its ``use_dropout``); the reference's count shrinks with the resolution (two at 128, none
    at 32), ours stays three (fewer only below 32 px, where the network has fewer levels), so that small
    models keep the noise source.
    """

    def __init__(self, in_channels: int, out_channels: int, resolution: int, *, ngf: int, norm: str = "instance",
                 dropout: float = 0.5):
        super().__init__()
        if resolution < 8 or resolution & (resolution - 1):
            raise ValueError(f"UNetGenerator: resolution must be a power of two >= 8 (the U-Net halves it down to "
                             f"1x1), got {resolution}")
        if not 0 <= dropout < 1:
            raise ValueError(f"UNetGenerator: dropout must be in [0, 1), got {dropout}")
        _norm(norm)
        self.resolution, self.num_downs = resolution, int(math.log2(resolution))
        n = self.num_downs
        ch = [ngf * min(2 ** i, 8) for i in range(n)]  # the encoder's channels, level by level
        dropped = range(max(1, n - 4), n - 1)  # the three levels just outside the bottleneck (n - 1)
        block = _UNetBlock(ch[n - 2], ch[n - 1], norm=norm)
        for i in range(n - 2, 0, -1):
            block = _UNetBlock(ch[i - 1], ch[i], sub=block, norm=norm, dropout=dropout if i in dropped else 0.0)
        self.model = _UNetBlock(out_channels, ch[0], in_ch=in_channels, sub=block, outermost=True, norm=norm)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        k = 2 ** self.num_downs
        if h % k or w % k:
            raise ValueError(f"UNetGenerator: input {h}x{w} is not divisible by 2^{self.num_downs} = {k} "
                             f"(built for resolution {self.resolution})")
        return self.model(x)


# ---------------------------------------------------------------- CycleGAN: ResNet generator


class ResnetBlock(nn.Module):
    """x + F(x), F = reflection pad, 3x3 conv, norm, ReLU, [dropout], reflection pad, 3x3 conv, norm.
    Reflection padding rather than zeros: the CycleGAN paper's choice against border artifacts."""

    def __init__(self, channels: int, *, norm: str, dropout: float = 0.0):
        super().__init__()
        make_norm, bias = _norm(norm)
        layers = [nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3, bias=bias), make_norm(channels), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers += [nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3, bias=bias), make_norm(channels)]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module, Checkpointable):
    """CycleGAN's generator (Johnson et al. 2016's transformation network): a 7x7 conv (reflection padded),
    two 3x3 stride-2 convs (ngf -> 2ngf -> 4ngf), ``blocks`` residual blocks at 1/4 resolution, two 3x3
    stride-2 transposed convs back (the reference's ``resnet_*blocks``, not its resize-conv ``+`` variants),
    and a 7x7 conv to the output, tanh. Fully convolutional: any input whose sides are multiples of 4 and at
    least 8 (reflection padding needs a map wider than its pad)."""

    def __init__(self, in_channels: int, out_channels: int, *, ngf: int, blocks: int, norm: str = "instance",
                 dropout: float = 0.0):
        super().__init__()
        if blocks < 0:
            raise ValueError(f"ResnetGenerator: blocks must be >= 0, got {blocks}")
        if not 0 <= dropout < 1:
            raise ValueError(f"ResnetGenerator: dropout must be in [0, 1), got {dropout}")
        make_norm, bias = _norm(norm)
        stem = [nn.ReflectionPad2d(3), nn.Conv2d(in_channels, ngf, 7, bias=bias), make_norm(ngf), nn.ReLU()]
        for c in (ngf, 2 * ngf):
            stem += [nn.Conv2d(c, 2 * c, 3, 2, 1, bias=bias), make_norm(2 * c), nn.ReLU()]
        self.stem = nn.Sequential(*stem)
        self.blocks = nn.Sequential(*[ResnetBlock(4 * ngf, norm=norm, dropout=dropout) for _ in range(blocks)])
        head = []
        for c in (4 * ngf, 2 * ngf):
            head += [nn.ConvTranspose2d(c, c // 2, 3, 2, 1, output_padding=1, bias=bias), make_norm(c // 2), nn.ReLU()]
        head += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_channels, 7), nn.Tanh()]
        self.head = nn.Sequential(*head)
        init_weights(self)

    def checkpoint_blocks(self) -> list[nn.Module]:
        return list(self.blocks)  # train.activation_checkpointing (dropout, batch norm: replayed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % 4 or w % 4 or min(h, w) < 8:
            raise ValueError(f"ResnetGenerator: input sides must be multiples of 4 and >= 8, got {h}x{w}")
        return self.head(self.blocks(self.stem(x)))


# ---------------------------------------------------------------- PatchGAN


def patch_receptive_field(layers: int) -> int:
    """The side of the input patch each PatchGAN logit sees. Back from one output pixel, a 4x4 stride-1
    conv adds 3 pixels and a 4x4 stride-2 conv maps r to 2r + 2: two stride-1 convs give 7, then ``layers``
    stride-2 ones 2^L * 7 + 2 (2^L - 1) = 9 * 2^L - 2. layers=3: 70 (the paper's 70x70 PatchGAN);
    1: 16; 2: 34; 4: 142."""
    return 9 * 2 ** layers - 2


def patch_output_size(size: int, layers: int) -> int:
    """The logit map's side for an input side ``size``: each 4x4 stride-2 conv (padding 1) maps n to
    floor(n / 2), each 4x4 stride-1 conv n to n - 1; so size // 2^L - 2 (< 1: the input is too small).
    layers=3: 32 -> 2, 64 -> 6, 256 -> 30."""
    return size // 2 ** layers - 2


class PatchDiscriminator(nn.Module):
    """pix2pix's PatchGAN (the reference's NLayerDiscriminator): 4x4 convs, padding 1, LeakyReLU(0.2):
    ``layers`` of stride 2 (ndf channels, no norm on the first; then ndf * min(2^n, 8) with norm), one of
    stride 1 (ndf * min(2^L, 8), norm), and a stride-1 conv to one logit per patch. Each logit sees a
    ``patch_receptive_field(layers)`` square (70x70 at layers=3): the discriminator models only
    high-frequency structure, leaving the low frequencies to the L1 term. forward(x) -> [B, 1, h, w] with
    h = patch_output_size(H, layers); inputs need sides >= 3 * 2^layers (24 at layers=3)."""

    def __init__(self, in_channels: int, *, ndf: int, layers: int = 3, norm: str = "instance"):
        super().__init__()
        if layers < 1:
            raise ValueError(f"PatchDiscriminator: layers must be >= 1, got {layers}")
        make_norm, bias = _norm(norm)
        self.layers = layers
        seq: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = ndf
        for n in range(1, layers):
            c_next = ndf * min(2 ** n, 8)
            seq += [nn.Conv2d(c, c_next, 4, 2, 1, bias=bias), make_norm(c_next), nn.LeakyReLU(0.2)]
            c = c_next
        c_next = ndf * min(2 ** layers, 8)
        seq += [nn.Conv2d(c, c_next, 4, 1, 1, bias=bias), make_norm(c_next), nn.LeakyReLU(0.2),
                nn.Conv2d(c_next, 1, 4, 1, 1)]
        self.net = nn.Sequential(*seq)
        init_weights(self)

    @property
    def receptive_field(self) -> int:
        return patch_receptive_field(self.layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if min(patch_output_size(h, self.layers), patch_output_size(w, self.layers)) < 1:
            raise ValueError(f"PatchDiscriminator: input resolution {h}x{w} is too small for layers={self.layers}: "
                             f"the logit map would be empty; sides must be >= {3 * 2 ** self.layers}")
        return self.net(x)


# ---------------------------------------------------------------- CycleGAN's image pool


class ImagePool:
    """A history of generated images for the discriminator (Shrivastava et al. 2017; CycleGAN keeps 50): the
    reference's util/image_pool.py, image by image in batch order. While the pool holds fewer than ``size``
    images, an image is stored and returned as it is; once full, with probability 1/2 a uniformly drawn
    stored image is returned and the new one takes its slot, else the new one is returned. ``size`` 0:
    the input is returned.

    The full pool's draws stay on the device (no host sync in a training step): every query (size > 0)
    draws B uniforms and then B slots from ``generator`` on its device, whatever the fill, so the stream
    advances the same each step; images still filling the pool ignore theirs. Each image's swap is a 1-row
    index_select / torch.where / index_copy_, in order, so a later image may take the slot an earlier one
    of the same batch just filled, as in the reference. Images are stored detached, on the input's device
    and in its dtype (the pool follows the input if either changes); what query returns is detached, as
    the reference's (it works on ``.data``).
    """

    def __init__(self, size: int):
        if size < 0:
            raise ValueError(f"ImagePool: size must be >= 0, got {size}")
        self.size = size
        self.images: Optional[torch.Tensor] = None  # [n, C, H, W], n <= size

    def __len__(self) -> int:
        return 0 if self.images is None else self.images.shape[0]

    def query(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.size == 0:
            return images
        x = images.detach()
        b = x.shape[0]
        coins = torch.rand(b, generator=generator, device=generator.device).to(x.device)
        slots = torch.randint(self.size, (b,), generator=generator, device=generator.device).to(x.device)
        pool = self.images
        if pool is not None:
            if pool.shape[1:] != x.shape[1:]:
                raise ValueError(f"ImagePool: images of shape {tuple(x.shape[1:])} do not match the pool's "
                                 f"{tuple(pool.shape[1:])}")
            pool = pool.to(device=x.device, dtype=x.dtype)
        n_fill = min(self.size - len(self), b)  # a Python int: the fill needs nothing from the device
        if n_fill > 0:
            new = x[:n_fill].clone()
            pool = new if pool is None else torch.cat([pool, new])
        out = [x[:n_fill]]
        for i in range(n_fill, b):
            idx = slots[i:i + 1]
            swap = coins[i] < 0.5  # a 0-dim device bool: torch.where broadcasts it, no read-back
            stored, current = pool.index_select(0, idx), x[i:i + 1]
            out.append(torch.where(swap, stored, current))
            pool.index_copy_(0, idx, torch.where(swap, current, stored))
        self.images = pool
        return torch.cat(out)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """{"images": [n, C, H, W]} (a copy), n the images held; an empty pool gives a 1-d empty tensor,
        its image shape being unknown until the first query."""
        return {"images": torch.empty(0) if self.images is None else self.images.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        images = state["images"]
        if images.numel() == 0:
            self.images = None
            return
        if images.dim() != 4:
            raise ValueError(f"ImagePool: stored images must be [n, C, H, W], got shape {tuple(images.shape)}")
        if images.shape[0] > self.size:
            raise ValueError(f"ImagePool: the state holds {images.shape[0]} images, more than the pool's size "
                             f"{self.size}")
        self.images = images.detach().clone()

"""The translation networks (pix2pix's U-Net, CycleGAN's ResNet generator, the PatchGAN) and CycleGAN's image
pool: shapes, the skip connections, dropout, the PatchGAN's receptive field from its layer geometry, the
reference's initialisation, and the pool's semantics, determinism and resume."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torch import nn

from distgen.families.translation.networks import (PRESETS, ImagePool, PatchDiscriminator, ResnetBlock,
                                                   ResnetGenerator, UNetGenerator, paper_blocks,
                                                   patch_output_size, patch_receptive_field)

TINY_G, TINY_D = PRESETS["unet"]["tiny"], PRESETS["patch"]["tiny"]


# ---------------------------------------------------------------- shapes and errors


@pytest.mark.parametrize("res", [32, 64])
def test_output_shapes(res):
    torch.manual_seed(0)
    x = torch.randn(2, 3, res, res)
    y = UNetGenerator(3, 1, res, **TINY_G)(x)
    assert y.shape == (2, 1, res, res) and y.abs().max() <= 1
    y = ResnetGenerator(3, 1, **PRESETS["resnet"]["tiny"], blocks=2)(x)
    assert y.shape == (2, 1, res, res) and y.abs().max() <= 1
    d = PatchDiscriminator(3, **TINY_D)(x)
    side = res // 8 - 2  # 32 -> 2, 64 -> 6
    assert d.shape == (2, 1, side, side) and patch_output_size(res, 3) == side


def test_unet_at_256_halves_down_to_1x1():
    torch.manual_seed(0)
    g = UNetGenerator(3, 3, 256, **TINY_G)
    assert g.num_downs == 8
    downs = [m for m in g.modules() if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in downs] == [8, 16, 32, 64, 64, 64, 64, 64]  # capped at 8 ngf
    seen = []
    hook = downs[-1].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert g(torch.randn(1, 3, 256, 256)).shape == (1, 3, 256, 256)
    hook.remove()
    assert seen == [(1, 64, 1, 1)]  # the bottleneck


def test_geometry_errors_name_the_problem():
    for bad in (4, 48, 100):
        with pytest.raises(ValueError, match=f"power of two >= 8.*got {bad}"):
            UNetGenerator(3, 3, bad, ngf=8)
    with pytest.raises(ValueError, match=r"16x16 is too small for layers=3"):
        PatchDiscriminator(3, ndf=8, layers=3)(torch.randn(1, 3, 16, 16))
    assert PatchDiscriminator(3, ndf=8, layers=3)(torch.randn(1, 3, 24, 24)).shape == (1, 1, 1, 1)  # 3 * 2^3
    with pytest.raises(ValueError, match="norm"):
        ResnetGenerator(3, 3, ngf=8, blocks=1, norm="group")
    with pytest.raises(ValueError, match="multiples of 4"):
        ResnetGenerator(3, 3, ngf=8, blocks=1)(torch.randn(1, 3, 30, 30))


# ---------------------------------------------------------------- U-Net: skips, dropout, norms


def test_unet_skip_carries_the_input_past_a_dead_bottleneck():
    """With every level below the outermost zeroed, the output still depends on the input, through the
    outermost skip alone: locally (a 4x4 stride-2 conv, then a 4x4 stride-2 transposed conv), exactly 0 far."""
    torch.manual_seed(0)
    g = UNetGenerator(3, 3, 32, **TINY_G).double().eval()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    (full,) = torch.autograd.grad(g(x)[0, 0, 16, 16], x)
    assert full[0, :, 0, 0].abs().sum() > 0  # the intact network sees the far corner (1x1 bottleneck)
    with torch.no_grad():
        for p in g.model.inner.parameters():
            p.zero_()
    (grad,) = torch.autograd.grad(g(x)[0, 0, 16, 16], x)
    # out row 16 reads rows 7-8 of the 16x16 down map (transposed 4x4, stride 2, pad 1), each reading input
    # rows 2m-1 .. 2m+2: input rows 13..18 (columns alike). Each of those pixels reaches it; nothing else does.
    window = torch.zeros(32, 32, dtype=torch.bool)
    window[13:19, 13:19] = True
    assert (grad[0][:, window] != 0).any(0).all()
    assert (grad[0][:, ~window] == 0).all()


def _dropouts(m):
    return [d for d in m.modules() if isinstance(d, nn.Dropout)]


def test_unet_dropout_in_the_three_levels_above_the_bottleneck():
    # 256 px: the reference's three 8 ngf levels (unet_256 with use_dropout)
    g = UNetGenerator(3, 3, 256, **TINY_G, dropout=0.5)
    blocks, b = [], g.model.inner
    while b is not None:
        blocks.append(b)
        b = b.inner
    with_dropout = [i + 1 for i, b in enumerate(blocks) if _dropouts(b.model[-1:])]
    assert with_dropout == [4, 5, 6]  # levels 0 (outermost) .. 7 (bottleneck)
    for i in with_dropout:
        up = [m for m in blocks[i - 1].model if isinstance(m, nn.ConvTranspose2d)][0]
        assert up.in_channels == 2 * 64 and up.out_channels == 64  # 8 ngf in and out
    assert all(d.p == 0.5 for d in _dropouts(g))
    assert len(_dropouts(UNetGenerator(3, 3, 32, ngf=8, dropout=0.3))) == 3
    assert len(_dropouts(UNetGenerator(3, 3, 8, ngf=8))) == 1  # only 3 levels: one above the bottleneck
    assert not _dropouts(UNetGenerator(3, 3, 64, ngf=8, dropout=0.0))


def test_unet_dropout_is_on_in_train_mode_and_off_in_eval():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    g = UNetGenerator(3, 3, 32, **TINY_G, dropout=0.5)
    g.eval()
    with torch.no_grad():
        assert torch.equal(g(x), g(x))
        g.train()
        assert not torch.equal(g(x), g(x))
        g0 = UNetGenerator(3, 3, 32, **TINY_G, dropout=0.0).train()  # instance norm: no batch statistics kept
        assert torch.equal(g0(x), g0(x))


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_norm_variants_build_run_and_follow_the_reference_bias_rule(norm):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    nets = [UNetGenerator(3, 3, 32, **TINY_G, norm=norm), ResnetGenerator(3, 3, ngf=8, blocks=2, norm=norm),
            PatchDiscriminator(6, **TINY_D, norm=norm)]
    for net in nets:
        y = net(torch.cat([x, x], 1) if isinstance(net, PatchDiscriminator) else x)  # D: input beside output
        assert torch.isfinite(y).all()
        mods = list(net.modules())
        norms = [m for m in mods if isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d))]
        assert norms and all(isinstance(m, nn.BatchNorm2d if norm == "batch" else nn.InstanceNorm2d) for m in norms)
        if norm == "instance":
            assert all(not m.affine and not m.track_running_stats for m in norms)
        # A conv directly followed by a norm has a bias only before instance norm.
        for a, b in zip(mods, mods[1:]):
            if isinstance(a, (nn.Conv2d, nn.ConvTranspose2d)) and isinstance(b, (nn.BatchNorm2d, nn.InstanceNorm2d)):
                assert (a.bias is not None) == (norm == "instance")
    y = nets[0](x)
    y.mean().backward()  # trains
    assert all(p.grad is not None for p in nets[0].parameters())


def test_init_is_the_references_normal_002():
    torch.manual_seed(0)
    g = ResnetGenerator(3, 3, ngf=32, blocks=6, norm="batch")
    w = torch.cat([m.weight.flatten() for m in g.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))])
    # sample std of n N(0, 0.02) draws: within 5 standard errors (0.02 / sqrt(2n))
    assert abs(w.std().item() - 0.02) < 5 * 0.02 / math.sqrt(2 * w.numel()) and abs(w.mean().item()) < 1e-3
    biases = [m.bias for m in g.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.bias is not None]
    assert biases and all(torch.equal(b, torch.zeros_like(b)) for b in biases)
    bn = torch.cat([m.weight for m in g.modules() if isinstance(m, nn.BatchNorm2d)])
    assert abs(bn.mean().item() - 1) < 5 * 0.02 / math.sqrt(bn.numel()) and 0.01 < bn.std().item() < 0.03
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in g.modules() if isinstance(m, nn.BatchNorm2d))


# ---------------------------------------------------------------- ResNet generator


def test_resnet_generator_block_count():
    for blocks in (0, 3, 9):
        g = ResnetGenerator(3, 3, ngf=8, blocks=blocks, dropout=0.5)
        assert len(g.blocks) == blocks == sum(isinstance(m, ResnetBlock) for m in g.modules())
        assert len(_dropouts(g)) == blocks
    assert [paper_blocks(r) for r in (64, 128, 255, 256, 512)] == [6, 6, 6, 9, 9]
    # a residual block with a zeroed body is the identity
    b = ResnetBlock(8, norm="instance")
    with torch.no_grad():
        for p in b.parameters():
            p.zero_()
    x = torch.randn(2, 8, 8, 8)
    assert torch.equal(b(x), x)
    # at any side that is a multiple of 4 (here not a power of two)
    assert ResnetGenerator(3, 3, ngf=8, blocks=1)(torch.randn(1, 3, 36, 44)).shape == (1, 3, 36, 44)


# ---------------------------------------------------------------- PatchGAN receptive field


def _expected_patch_window(d: PatchDiscriminator):
    """From the convs' (kernel, stride, padding): output i reads input rows [i J - offset, i J - offset + rf)."""
    rf, jump, offset = 1, 1, 0
    for m in d.modules():
        if isinstance(m, nn.Conv2d):
            (k, _), (s, _), (p, _) = m.kernel_size, m.stride, m.padding
            rf += (k - 1) * jump
            offset += p * jump
            jump *= s
    return rf, jump, offset


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_patchgan_logit_sees_exactly_its_receptive_field(layers):
    torch.manual_seed(layers)
    # Batch norm in eval mode is a fixed per-channel affine map: no coupling across positions (instance
    # norm's statistics would couple the whole map).
    d = PatchDiscriminator(1, ndf=4, layers=layers, norm="batch").double().eval()
    rf, jump, offset = _expected_patch_window(d)
    assert rf == patch_receptive_field(layers) == {1: 16, 2: 34, 3: 70}[layers] and jump == 2 ** layers
    size = 128
    x = torch.randn(1, 1, size, size, dtype=torch.float64)
    py, px = 40, 101
    x2 = x.clone()
    x2[0, 0, py, px] += 1.0
    with torch.no_grad():
        changed = (d(x) != d(x2))[0, 0]
    side = patch_output_size(size, layers)
    assert changed.shape == (side, side)

    def sees(i, p):
        return i * jump - offset <= p < i * jump - offset + rf
    want = torch.tensor([[sees(i, py) and sees(j, px) for j in range(side)] for i in range(side)])
    assert want.any() and not want.all()
    assert torch.equal(changed, want)


# ---------------------------------------------------------------- image pool


def _tagged(values, shape=(2, 3, 3), dtype=torch.float32):
    """Images filled with one value each: a tag to follow them by."""
    return torch.tensor(values, dtype=dtype).view(-1, 1, 1, 1).expand(-1, *shape).contiguous()


def _tags(images):
    return images[:, 0, 0, 0].tolist()


def _reference_pool(size, pool, batch, coins, slots):
    """util/image_pool.py's loop on tags, with our draws (uniform < 1/2: swap; the slot drawn for the image)."""
    pool, out = list(pool), []
    for i, v in enumerate(batch):
        if len(pool) < size:
            pool.append(v)
            out.append(v)
        elif coins[i] < 0.5:
            out.append(pool[slots[i]])
            pool[slots[i]] = v
        else:
            out.append(v)
    return pool, out


def test_pool_fills_then_swaps_as_the_reference():
    size = 5
    pool, g = ImagePool(size), torch.Generator().manual_seed(0)
    shadow, g_ref = [], torch.Generator().manual_seed(0)
    x = _tagged([1, 2, 3])
    assert torch.equal(pool.query(x, g), x) and len(pool) == 3 and _tags(pool.state_dict()["images"]) == [1, 2, 3]
    torch.rand(3, generator=g_ref), torch.randint(size, (3,), generator=g_ref)  # the first query's draws
    shadow = [1, 2, 3]
    nxt = 4
    for b in (4, 7, 1, 16, 3):
        tags = list(range(nxt, nxt + b))
        nxt += b
        old = list(shadow)
        coins, slots = torch.rand(b, generator=g_ref).tolist(), torch.randint(size, (b,), generator=g_ref).tolist()
        shadow, want = _reference_pool(size, shadow, tags, coins, slots)
        got = _tags(pool.query(_tagged(tags), g))
        assert got == want and _tags(pool.state_dict()["images"]) == shadow and len(pool) == min(size, nxt - 1)
        # each returned image is its input, or one stored before it (in the pool, or earlier in this batch)
        for i, v in enumerate(got):
            assert v == tags[i] or v in old + tags[:i]
        # nothing lost or duplicated: pool + returned == old pool + inputs (+ those that filled the pool, which
        # are both stored and returned), as multisets
        filled = tags[:max(0, size - len(old))]
        assert Counter(shadow + got) == Counter(old + tags + filled)


def test_pool_is_deterministic_detached_and_keeps_dtype():
    outs = []
    for _ in range(2):
        pool, g = ImagePool(4), torch.Generator().manual_seed(7)
        x = torch.randn(6, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0),
                        requires_grad=True)
        outs.append([pool.query(x * 1, g), pool.query(x * 2, g), pool.state_dict()["images"]])
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    assert not outs[0][0].requires_grad and outs[0][2].dtype == torch.float64
    assert not torch.equal(outs[0][1], outs[0][0] * 2)  # some swaps happened


def test_pool_state_round_trip_resumes_exactly():
    a, g = ImagePool(6), torch.Generator().manual_seed(1)
    empty = ImagePool(6)
    empty.load_state_dict(a.state_dict())  # an empty pool's state
    assert len(empty) == 0
    for k in range(3):
        a.query(torch.randn(4, 3, 8, 8), g)
    state = a.state_dict()
    assert state["images"].shape == (6, 3, 8, 8)
    b = ImagePool(6)
    b.load_state_dict(state)
    x = torch.randn(5, 3, 8, 8)
    ga, gb = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    ya, yb = a.query(x, ga), b.query(x, gb)
    assert torch.equal(ya, yb) and torch.equal(a.state_dict()["images"], b.state_dict()["images"])
    assert not torch.equal(state["images"], a.state_dict()["images"])  # a state is a copy, not a view
    with pytest.raises(ValueError, match="more than the pool's size 3"):
        ImagePool(3).load_state_dict(state)
    half = ImagePool(8)  # a partly filled pool resumes filling
    half.load_state_dict({"images": state["images"][:5]})
    assert torch.equal(half.query(x, torch.Generator().manual_seed(0))[:3], x[:3]) and len(half) == 8


def test_pool_size_zero_passes_through():
    pool = ImagePool(0)
    x = torch.randn(3, 1, 4, 4)
    assert pool.query(x, torch.Generator().manual_seed(0)) is x and len(pool) == 0


def test_pool_swap_rate_is_one_half():
    pool, g = ImagePool(10), torch.Generator().manual_seed(3)
    pool.query(_tagged(list(range(10)), shape=(1, 1, 1)), g)
    n, swaps, tag = 2000, 0, 10
    for _ in range(n // 25):
        tags = list(range(tag, tag + 25))
        tag += 25
        swaps += sum(v != t for v, t in zip(_tags(pool.query(_tagged(tags, shape=(1, 1, 1)), g)), tags))
    assert abs(swaps / n - 0.5) < 5 * math.sqrt(0.25 / n), swaps

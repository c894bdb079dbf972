"""ProGAN (arch progan of the GAN family): the fade-in, the equalised learning rate, the growth schedule and its
exact resume, and export / sampling from the command line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distgen import checkpoint as ckpt
from distgen.config import ConfigError, build_config
from distgen.families.base import DataInfo
from distgen.families.gan import GAN, GANConfig, progan
from test_train import family_config, launch, run, weights

TINY = progan.PRESETS["tiny"]


def _nets(resolution=32, seed=0):
    torch.manual_seed(seed)
    return progan.Generator(resolution, 1, **TINY), progan.Discriminator(resolution, 1, **TINY)


# ---------------------------------------------------------------- the networks, in process


@torch.no_grad()
def test_fade_in_blends_the_previous_resolution_and_the_new_block():
    G, D = _nets()
    z, x32 = torch.randn(6, TINY["z_dim"]), torch.randn(6, 1, 32, 32)
    for res in (8, 16, 32):
        level = int(math.log2(res)) - 2
        prev = G(z, res=res // 2, upsample=False)
        zero, one = G(z, res=res, alpha=0.0, upsample=False), G(z, res=res, alpha=1.0, upsample=False)
        # alpha 0: the previous resolution's image, repeated 2x2; alpha 1: something else
        assert torch.equal(zero, prev.repeat_interleave(2, 2).repeat_interleave(2, 3))
        assert not torch.allclose(zero, one)
        assert torch.allclose(G(z, res=res, alpha=0.25, upsample=False), 0.75 * zero + 0.25 * one, atol=1e-5)
        # alpha 1 is the new block's output alone: the previous toRGB's weights do not reach it, and at alpha 0
        # the new block's do not
        old_rgb, new_block = G.to_rgb[level - 1].weight, G.blocks[level - 1].conv1.weight
        saved = old_rgb.clone(), new_block.clone()
        old_rgb.normal_()
        assert torch.equal(G(z, res=res, alpha=1.0, upsample=False), one)
        old_rgb.copy_(saved[0])
        new_block.normal_()
        assert torch.equal(G(z, res=res, alpha=0.0, upsample=False), zero)
        new_block.copy_(saved[1])
        # the discriminator: alpha 0 reads the half-resolution image through the previous fromRGB alone
        xr = progan.box_down(x32, res)
        d0 = D(xr, res=res, alpha=0.0)[0]
        assert torch.allclose(d0, D(F.avg_pool2d(xr, 2), res=res // 2)[0], atol=1e-6)
        new_rgb = D.from_rgb[level].weight
        saved = new_rgb.clone()
        new_rgb.normal_()
        assert torch.equal(D(xr, res=res, alpha=0.0)[0], d0)
        assert not torch.allclose(D(xr, res=res, alpha=1.0)[0], d0)
        new_rgb.copy_(saved)
    # sampling upsamples to the full resolution by repetition
    assert torch.equal(G(z, res=8), G(z, res=8, upsample=False).repeat_interleave(4, 2).repeat_interleave(4, 3))


def test_equalised_learning_rate_scales_by_hes_constant():
    G, D = _nets()
    # gains as networks.py: sqrt(2) for every layer followed by leaky ReLU, 1 for the linear toRGB and output,
    # sqrt(2)/4 for the generator's first dense layer
    special = {id(G.dense): math.sqrt(2) / 4, id(D.out): 1.0, **{id(m): 1.0 for m in G.to_rgb}}
    layers = [m for net in (G, D) for m in net.modules()
              if isinstance(m, (progan.EqualizedConv2d, progan.EqualizedLinear))]
    # G: dense, conv4, 3 blocks of 2 convs, 4 toRGB; D: 4 fromRGB, 3 blocks of 2 convs, conv4, dense, output
    assert len(layers) == (2 + 6 + 4) + (4 + 6 + 3)
    torch.manual_seed(1)
    for m in layers:
        w = m.weight
        fan_in = w[0].numel()
        he = special.get(id(m), math.sqrt(2)) / math.sqrt(fan_in)
        assert m.scale == pytest.approx(he, rel=1e-12)
        # stored weights are N(0, 1): the sample std is within 6 standard errors (1 / sqrt(2n)) of 1
        assert abs(w.std().item() - 1) < 6 / math.sqrt(2 * w.numel())
        x = torch.randn(3, *(w.shape[1:2] if w.dim() == 2 else (w.shape[1], 4, 4)))
        want = F.linear(x, w * he, m.bias) if w.dim() == 2 else F.conv2d(x, w * he, m.bias, padding=w.shape[-1] // 2)
        assert torch.allclose(m(x), want, atol=1e-6)


def test_minibatch_stddev_and_the_real_images_fade():
    x = torch.randn(8, 3, 4, 4)
    y = progan.minibatch_stddev(x, 4)
    # groups of 4 samples n, n + 2, n + 4, n + 6 (networks.py's reshape [G, -1, ...])
    for n in range(8):
        group = x[n % 2::2]
        want = group.var(0, unbiased=False).add(1e-8).sqrt().mean()
        assert torch.allclose(y[n, 3], want.expand(4, 4), atol=1e-6)
    assert torch.equal(y[:, :3], x)
    img = torch.randn(2, 1, 32, 32)
    box = img.reshape(2, 1, 8, 4, 8, 4).mean((3, 5))
    assert torch.allclose(progan.box_down(img, 8), box, atol=1e-6)
    low = progan.box_down(img, 4).repeat_interleave(2, 2).repeat_interleave(2, 3)
    assert torch.allclose(progan.fade_reals(img, 8, 0.0), low, atol=1e-6)
    assert torch.allclose(progan.fade_reals(img, 8, 0.3), 0.7 * low + 0.3 * box, atol=1e-6)


def test_growth_schedule_is_counted_in_images():
    g = lambda kimg: progan.growth(round(kimg * 1000), 32, 1.0, 2.0)  # noqa: E731 (1k stable, 2k fade)
    assert g(0) == (4, 1.0) and g(0.999) == (4, 1.0)
    assert g(1.5) == (8, pytest.approx(0.25)) and g(3) == (8, 1.0) and g(3.9) == (8, 1.0)
    assert g(5) == (16, pytest.approx(0.5)) and g(6.5) == (16, 1.0) and g(8) == (32, pytest.approx(0.5))
    assert g(9) == (32, 1.0)
    assert g(1000) == (32, 1.0)
    assert progan.growth(0, 32, 0.0, 0.0) == (32, 1.0)  # no growth
    # the paper's schedule at 1024x1024: 600k images per stable stage and per fade
    assert progan.growth(600_000 + 300_000, 1024, 600, 600) == (8, pytest.approx(0.5))


def test_progan_config_defaults_and_refusals():
    c = GANConfig(arch="progan")
    assert c.loss_kind == "wgan-gp" and c.drift_weight == 0.001  # the paper's loss and wgan_epsilon
    assert GANConfig(arch="progan", loss="hinge").drift_weight == 0.0
    assert GANConfig(arch="dcgan").loss_kind == "nonsaturating" and GANConfig().drift_weight == 0.0
    for bad, field in [({"arch": "progan", "truncation": 0.7}, "model.truncation"),
                       ({"arch": "dcgan", "batch_sizes": [8]}, "model.batch_sizes"),
                       ({"arch": "progan", "fade_kimg": -1}, "model.fade_kimg")]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            build_config({"model": {"family": "gan", **bad}})
    fam = GAN(c, DataInfo(16, 1, 0))
    with pytest.raises(ValueError, match=r"--truncation: ProGAN \(model.arch progan\) has no truncation"):
        fam.check_sample_options({"truncation": 0.5})
    assert "recompile" in fam.compile_problem("G")
    assert fam.engine_problem(2) is None and "ZeRO-3" in fam.engine_problem(3)  # wgan-gp runs under ZeRO-1/2


# ---------------------------------------------------------------- training runs


def progan_config(tmp_path, manifest, nproc, **model):
    """8x8 images grown from 4x4: 5 steps stable at 4x4, 10 fading in 8x8, 5 at 8x8 (20 steps)."""
    step_kimg = 8 * nproc / 1000
    sections = {"model": {"family": "gan", "arch": "progan", "preset": "tiny", "stable_kimg": 5 * step_kimg,
                          "fade_kimg": 10 * step_kimg, **model},
                "data": {"resolution": 8, "resize": "stretch"},
                "train": {"batch_size": 8, "total_kimg": 20 * step_kimg, "lr": 1e-3, "betas": [0.0, 0.99],
                          "grad_clip": 0, "log_every": 5, "checkpoint_every": 5, "keep_checkpoints": 10},
                "ema": {"halflife_kimg": [0.05], "rampup": 0.5}}
    return family_config(tmp_path, manifest, sections, {})


@pytest.mark.e2e
def test_growth_fade_and_frozen_blocks_follow_the_schedule_and_the_export_samples(tmp_path, fm_test_shards,
                                                                                     env_with_repo, capsys):
    """20 steps: 5 stable at 4x4, a fade of 10 into 8x8, then 8x8 (the exact resume across a fade, with 2 processes
    and per-resolution batch sizes, is test_resume's): the growth state in the checkpoints and the logged means,
    blocks not yet run unchanged; then export and `distgen sample`."""
    straight = progan_config(tmp_path / "a", fm_test_shards, 1)
    run(launch(1) + ["train", str(straight)], env_with_repo)
    a = tmp_path / "a" / "run" / "checkpoints"
    # The growth state: the run's count of images (meta.json's nimg, the growth's clock) and the stage the last
    # step trained at. Step 10 ran after 9 steps' images, 4 of the fade's 10 done; at the end the network is at 8x8.
    n = 8
    meta = ckpt.read_meta(a / "step-00000010")
    mid = meta["family_state"]
    assert meta["nimg"] == 10 * n and mid["res"] == 8 and mid["alpha"] == pytest.approx(0.4)
    meta = ckpt.read_meta(a / "step-00000020")
    end = meta["family_state"]
    assert meta["nimg"] == 20 * n and (end["res"], end["alpha"]) == (8, 1.0) and "nimg" not in end
    recs = [json.loads(l) for l in (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()]
    # logged interval means: steps 1-6 at 4x4 (the fade's start, alpha 0 at 8x8, is the 4x4 network), steps 7-15
    # fading with alpha .1, .2, .., .9, steps 16-20 at 8x8
    assert [r["G/res"] for r in recs] == pytest.approx([4.0, (4 + 4 * 8) / 5, 8.0, 8.0])
    assert [r["G/alpha"] for r in recs] == pytest.approx([1.0, (1 + .1 + .2 + .3 + .4) / 5, 0.7, 1.0])
    assert all(np.isfinite(r["loss/D"]) and np.isfinite(r["D/gp"]) for r in recs)
    # Blocks not yet run stay as they were: at step 5 (4x4 only) the 8x8 block's weights equal their EMA
    # (an average of a constant), while the 4x4 layers have moved away from theirs.
    raw, ema = weights(a / "step-00000005", "G.safetensors"), weights(a / "step-00000005", "ema0-G.safetensors")
    assert torch.equal(raw["blocks.0.conv0.weight"], ema["blocks.0.conv0.weight"])
    assert torch.equal(raw["to_rgb.1.weight"], ema["to_rgb.1.weight"])
    assert not torch.equal(raw["conv4.weight"], ema["conv4.weight"])
    assert ema["growth"].tolist() == [4.0, 1.0]

    # export: the EMA generator with its growth state; `distgen sample` draws 8x8 images from it, the same as
    # from the run folder, and refuses --truncation
    from distgen.cli import main as cli_main

    out = tmp_path / "export"
    run(launch(1) + ["export", str(tmp_path / "a" / "run"), str(out)], env_with_repo)
    assert json.loads((out / "generator_config.json").read_text())["growth"] == [8.0, 1.0]
    assert cli_main(["sample", str(out), "--num", "5", "--seed", "3", "--out", str(tmp_path / "x.npz")]) == 0
    assert cli_main(["sample", str(tmp_path / "a" / "run"), "--num", "5", "--seed", "3",
                     "--out", str(tmp_path / "y.npz")]) == 0
    x, y = np.load(tmp_path / "x.npz")["x"], np.load(tmp_path / "y.npz")["x"]
    assert x.shape == (5, 8, 8, 1) and np.array_equal(x, y) and x.std() > 0
    assert cli_main(["sample", str(out), "--num", "2", "--truncation", "0.5", "--out", str(tmp_path / "t.npz")]) == 2
    assert "--truncation: ProGAN (model.arch progan) has no truncation trick" in capsys.readouterr().err
    assert not (tmp_path / "t.npz").exists()

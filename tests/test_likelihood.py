"""PixelCNN++ and Glow: the likelihood's guarantees checked directly, and training runs as users run them
(2 processes with an exact resume, 1 process with export, sampling and bits/dim)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from distgen import checkpoint as ckpt
from distgen.data import write_shards
from distgen.dist import free_port
from distgen.families import likelihoods as L
from distgen.families.pixelcnn import PixelCNN, PixelCNNConfig, PixelCNNpp
from distgen.families.glow import Glow, squeeze
from distgen.export.native import export
from distgen.sample import SampleError, generate, likelihood_options, load_ema, sampling_options
from glow_ranks import init_on_rank
from test_gan import records
from test_train import family_config, launch, run, weights

RES = 8  # training runs' image side: PixelCNN++ samples one pass per pixel
GRID = torch.arange(256, dtype=torch.float32) / 127.5 - 1  # the 256 pixel values on [-1, 1]


# ---------------------------------------------------------------- the discretised logistic mixture

@pytest.mark.e2e
def test_the_logistic_mixture_sums_to_one_over_the_256_values_of_a_pixel():
    torch.manual_seed(0)
    # grey: 40 pixels of random mixtures, from sharp to flat, means inside and outside [-1, 1]
    params = torch.randn(40, L.logistic_mixture_params(1, 4), 1, 1) * torch.linspace(0.1, 3, 40).view(40, 1, 1, 1)
    x = GRID.view(1, 1, 1, 256).expand(40, 1, 1, 256)
    lp = L.logistic_mixture_log_prob(x, params.expand(-1, -1, 1, 256), 4)
    assert torch.allclose(lp.double().exp().sum(-1).flatten(), torch.ones(40, dtype=torch.float64), atol=1e-5)
    # colour: the joint over all 256^3 values of a pixel, the channels' means depending on the values before
    params = torch.randn(1, L.logistic_mixture_params(3, 2), 1, 1)
    rg = torch.cartesian_prod(GRID, GRID)
    total = 0.0
    for b in GRID:
        x = torch.cat([rg, b.expand(len(rg), 1)], 1)[:, [2, 0, 1], None, None]  # the first channel varies slowest
        total += L.logistic_mixture_log_prob(x, params.expand(len(rg), -1, -1, -1), 2).double().exp().sum().item()
    assert total == pytest.approx(1.0, abs=1e-5)


def test_pixel_sampling_draws_the_modelled_distribution():
    torch.manual_seed(1)
    params = torch.randn(1, L.logistic_mixture_params(1, 3))
    n = 20000
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    x = L.logistic_mixture_sample(params.expand(n, -1), 3, 1, gens)
    assert torch.equal(x, x.mul(127.5).add(127.5).round().div(127.5).sub(1))  # on the grid
    counts = torch.bincount(((x[:, 0] + 1) * 127.5).round().long(), minlength=256).double()
    want = n * L.logistic_mixture_log_prob(GRID.view(1, 1, 1, 256), params.view(1, -1, 1, 1).expand(-1, -1, 1, 256), 3).exp()[0, 0]
    assert want.min() > 5  # every bin expected often enough for Pearson's test
    chi2 = ((counts - want.double()) ** 2 / want.double()).sum().item()
    assert chi2 < 360, chi2  # 255 degrees of freedom: mean 255, sd 22.6; 360 is p ~ 1e-4
    # colour, near-deterministic channels (scale e^-7, a quarter bin): green and blue follow the drawn
    # red through the coefficients
    r, g, b = GRID[191], GRID[140], GRID[60]
    p = torch.zeros(1, L.logistic_mixture_params(3, 1))
    p[0, 1:4] = torch.stack([r, g - 0.5 * r, b + 0.5 * r - 0.5 * g])  # means that land on those values
    p[0, 4:7] = -7.0
    p[0, 7:10] = torch.atanh(torch.tensor([0.5, -0.5, 0.5]))  # coefficients (g|r), (b|r), (b|g)
    x = L.logistic_mixture_sample(p.expand(40, -1), 1, 3, [torch.Generator().manual_seed(i) for i in range(40)])
    hits = (x == torch.stack([r, g, b])).all(1).float().mean()
    assert hits >= 0.85, hits  # each channel leaves its bin with probability 2 / (1 + e^4.3) = 2.7%


@pytest.mark.e2e
def test_pixelcnn_is_causal_and_sees_every_earlier_pixel():
    torch.manual_seed(0)
    for channels, classes in ((1, 0), (3, 4)):
        net = PixelCNNpp(channels, nr_resnet=2, nr_filters=8, nr_mix=2, dropout=0.0, num_classes=classes).eval()
        x = torch.randint(0, 256, (1, channels, 8, 8)).float() / 127.5 - 1
        labels = torch.tensor([1]) if classes else None
        for pos in range(64):
            xx = x.clone().requires_grad_(True)
            net(xx, labels)[0, :, pos // 8, pos % 8].sum().backward()
            seen = xx.grad.abs().sum(1).flatten() > 0
            assert not seen[pos:].any(), f"pixel {pos} depends on itself or a later pixel"
            assert seen[:pos].all(), f"pixel {pos} does not see every earlier pixel"
        # a pass over the first rows gives those rows' outputs unchanged (what sampling relies on)
        full = net(x, labels)
        assert torch.allclose(net(x[:, :, :4], labels), full[:, :, :4], atol=1e-6)
        if classes:
            assert not torch.allclose(net(x, torch.tensor([2])), full)


# ---------------------------------------------------------------- Glow

def _glow(dtype=torch.float32, classes=0):
    torch.manual_seed(0)
    net = Glow(1, 8, levels=2, steps=2, hidden=8, num_classes=classes).to(dtype)
    y = torch.rand(6, 1, 8, 8, dtype=dtype) - 0.5
    labels = torch.tensor([0, 1, 2, 0, 1, 2]) if classes else None
    net.data_init(y, labels)
    with torch.no_grad():  # away from the identity-like start, so nothing is trivially invertible
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net, y, labels


def test_glow_inverts_and_its_log_determinant_is_the_jacobians():
    net, y, labels = _glow(classes=3)
    zs, logdet, logp = net.encode(y, labels)
    assert [tuple(z.shape[1:]) for z in zs] == net.z_shapes == [(2, 4, 4), (8, 2, 2)]
    # log p(y) = the priors' log densities (checked against torch.distributions) + log |det|
    normal = torch.distributions.Normal
    h = squeeze(y)
    for step in net.levels[0]:
        h, _ = step(h)
    kept, split = h.chunk(2, 1)
    assert torch.equal(split, zs[0])
    mean, logs = net.priors[0](kept).chunk(2, 1)
    want = normal(mean, logs.exp()).log_prob(split).flatten(1).sum(1)
    mean, logs = (net.top + net.class_prior(labels)[:, :, None, None]).chunk(2, 1)
    want = want + normal(mean, logs.exp()).log_prob(zs[1]).flatten(1).sum(1)
    assert torch.allclose(logp, want, rtol=1e-5) and torch.allclose(net(y, labels), logp + logdet)
    assert (net.decode(zs, labels) - y).abs().max() < 1e-4
    net64, y64, _ = _glow(torch.float64)
    logdet = net64.encode(y64[:2])[1]

    def flat(v):
        return torch.cat([z.flatten() for z in net64.encode(v.view(1, 1, 8, 8))[0]])

    for i in range(2):
        jac = torch.autograd.functional.jacobian(flat, y64[i].flatten())
        assert logdet[i].item() == pytest.approx(torch.linalg.slogdet(jac)[1].item(), abs=1e-8)
    # temperature 0: every latent at its prior's mean, so one image per class
    eps = [torch.randn(6, *s) for s in net.z_shapes]
    cold = net.decode(labels=labels, eps=eps, temperature=0.0)
    assert torch.allclose(cold[0], cold[3], atol=1e-6) and not torch.allclose(cold[0], cold[1], atol=1e-4)


@pytest.mark.e2e
def test_actnorm_initialisation_is_the_same_on_two_processes_and_uses_the_global_batch(tmp_path):
    mp.spawn(init_on_rank, args=(free_port(), str(tmp_path)), nprocs=2)
    a, b = (torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1))
    norms = [k for k in a if k.endswith((".norm.bias", ".norm.logs"))]
    assert len(norms) == 2 * 2 * 2 * 3  # levels x steps x (bias, logs) x (step's + coupling's two)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # one process initialised on both ranks' batches together gets the same actnorm
    torch.manual_seed(0)
    one = Glow(1, 8, levels=2, steps=2, hidden=8)
    y = torch.cat([torch.rand(3 + r, 1, 8, 8, generator=torch.Generator().manual_seed(10 + r)) - 0.5 for r in (0, 1)])
    one.data_init(y)
    for k in norms:
        assert torch.allclose(one.state_dict()[k], a[k], atol=1e-5), k
    # the first actnorm of the global batch: zero mean and unit variance per channel
    out, _ = one.levels[0][0].norm(squeeze(y))
    per_channel = out.transpose(0, 1).flatten(1)
    assert per_channel.mean(1).abs().max() < 1e-5 and (per_channel.std(1, unbiased=False) - 1).abs().max() < 1e-3


def test_config_errors_name_the_field():
    from distgen.config import ConfigError, build_config
    from distgen.families.base import DataInfo
    from distgen.families.glow import GlowConfig, GlowFamily

    for model, field in [({"family": "pixelcnn", "dropout": 1.0}, "model.dropout"),
                         ({"family": "pixelcnn", "nr_mix": 0}, "model.nr_mix"),
                         ({"family": "glow", "temperature": -1}, "model.temperature"),
                         ({"family": "glow", "coupling": "spline"}, "model.coupling")]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            build_config({"model": model})
    with pytest.raises(ConfigError, match=r"data.resolution: .* multiple of 4, got 30"):
        PixelCNN(PixelCNNConfig(), DataInfo(30, 1, 0))
    with pytest.raises(ConfigError, match=r"model.levels: 3 level.* multiple of 8, got 28"):
        GlowFamily(GlowConfig(levels=3), DataInfo(28, 1, 0))
    with pytest.raises(ConfigError, match="model.conditional"):
        GlowFamily(GlowConfig(conditional=True), DataInfo(28, 1, 0))


# ---------------------------------------------------------------- training runs

def lik_config(tmp_path, manifest, model: dict, **over):
    sections = {"model": {"preset": "tiny", **model},
                "data": {"resolution": RES, "resize": "stretch", "labels": bool(model.get("conditional"))},
                "train": {"batch_size": 8, "total_kimg": 0.16, "lr": 2e-3, "log_every": 2, "checkpoint_every": 10},
                "ema": {"halflife_kimg": [0.05], "rampup": 0.5}}
    return family_config(tmp_path, manifest, sections, over)


NETS = {"pixelcnn": {"family": "pixelcnn", "dropout": 0.5}, "glow": {"family": "glow"}}


def _bpd_direct(family, nets, x, labels, per_shard, seed=0, **options):
    from distgen.dist import derive_seed

    # an evaluation pass keys image i by (shard << 32) | position in the shard
    gens = [torch.Generator().manual_seed(derive_seed(seed, (i // per_shard << 32) | (i % per_shard)))
            for i in range(len(x))]
    logp = family.log_likelihood(nets, torch.from_numpy(x).permute(0, 3, 1, 2), labels, gens, **options)
    return float(-logp.sum()) / (x[..., 0].size * math.log(2))


@pytest.mark.parametrize("family", list(NETS))
@pytest.mark.e2e
def test_one_process_run_exports_samples_and_reports_bits_per_dim(family, tmp_path, fm_test_shards, env_with_repo):
    model = {**NETS[family], "conditional": True}
    cfg = lik_config(tmp_path, fm_test_shards, model, train={"total_kimg": 0.08})
    run(launch(1) + ["train", str(cfg)], env_with_repo)
    recs = records(tmp_path / "run")  # (the exact resume of both, with 2 processes, is test_resume's)
    assert all(0 < r["loss"] < 16 for r in recs)  # bits per dimension of 8-bit data, from the start
    assert recs[-1]["loss"] < recs[0]["loss"]
    out = export(tmp_path / "run", tmp_path / "export")
    fam, nets, _ = load_ema(out)
    ema = weights(ckpt.checkpoint_folders(tmp_path / "run" / "checkpoints")[-1], f"ema0-{family}.safetensors")
    assert all(torch.equal(v, ema[k]) for k, v in nets[family].state_dict().items())

    options = {"temperature": 0.7} if family == "glow" else {}
    mine = generate(fam, nets, 5, seed=3, options=options)
    assert len({mine[i][0].tobytes() for i in range(5)}) == 5 and [mine[i][1] for i in range(5)] == [0, 1, 2, 3, 4]
    if family == "pixelcnn":  # the command gives the same images (one launch: the suite's time budget)
        run(launch(1) + ["sample", str(out), "--num", "5", "--seed", "3", "--out", str(tmp_path / "s.npz")],
            env_with_repo)
        got = np.load(tmp_path / "s.npz")
        assert got["x"].shape == (5, RES, RES, 1) and np.array_equal(got["x"], np.stack([mine[i][0] for i in range(5)]))
    else:
        # temperature 0: every latent at its prior's mean, one image per class (images 0 and 10 share a class)
        cold = generate(fam, nets, 11, seed=3, options={"temperature": 0.0})
        assert np.array_equal(cold[0][0], cold[10][0]) and not np.array_equal(cold[0][0], cold[1][0])
    if family == "pixelcnn":
        with pytest.raises(SampleError, match="takes no sampling option --temperature"):
            sampling_options(fam, {"temperature": 0.5})
    with pytest.raises(SampleError, match=r"'s likelihood takes no option --iw-samples \(it takes: none\)"):
        likelihood_options(fam, {"iw_samples": 4})

    # bits/dim of a small labelled test split: the command's figure is the direct sum over its images
    from PIL import Image
    from test_eval import _fm_images

    x, y = _fm_images(21, offset=500)
    xs = np.stack([np.asarray(Image.fromarray(i).resize((RES, RES))) for i in x])
    np.savez(tmp_path / "t.npz", x=xs, y=y)
    write_shards(f"npz:{tmp_path / 't.npz'}", tmp_path / "t", "test", samples_per_shard=8)
    res = tmp_path / "bpd.json"
    r = run(launch(1) + ["eval", str(out), "--metrics", "bpd", "--test", str(tmp_path / "t" / "test.manifest.json"),
                         "--out", str(res)], env_with_repo)
    assert "bits/dim" in r.stdout
    got = json.loads(res.read_text())
    assert got["bpd_images"] == 21 and got["bpd_kind"] == ("exact" if family == "pixelcnn" else "bound")
    want = _bpd_direct(fam, nets, xs[..., None], torch.from_numpy(y), per_shard=8)
    assert got["bpd"] == pytest.approx(want, rel=1e-6) and 0 < got["bpd"] < 16

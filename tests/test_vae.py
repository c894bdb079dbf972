"""The VAE family: the bound's pieces checked directly, and training runs as users run them
(2 processes with an exact resume, 1 process with export, sampling, bits/dim and reconstructions)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from distgen import checkpoint as ckpt
from distgen.data import write_shards
from distgen.evaluate.recon import psnr, ssim
from distgen.families.vae import gaussian_kl, gaussian_log_density
from distgen.export.native import export
from distgen.sample import generate, load_ema, to_uint8
from test_gan import records
from test_likelihood import RES, lik_config
from test_train import launch, run, weights


def test_analytic_kl_equals_a_monte_carlo_estimate():
    g = torch.Generator().manual_seed(0)
    qm, qlogs = torch.randn(1, 6, generator=g), 0.4 * torch.randn(1, 6, generator=g)
    pm, plogs = torch.randn(1, 6, generator=g), 0.4 * torch.randn(1, 6, generator=g)
    z = qm + torch.exp(qlogs) * torch.randn(400000, 6, generator=g, dtype=torch.float64)
    terms = gaussian_log_density(z, qm, qlogs) - gaussian_log_density(z, pm, plogs)
    se = terms.std() / len(terms) ** 0.5
    assert abs(terms.mean() - gaussian_kl(qm, qlogs, pm, plogs)[0]) < 4 * se


def test_psnr_and_ssim():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 250, (2, 1, 16, 16), generator=g).to(torch.uint8)
    assert torch.allclose(psnr(a, a + 2), torch.full((2,), 10 * np.log10(255 ** 2 / 4), dtype=torch.float64))
    assert torch.allclose(ssim(a, a), torch.ones(2, dtype=torch.float64))
    b = (a.double() + 20 * torch.randn(a.shape, generator=g, dtype=torch.float64)).clamp(0, 255).round().to(torch.uint8)
    # Wang et al.'s formula window by window, written out
    w1 = torch.exp(-(torch.arange(11, dtype=torch.float64) - 5) ** 2 / 4.5)
    w = torch.outer(w1, w1) / w1.sum() ** 2
    x, y = a[0, 0].double(), b[0, 0].double()
    vals = []
    for i in range(6):
        for j in range(6):
            px, py = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cxy = (w * (px - mx) * (py - my)).sum()
            c1, c2 = 6.5025, 58.5225
            vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    assert ssim(a, b)[0].item() == pytest.approx(torch.stack(vals).mean().item(), abs=1e-9)
    assert 0 < ssim(a, b)[0] < 1


def test_the_kl_warm_up_beta_and_the_stabiliser_in_the_shared_runs(trained):
    """The shared 2-process runs (their exact resume is test_resume's): beta weights the KL; the KL weight ramps from
    0 to 1 over the warm-up; VDVAE's stabiliser held the same updates in the straight and the resumed run and, as in
    VDVAE, the EMA does not step on a held one (what is checked of the held count holds for any count: it depends
    on the network's gradients)."""
    root, _ = trained
    ra = records(root / "vae-a")
    assert all(0 < r["loss"] < 30 and np.isfinite(r["elbo/kl_bpd"]) for r in ra)
    assert all(r["elbo/kl_weight"] == 2.0 for r in ra)  # beta
    ra, rb = records(root / "hvae-stabilised-a"), records(root / "hvae-stabilised-b")
    a, b = (root / f"hvae-stabilised-{x}" / "checkpoints" / "step-00000006" for x in "ab")
    ma, mb = ckpt.read_meta(a), ckpt.read_meta(b)
    # the warm-up reads the run's own count of images (meta.json's nimg): the family keeps none
    assert ma["family_state"] == mb["family_state"] == {} and ma["nimg"] == mb["nimg"] == 6 * 8
    assert ra[0]["elbo/kl_weight"] < 1 and ra[-1]["elbo/kl_weight"] == 1.0  # 20 images of warm-up
    held = ra[-1]["skipped_updates_total"]
    assert held == rb[-1]["skipped_updates_total"] and ma["ema_steps"] == mb["ema_steps"] == {"vae": [6 - held] * 2}


def test_every_update_held_leaves_the_initial_weights(tmp_path, fm_test_shards):
    """skip_grad_norm 1e-20: a norm is at most that only if every gradient is (about) zero, which the
    reconstruction term's gradient w.r.t. the decoder's output (a mean of per-pixel derivatives of a non-constant
    likelihood over real images) rules out, so every update is held: the weights are still the initial ones, which
    the EMA started from and never stepped away from."""
    from distgen.cli import main as cli_main

    cfg = lik_config(tmp_path, fm_test_shards, {"family": "vae", "arch": "hvae"},
                     train={"total_kimg": 0.08, "skip_grad_norm": 1e-20})
    assert cli_main(["train", str(cfg)]) == 0
    last = tmp_path / "run" / "checkpoints" / "step-00000010"
    assert records(tmp_path / "run")[-1]["skipped_updates_total"] == 10
    assert ckpt.read_meta(last)["ema_steps"] == {"vae": [0]}
    w, ema = weights(last, "vae.safetensors"), weights(last, "ema0-vae.safetensors")
    assert w.keys() == ema.keys() and all(torch.equal(w[k], ema[k]) for k in w)


@pytest.mark.e2e
def test_export_sampling_bits_per_dim_reconstructions_and_interpolation(tmp_path, fm_test_shards, env_with_repo):
    """A trained hierarchical VAE through the commands users run, and the bound's two forms on it."""
    hvae = {"family": "vae", "arch": "hvae", "free_bits": 0.05, "kl_warmup_kimg": 0.04}
    cfg = lik_config(tmp_path, fm_test_shards, hvae, train={"total_kimg": 0.32, "lr": 3e-3})
    run(launch(1) + ["train", str(cfg)], env_with_repo)
    out = export(tmp_path / "run", tmp_path / "export")
    fam, nets, _ = load_ema(out)
    run(launch(1) + ["sample", str(out), "--num", "4", "--temperature", "0.5", "--out", str(tmp_path / "s.npz")],
        env_with_repo)
    got = np.load(tmp_path / "s.npz")["x"]
    mine = generate(fam, nets, 4, options={"temperature": 0.5})
    assert got.shape == (4, RES, RES, 1) and np.array_equal(got, np.stack([mine[i][0] for i in range(4)]))
    cold = generate(fam, nets, 2, options={"temperature": 0.0})
    assert np.array_equal(cold[0][0], cold[1][0])  # temperature 0: the prior's mean for every seed

    from PIL import Image
    from test_eval import _fm_images

    x, y = _fm_images(24, offset=700)
    xs = np.stack([np.asarray(Image.fromarray(i).resize((RES, RES))) for i in x])
    np.savez(tmp_path / "t.npz", x=xs, y=y)
    write_shards(f"npz:{tmp_path / 't.npz'}", tmp_path / "t", "test", samples_per_shard=10)
    test = str(tmp_path / "t" / "test.manifest.json")
    run(launch(1) + ["eval", str(out), "--metrics", "bpd,recon", "--test", test, "--iw-samples", "20",
                     "--out", str(tmp_path / "e.json")], env_with_repo)
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["bpd_images"] == res["recon_images"] == 24 and res["bpd_iw_samples"] == 20
    assert 10 < res["psnr"] < 40 and 0 < res["ssim"] < 1
    # the command's figure is the direct sum with the evaluation's per-image seeds; the ELBO is looser
    from test_likelihood import _bpd_direct

    assert res["bpd"] == pytest.approx(_bpd_direct(fam, nets, xs[..., None], None, per_shard=10, iw_samples=20),
                                       rel=1e-6)
    assert res["bpd"] < _bpd_direct(fam, nets, xs[..., None], None, per_shard=10, iw_samples=1)

    # The bound's two forms on this trained model: k = 1 of the importance-weighted bound is the single-draw
    # ELBO, whose mean is the closed-form-KL ELBO; more samples give a larger bound.
    imgs = torch.from_numpy(xs)[:, None]
    xt = fam.lik.target(imgs.float() / 127.5 - 1)
    # With the same posterior draws, the two differ by KL - (log q - log p), zero in expectation.
    seeds = lambda r: [torch.Generator().manual_seed(1000 * r + i) for i in range(24)]  # noqa: E731
    gap = torch.stack([fam.log_likelihood(nets, imgs, None, seeds(r), iw_samples=1) - fam.iw_bound(nets, xt, seeds(r), 1)
                       for r in range(200)])
    assert gap.abs().max() > 1e-3  # the draws differ ...
    assert (gap.mean(0).abs() < 5 * gap.std(0) / 200 ** 0.5 + 1e-6).all()  # ... and agree on average
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(24)]  # noqa: E731
    bounds = [fam.iw_bound(nets, xt, gens(), k).mean().item() for k in (1, 10, 100)]
    assert bounds[0] < bounds[1] < bounds[2]

    # Interpolation through the command: both ends are the images' reconstructions from every group's
    # posterior mean ...
    from PIL import Image

    for i in (0, 1):
        Image.fromarray(xs[i]).save(tmp_path / f"{i}.png")
    run(launch(1) + ["sample", str(out), "--interpolate", str(tmp_path / "0.png"), str(tmp_path / "1.png"),
                     "--num", "5", "--out", str(tmp_path / "i.npz")], env_with_repo)
    inter = np.load(tmp_path / "i.npz")["x"]
    net = nets["vae"]
    ends = to_uint8(fam.lik.mean(net.decode_latents(net.posterior_means(xt[:2]))))
    assert inter.shape == (5, RES, RES, 1) and np.array_equal(inter[[0, -1]], ends)
    # ... which is the training forward pass with the posterior noise switched off (each group's log-scale
    # pinned at its floor, e^-10)
    import copy

    still = copy.deepcopy(net)
    for block in (b for level in still.dec for b in level):
        zdim = block.zdim
        block.enc.c4.weight.data[zdim:] = 0
        block.enc.c4.bias.data[zdim:] = -100
    fwd = still(xt[:2], [torch.Generator().manual_seed(i) for i in (0, 1)])["out"]
    means = still.decode_latents(still.posterior_means(xt[:2]))
    assert (fwd - means).abs().max() < 1e-3 and (means - net.decode_latents(net.posterior_means(xt[:2]))).abs().max() == 0
    # a file that is not an image is refused by name, before anything is written (the command's function, here)
    from distgen.sample import SampleError, sample_command

    with pytest.raises(SampleError, match=f"{cfg}: not a readable image"):
        sample_command(str(out), 5, str(tmp_path / "j.npz"), interpolate=(str(tmp_path / "0.png"), str(cfg)))
    assert not (tmp_path / "j.npz").exists()


def test_conv_vae_interpolates_between_posterior_means():
    from distgen.families.base import DataInfo
    from distgen.families.vae import VAEConfig, VAEFamily

    torch.manual_seed(0)
    fam = VAEFamily(VAEConfig(arch="vae", preset="tiny"), DataInfo(12, 1, 0))
    net = fam.build_networks()["vae"]
    imgs = torch.randint(0, 256, (2, 1, 12, 12), dtype=torch.uint8)
    path = fam.interpolate({"vae": net}, imgs[0], imgs[1], steps=3)
    qm = net.posterior(fam.lik.target(imgs.float() / 127.5 - 1))[0]
    assert torch.allclose(path, fam.lik.mean(net.decode(torch.stack([qm[0], (qm[0] + qm[1]) / 2, qm[1]]))), atol=1e-6)

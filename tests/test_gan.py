"""The GAN family: its regularisers against direct autograd, its networks' guarantees, and training
runs as users run them (1 and 2 processes, DeepSpeed, resume, export, sampling, evaluation)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from distgen import checkpoint as ckpt
from distgen.families.base import DataInfo
from distgen.families.gan import ARCHS, GAN, GANConfig, basic, biggan, losses, stylegan2
from distgen.families.gan.augment import ADA, OPS, augment
from distgen.sample import generate, load_ema
from test_train import family_config, launch, run, weights

# ---------------------------------------------------------------- regularisers and networks, in process


def _mlp_critic(seed=0):
    torch.manual_seed(seed)
    return basic.MLPDiscriminator(8, 1, hidden=32, z_dim=0)


def test_gradient_penalty_equals_a_direct_autograd_computation():
    d = _mlp_critic()
    real, fake = torch.randn(5, 1, 8, 8), torch.randn(5, 1, 8, 8)
    gp = losses.gradient_penalty(lambda x: d(x)[0], real, fake, torch.Generator().manual_seed(3))
    eps = torch.rand(5, 1, 1, 1, generator=torch.Generator().manual_seed(3))
    want = []
    for i in range(5):  # one image at a time: d/dx of that image's score alone
        x = (eps[i] * real[i:i + 1] + (1 - eps[i]) * fake[i:i + 1]).requires_grad_(True)
        (g,) = torch.autograd.grad(d(x)[0].sum(), x)
        want.append((g.norm() - 1) ** 2)
    assert torch.allclose(gp, torch.stack(want), rtol=1e-5, atol=1e-7)
    assert gp.requires_grad  # it trains the critic (double backward)
    gp.sum().backward()
    assert d.net[0].weight.grad.abs().sum() > 0


def test_r1_equals_a_direct_autograd_computation():
    d = _mlp_critic(1)
    x = torch.randn(4, 1, 8, 8, requires_grad=True)
    r1 = losses.r1_penalty(d(x)[0], x)
    for i in range(4):
        xi = x[i:i + 1].detach().requires_grad_(True)
        (g,) = torch.autograd.grad(d(xi)[0].sum(), xi)
        assert r1[i].item() == pytest.approx(g.square().sum().item(), rel=1e-5)


def test_losses_are_the_papers_formulas():
    r, f = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    sig = torch.sigmoid
    assert torch.allclose(losses.d_loss("minimax", r, f), -torch.log(sig(r)) - torch.log(1 - sig(f)), atol=1e-6)
    assert torch.allclose(losses.g_loss("minimax", f), torch.log(1 - sig(f)), atol=1e-6)
    assert torch.allclose(losses.g_loss("nonsaturating", f), -torch.log(sig(f)), atol=1e-6)
    assert torch.equal(losses.d_loss("hinge", r, f), torch.tensor([0.0 + 1.5, 2.0 + 0.0]))
    assert torch.equal(losses.d_loss("wgan-gp", r, f), f - r) and torch.equal(losses.g_loss("wgan", f), -f)


def test_spectral_norm_bounds_the_largest_singular_value():
    torch.manual_seed(0)
    nets = [biggan.Discriminator(16, 1, 10, **biggan.PRESETS["tiny"]),
            biggan.Generator(16, 1, 10, **biggan.PRESETS["tiny"]),
            basic.DCGANDiscriminator(16, 1, ch=8, z_dim=0, spectral=True)]
    checked = 0
    for net in nets:
        for m in net.modules():
            if hasattr(m, "parametrizations") and "weight" in m.parametrizations:
                with torch.no_grad():
                    m.parametrizations.weight.original.mul_(10)  # far above 1 without the normalisation
                checked += 1
        x = torch.randn(4, 1, 16, 16) if not isinstance(net, biggan.Generator) else None
        for _ in range(20):  # power iterations run in training-mode forwards
            if x is None:
                net(torch.randn(4, net.z_dim), torch.randint(0, 10, (4,)))
            else:
                net(x, torch.randint(0, 10, (4,)) if not isinstance(net, basic.DCGANDiscriminator) else None)
        for m in net.modules():
            if hasattr(m, "parametrizations") and "weight" in m.parametrizations:
                w = m.weight.detach()
                raw = m.parametrizations.weight.original.detach()
                assert torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), ord=2) <= 1.0 + 1e-2
                assert torch.linalg.matrix_norm(raw.reshape(raw.shape[0], -1), ord=2) > 2
    assert checked > 10


def test_orthogonal_regularisation_is_zero_for_orthogonal_matrices():
    q, _ = torch.linalg.qr(torch.randn(32, 16))
    assert biggan.orthogonal_penalty([q.T]).item() == pytest.approx(0.0, abs=1e-6)  # orthonormal rows
    assert biggan.orthogonal_penalty([torch.randn(16, 32)]).item() > 1
    g = biggan.Generator(16, 1, 0, **biggan.PRESETS["tiny"])
    assert g.orthogonal_penalty().item() > 0


def test_stylegan2_truncation_and_mixing():
    torch.manual_seed(0)
    g = stylegan2.Generator(16, 1, 0, **stylegan2.PRESETS["tiny"]).eval()
    z = torch.randn(3, g.z_dim)
    with torch.no_grad():
        a = g(z, truncation=0.0)
        assert torch.allclose(a[0], a[1], atol=1e-5) and torch.allclose(a[0], a[2], atol=1e-5)  # all at w_avg
        full = g(z)
        assert not torch.allclose(full[0], full[1])
        same = g(z, mix_z=torch.randn(3, g.z_dim), mix_cutoff=torch.full((3,), g.num_ws))
        assert torch.equal(same, full)  # cutoff at num_ws: no mixing
        mixed = g(z, mix_z=torch.randn(3, g.z_dim), mix_cutoff=torch.full((3,), 1))
        assert not torch.allclose(mixed, full)


def test_augmentations_are_exact_and_differentiable():
    x = torch.randn(6, 3, 16, 16, requires_grad=True)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(augment(x, OPS, 0.0, g), x)  # p = 0: untouched
    y = augment(x, ("translation",), 1.0, g)
    padded = torch.nn.functional.pad(x.detach(), (2, 2, 2, 2))
    for i in range(6):  # exactly the image shifted by whole pixels (up to 1/8 of the size), zeros shifted in
        shifts = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                  if torch.equal(y[i].detach(), padded[i, :, 2 - dy:18 - dy, 2 - dx:18 - dx])]
        assert len(shifts) == 1, i
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_ada_moves_p_by_the_heuristic():
    ada = ADA(target=0.6, interval=2, speed_kimg=0.1)  # 100 images move p by 1
    reduce = lambda v: v  # noqa: E731 - one process
    ada.observe(torch.ones(10), reduce)
    assert ada.p == 0  # updates every 2 observations
    ada.observe(torch.ones(10), reduce)  # r_t = 1 > 0.6: overfitting, more augmentation
    assert ada.p == pytest.approx(0.2)
    ada.observe(-torch.ones(10), reduce)
    ada.observe(-torch.ones(10), reduce)  # r_t = -1: less
    assert ada.p == pytest.approx(0.0)


def test_config_errors_name_the_field(fm_test_shards):
    from distgen.config import ConfigError, build_config

    for bad, field in [({"arch": "dcgan", "pl_weight": 1.0}, "model.pl_weight"),
                       ({"arch": "mlp", "ortho_weight": 1e-4}, "model.ortho_weight"),
                       ({"d_steps": 0}, "model.d_steps"), ({"augment_ops": ["rotate"]}, "model.augment_ops"),
                       ({"arch": "dcgan", "attn_res": 8}, "model.attn_res")]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            build_config({"model": {"family": "gan", **bad}})
    with pytest.raises(ConfigError, match="data.resolution"):
        GAN(GANConfig(arch="dcgan"), DataInfo(28, 1, 10))
    with pytest.raises(ConfigError, match="model.conditional"):
        GAN(GANConfig(conditional=True), DataInfo(32, 1, 0))
    with pytest.raises(ConfigError, match=r"model.attn_res: must be one of \[0, 8, 16\]"):
        GAN(GANConfig(arch="biggan", attn_res=32), DataInfo(32, 1, 0))


# ---------------------------------------------------------------- training runs


def gan_config(tmp_path, manifest, model: dict, **over):
    sections = {"model": {"family": "gan", "preset": "tiny", **model},
                "data": {"resolution": 16, "resize": "stretch", "labels": bool(model.get("conditional"))},
                "train": {"batch_size": 8, "total_kimg": 0.16, "lr": 2e-3, "betas": [0.5, 0.99], "grad_clip": 0,
                          "log_every": 2, "checkpoint_every": 10},
                "ema": {"halflife_kimg": [0.05], "rampup": 0.5}}
    return family_config(tmp_path, manifest, sections, over)


def records(run_dir):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


# Every network and every loss at least once, with the regularisers and options spread over them.
MATRIX = {
    "mlp-minimax-conditional-infogan": {"arch": "mlp", "loss": "minimax", "conditional": True,
                                        "info_categorical": 10, "info_continuous": 2},
    "dcgan-wgan-clip": {"arch": "dcgan", "loss": "wgan", "d_steps": 2},
    "dcgan-wgan-gp-diffaugment-ttur": {"arch": "dcgan", "loss": "wgan-gp", "spectral_norm": True,
                                       "augment": "diffaugment", "d_lr_scale": 2.0},
    # BigGAN's own schedule: 2 D steps per G step, G at a quarter of D's learning rate
    "biggan-hinge-conditional-ortho": {"arch": "biggan", "loss": "hinge", "conditional": True, "ortho_weight": 1e-4,
                                       "d_steps": 2, "g_lr_scale": 0.25},
    "stylegan2-nonsaturating-r1-pl-mixing-ada": {"arch": "stylegan2", "loss": "nonsaturating", "r1_gamma": 1.0,
                                                 "r1_every": 4, "pl_weight": 2.0, "pl_every": 4, "augment": "ada",
                                                 "ada_interval": 1, "ada_kimg": 0.5},
}


# Each with 1 or 2 processes, both counts covered (the suite's time budget): StyleGAN2's path-length mean
# and WGAN's clipping are the ones that must agree across ranks.
NPROC = {"mlp-minimax-conditional-infogan": 1, "dcgan-wgan-clip": 2, "dcgan-wgan-gp-diffaugment-ttur": 1,
         "biggan-hinge-conditional-ortho": 1, "stylegan2-nonsaturating-r1-pl-mixing-ada": 2}


@pytest.mark.parametrize("name,nproc", list(NPROC.items()))
@pytest.mark.e2e
def test_each_network_and_loss_trains(name, nproc, tmp_path, fm_test_shards, env_with_repo):
    model = MATRIX[name]
    cfg = gan_config(tmp_path, fm_test_shards, model)
    r = run(launch(nproc) + ["train", str(cfg)], env_with_repo)
    assert f"{nproc} process(es)" in r.stdout
    recs = records(tmp_path / "run")
    assert recs[-1]["kimg"] == pytest.approx(0.16)
    for rec in recs:
        assert np.isfinite(rec["loss/D"]) and np.isfinite(rec["loss/G"]) and 0 <= rec["D/acc"] <= 1
    # The discriminator learns to tell the tiny generator's early images from real ones.
    accs = [rec["D/acc"] for rec in recs]
    assert max(accs[len(accs) // 2:]) > 0.75, accs
    if model.get("r1_gamma"):
        assert all(np.isfinite(rec["D_r1/r1"]) for rec in recs if "D_r1/r1" in rec)
        assert any("G_pl/pl_length" in rec for rec in recs)
    if model.get("augment") == "ada":
        assert recs[-1]["D/ada_p"] > 0  # the heuristic saw an overfitting discriminator
    if model.get("info_categorical"):
        assert all(np.isfinite(rec["D/info"]) for rec in recs)
    meta = ckpt.read_meta(ckpt.checkpoint_folders(tmp_path / "run" / "checkpoints")[-1])
    assert set(meta["ema_steps"]) == {"G"}
    cp = ckpt.checkpoint_folders(tmp_path / "run" / "checkpoints")[-1]
    assert (cp / "optim-G.pt").is_file() and (cp / "optim-D.pt").is_file() and (cp / "ema0-G.safetensors").is_file()


@pytest.mark.e2e
def test_export_rebuilds_the_ema_generator_and_sample_and_eval_work_on_it(tmp_path, fm_test_shards, env_with_repo,
                                                                          capsys, domain_features):
    model = {"arch": "stylegan2", "loss": "nonsaturating", "conditional": True}
    cfg = gan_config(tmp_path, fm_test_shards, model, train={"total_kimg": 0.08})
    run(launch(1) + ["train", str(cfg)], env_with_repo)
    out = tmp_path / "export"
    run(launch(1) + ["export", str(tmp_path / "run"), str(out)], env_with_repo)
    # The export's own JSON rebuilds the generator: the EMA weights of the newest checkpoint, buffers included.
    spec = json.loads((out / "generator_config.json").read_text())
    g = ARCHS[spec["arch"]].generator(**spec["kwargs"])
    g.load_state_dict(load_file(str(out / "generator.safetensors")))
    ema = weights(ckpt.checkpoint_folders(tmp_path / "run" / "checkpoints")[-1], "ema0-G.safetensors")
    assert all(torch.equal(v, ema[k]) for k, v in g.state_dict().items()) and "w_avg" in "".join(ema)

    family, nets, _ = load_ema(out)

    def images(**options):
        got = generate(family, nets, 12, seed=1, options=options)
        return np.stack([got[i][0] for i in range(12)])

    run(launch(1) + ["sample", str(out), "--num", "12", "--seed", "1", "--truncation", "0.5",
                     "--out", str(tmp_path / "half.npz")], env_with_repo)
    half, plain, zero = np.load(tmp_path / "half.npz")["x"], images(), images(truncation=0.0)
    assert half.shape == (12, 16, 16, 1) and np.array_equal(half, images(truncation=0.5))
    assert not np.array_equal(plain, half)
    assert all(np.array_equal(zero[0], zero[i]) for i in range(12))  # psi = 0: every image from the average w
    # the command refuses an option this family does not take (its main() in this process: no launch's start-up)
    from distgen.cli import main as cli_main

    assert cli_main(["sample", str(out), "--num", "2", "--steps", "3", "--out", str(tmp_path / "d.npz")]) == 2
    assert "distgen: error: the gan family takes no sampling option --steps" in capsys.readouterr().err
    assert not (tmp_path / "d.npz").exists()

    feats = domain_features[0]  # a tiny Fashion-MNIST classifier, fitted once per session (conftest)
    res = tmp_path / "eval.json"
    run(launch(2) + ["eval", str(out), "--metrics", "fid,kid,prc", "--num-samples", "40", "--ref", str(fm_test_shards),
                     "--feature-extractor", str(feats), "--truncation", "0.7", "--cache-dir", str(tmp_path / "cache"),
                     "--out", str(res)], env_with_repo)
    r = json.loads(res.read_text())
    assert r["fd_domain"] > 0 and np.isfinite(r["kid_domain_mean"]) and 0 <= r["precision_domain"] <= 1 \
        and 0 <= r["recall_domain"] <= 1
    assert 0 <= r["class_entropy"] <= 1 and 0.1 <= r["class_max_share"] <= 1  # the mode-collapse signal

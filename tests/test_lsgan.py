"""Least-squares GAN (Mao et al. 2017): the objective against the paper's formula and its minimisers, and a
DCGAN trained with it end to end through ``distgen train``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distgen.families.gan import losses
from test_gan import gan_config, records
from test_train import launch, run

pytestmark = pytest.mark.e2e  # trains (make test-fast leaves these out)


def test_lsgan_losses_are_the_papers_formula():
    g = torch.Generator().manual_seed(0)
    r, f = torch.randn(64, generator=g, dtype=torch.float64) * 3, torch.randn(64, generator=g, dtype=torch.float64) * 3
    a, b, c = 0.0, 1.0, 1.0  # the paper's fake label, real label, and what G wants D to say
    assert torch.equal(losses.d_loss("lsgan", r, f), 0.5 * (r - b) ** 2 + 0.5 * (f - a) ** 2)
    assert torch.equal(losses.g_loss("lsgan", f), 0.5 * (f - c) ** 2)
    assert "lsgan" in losses.LOSSES


def test_lsgan_minimisers():
    # D's loss is minimal at D(real) = 1, D(fake) = 0: zero there, zero gradient there, positive elsewhere.
    r, f = torch.ones(3, dtype=torch.float64, requires_grad=True), torch.zeros(3, dtype=torch.float64,
                                                                              requires_grad=True)
    d = losses.d_loss("lsgan", r, f)
    assert torch.equal(d, torch.zeros(3, dtype=torch.float64))
    gr, gf = torch.autograd.grad(d.sum(), (r, f))
    assert torch.equal(gr, torch.zeros(3, dtype=torch.float64)) and torch.equal(gf, torch.zeros(3, dtype=torch.float64))
    # Its gradient elsewhere is (D(x) - 1, D(G(z))): pulling real scores to 1 and fake ones to 0.
    r2, f2 = torch.tensor([0.25, 3.0], dtype=torch.float64, requires_grad=True), torch.tensor(
        [-2.0, 0.5], dtype=torch.float64, requires_grad=True)
    gr, gf = torch.autograd.grad(losses.d_loss("lsgan", r2, f2).sum(), (r2, f2))
    assert torch.equal(gr, r2.detach() - 1) and torch.equal(gf, f2.detach())
    assert (losses.d_loss("lsgan", r2, f2) > 0).all()
    # G's loss is zero exactly where D calls its images real (1), with zero gradient; its gradient is D(G(z)) - 1.
    f = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64, requires_grad=True)
    gl = losses.g_loss("lsgan", f)
    assert gl[0] == 0 and (gl[1:] > 0).all()
    (gf,) = torch.autograd.grad(gl.sum(), f)
    assert torch.equal(gf, f.detach() - 1)


def test_dcgan_trains_with_lsgan(tmp_path, fm_test_shards, env_with_repo):
    cfg = gan_config(tmp_path, fm_test_shards, {"arch": "dcgan", "loss": "lsgan"},
                     train={"total_kimg": 0.08, "log_every": 2})
    run(launch(1) + ["train", str(cfg)], env_with_repo)
    recs = records(tmp_path / "run")
    assert recs and recs[-1]["kimg"] == pytest.approx(0.08)
    for rec in recs:
        assert np.isfinite(rec["loss/D"]) and np.isfinite(rec["loss/G"]) and 0 <= rec["D/acc"] <= 1
        # Both objectives are halved squares: non-negative.
        assert rec["loss/D"] >= 0 and rec["loss/G"] >= 0
    # The discriminator learns to tell the tiny generator's early images apart about the 0.5 threshold.
    assert recs[-1]["D/real"] > recs[-1]["D/fake"]
    assert max(rec["D/acc"] for rec in recs[len(recs) // 2:]) > 0.75, recs

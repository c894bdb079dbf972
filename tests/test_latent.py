"""Latent diffusion, stage 1: the autoencoder trained by distgen, exported as a diffusers folder with a
latent scaling factor computed from the data."""

from __future__ import annotations

import json

import numpy as np
import torch

from distgen.sample import _first_images, export, load_ema
from test_gan import records
from test_likelihood import lik_config
from test_train import launch, run

AE_RES = 16


def test_autoencoder_trains_exports_and_round_trips(tmp_path, fm_test_shards, env_with_repo):
    model = {"family": "autoencoder", "preset": "tiny", "disc_weight": 0.1, "disc_start_kimg": 0.16}
    cfg = lik_config(tmp_path, fm_test_shards, model, data={"resolution": AE_RES},
                     train={"total_kimg": 0.64, "lr": 2e-3, "log_every": 10, "checkpoint_every": 40})
    run(launch(1) + ["train", str(cfg)], env_with_repo)
    recs = records(tmp_path / "run")
    # reconstruction improves over a few steps
    first, last = recs[0]["ae/recon_l1"], recs[-1]["ae/recon_l1"]
    assert last < 0.7 * first, (first, last)
    # the adversarial term starts after 160 images, and the discriminator trains from then on
    assert "ae/g_adv" not in recs[0] and recs[0]["loss/disc"] == 0
    assert "ae/g_adv" in recs[-1] and recs[-1]["loss/disc"] > 0

    out = export(tmp_path / "run", tmp_path / "export")
    from diffusers import AutoencoderKL

    ae = AutoencoderKL.from_pretrained(out, use_safetensors=True)  # a plain diffusers folder
    fam, nets, rcfg = load_ema(out)
    assert json.loads((out / "config.json").read_text())["scaling_factor"] == ae.config.scaling_factor
    # the scaling factor is 1 / std of the latents of the first 2048 training images
    imgs = _first_images(rcfg, 2048)
    assert imgs.shape == (2048, 1, AE_RES, AE_RES)
    with torch.no_grad():
        z = ae.encode(imgs).latent_dist.sample(generator=[torch.Generator().manual_seed(i) for i in range(2048)])
        assert abs(float((z * ae.config.scaling_factor).double().std()) - 1) < 1e-4
        # encode -> decode: latents at 1/2 the side, 4 channels; reconstructions of the data's shape and range
        assert z.shape == (2048, 4, AE_RES // 2, AE_RES // 2)
        rec = ae.decode(z[:64]).sample
    assert rec.shape == (64, 1, AE_RES, AE_RES) and rec.abs().max() < 1.5
    assert (rec - imgs[:64]).abs().mean() < first
    # the export's networks are the run's EMA
    again = fam.reconstruct(nets, ((imgs[:8] + 1) * 127.5).round().to(torch.uint8), None)
    assert again.shape == (8, 1, AE_RES, AE_RES) and np.isfinite(again.numpy()).all()

"""Latent diffusion, stage 1: the autoencoder trained by distgen, exported as a diffusers folder with a
latent scaling factor computed from the data."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from distgen.export.native import _first_images, export
from distgen.sample import generate, load_ema
from test_gan import records
from test_likelihood import lik_config
from test_train import launch, run, weights

pytestmark = pytest.mark.e2e  # trains autoencoders and latent diffusion (make test-fast leaves these out)

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
    # The decoder's last layer is a plain convolution: nothing bounds its output, so only its error is
    # checked (below the first logged L1); the family clamps what it hands out to the data's [-1, 1].
    assert rec.shape == (64, 1, AE_RES, AE_RES)
    assert (rec - imgs[:64]).abs().mean() < first
    # the export's networks are the run's EMA
    again = fam.reconstruct(nets, ((imgs[:8] + 1) * 127.5).round().to(torch.uint8), None)
    assert again.shape == (8, 1, AE_RES, AE_RES) and np.isfinite(again.numpy()).all()
    assert again.abs().max() <= 1


# ---------------------------------------------------------------- stage 2: the latent U-Net

@pytest.fixture(scope="module")
def ae_folder(tmp_path_factory):
    """A local AutoencoderKL folder (randomly initialised: what is tested is the plumbing, not its quality)."""
    from diffusers import AutoencoderKL

    from distgen.families.autoencoder import autoencoder_kwargs

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("ae")
    AutoencoderKL(**autoencoder_kwargs("tiny", 1, AE_RES), scaling_factor=0.7).save_pretrained(out)
    return out


def ldm_config(tmp_path, manifest, ae, **over):
    model = {"family": "latent_diffusion", "preset": "tiny", "autoencoder": str(ae), "class_conditional": True,
             "label_dropout": 0.2, "sampler": "ddpm", "sample_steps": 3}
    model.update(over.pop("model", {}))
    data = {"resolution": AE_RES, "labels": True, **over.pop("data", {})}
    return lik_config(tmp_path, manifest, model, data=data, **over)


def test_latent_diffusion_one_process_export_sampling_and_guidance(tmp_path, fm_test_shards, ae_folder,
                                                                   env_with_repo):
    """Class-conditional latent diffusion (images encoded on the fly; its exact resume with 2 processes is
    test_resume's): the autoencoder stays as it was loaded; the export runs in diffusers alone and samples what
    the run folder samples, guided."""
    from distgen.cli import main as cli_main

    cfg = ldm_config(tmp_path, fm_test_shards, ae_folder, train={"total_kimg": 0.08})
    assert cli_main(["train", str(cfg)]) == 0
    from safetensors.torch import load_file

    last = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[-1]
    orig = load_file(str(ae_folder / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(orig[k], weights(last, "ae.safetensors")[k]) for k in orig)
    assert all(np.isfinite([r["loss"] for r in records(tmp_path / "run")]))
    # the run folder's images (sampled here; `distgen sample` on the export must give the same)
    rfam, rnets, _ = load_ema(tmp_path / "run")
    g1, g3 = (generate(rfam, rnets, 6, options={"steps": 3, "guidance": g}) for g in (1.0, 3.0))
    assert g1[0][0].shape == (AE_RES, AE_RES, 1) and [g1[i][1] for i in range(6)] == [i % 10 for i in range(6)]
    g1x, g3x = (np.stack([g[i][0] for i in range(6)]) for g in (g1, g3))
    assert not np.array_equal(g1x, g3x)  # guidance changes the images

    out = export(tmp_path / "run", tmp_path / "export")
    fam, nets, _ = load_ema(out)
    # guidance scale 1: the guided prediction is the conditional one
    unet = nets["unet"]
    x = torch.randn(3, 4, AE_RES // 2, AE_RES // 2, generator=torch.Generator().manual_seed(0))
    labels, t = torch.tensor([1, 4, 7]), torch.tensor(500)
    cond, uncond = unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, torch.full_like(labels, 10)])
                        ).sample.chunk(2)
    alone = unet(x, t, class_labels=labels).sample
    assert torch.allclose(uncond + 1.0 * (cond - uncond), alone, atol=1e-5)
    assert (cond - uncond).abs().max() > 1e-4  # the label matters, so the check could fail

    # the folder runs in diffusers alone, and `distgen sample` on it gives the run's images
    script = (
        "import sys; sys.modules['distgen'] = None\n"
        "import numpy as np, torch, diffusers\n"
        f"pipe = diffusers.DiffusionPipeline.from_pretrained({str(out)!r}, trust_remote_code=True)\n"
        "g = [torch.Generator().manual_seed(int(s)) for s in sys.argv[1:]]\n"
        "img = pipe(class_labels=[i % 10 for i in range(6)], guidance_scale=3.0, num_inference_steps=3,\n"
        "           output_type='np', generator=g).images\n"
        f"np.save({str(tmp_path / 'pipe.npy')!r}, img)\n"
        "print(type(pipe).__name__, img.shape)\n"
    )
    from distgen.sample import image_seed

    r = run([sys.executable, "-c", script] + [str(image_seed(0, i)) for i in range(6)],
            {**env_with_repo, "HF_HUB_OFFLINE": "1"})
    assert "LatentDiffusionPipeline (6, 16, 16, 1)" in r.stdout
    run(launch(1) + ["sample", str(out), "--num", "6", "--steps", "3", "--guidance", "3",
                     "--out", str(tmp_path / "e3.npz")], env_with_repo)
    e3 = np.load(tmp_path / "e3.npz")["x"]
    assert np.array_equal(e3, g3x)
    piped = np.round(np.load(tmp_path / "pipe.npy") * 255).astype(np.uint8)
    assert np.abs(piped.astype(int) - e3.astype(int)).max() <= 1

    # `distgen eval` on the export: FD / KID of its guided samples equal torch-fidelity's on `distgen sample`'s
    _eval_matches_torch_fidelity(out, e3, tmp_path, env_with_repo)


def _eval_matches_torch_fidelity(export_dir, samples, tmp_path, env):
    """FD / KID from `distgen eval` (6 images, the sampling options above) == torch-fidelity on the same images
    against 20 real ones, with a randomly initialised InceptionV3 saved to a file."""
    import torch_fidelity
    from PIL import Image

    from distgen.data import write_shards
    from distgen.evaluate.extractors import write_random_inception
    from test_eval import Images, _fm_images

    x, _ = _fm_images(20, offset=300)
    real = np.stack([np.asarray(Image.fromarray(i).resize((AE_RES, AE_RES))) for i in x])
    np.savez(tmp_path / "ref.npz", x=real)
    write_shards(f"npz:{tmp_path / 'ref.npz'}", tmp_path / "ref", "test", samples_per_shard=20)
    weights = write_random_inception(tmp_path / "inception.pth")
    run(launch(1) + ["eval", str(export_dir), "--metrics", "fid,kid", "--num-samples", "6", "--seed", "0",
                     "--steps", "3", "--guidance", "3", "--ref", str(tmp_path / "ref" / "test.manifest.json"),
                     "--inception-weights", str(weights), "--cache-dir", str(tmp_path / "cache"),
                     "--out", str(tmp_path / "eval.json")], env)
    res = json.loads((tmp_path / "eval.json").read_text())

    tf = torch_fidelity.calculate_metrics(
        input1=Images(samples), input2=Images(real[..., None]), cuda=False, feature_extractor="inception-v3-compat",
        feature_extractor_weights_path=str(weights), fid=True, kid=True, kid_subset_size=6, save_cpu_ram=True,
        verbose=False)
    assert res["ref_images"] == 20 and tf["frechet_inception_distance"] > 0
    assert res["fid"] == pytest.approx(tf["frechet_inception_distance"], rel=1e-4)
    assert res["kid_mean"] == pytest.approx(tf["kernel_inception_distance_mean"], rel=1e-4)


def test_latent_shards_round_trip_and_train(tmp_path, ae_folder, env_with_repo):
    """`distgen data encode` keeps keys, labels and each image's posterior; stage 2 trains on the shards, drawing
    the same latents as encoding on the fly."""
    from PIL import Image

    from distgen.config import DataConfig
    from distgen.data import DataError, make_loader, write_shards
    from distgen.families.latent import draw_latents, latent_moments, load_autoencoder
    from test_eval import _fm_images

    x, y = _fm_images(200)
    xs = np.stack([np.asarray(Image.fromarray(i).resize((AE_RES, AE_RES))) for i in x])
    np.savez(tmp_path / "im.npz", x=xs, y=y)
    write_shards(f"npz:{tmp_path / 'im.npz'}", tmp_path / "img", "train", samples_per_shard=70)
    images = tmp_path / "img" / "train.manifest.json"
    r = run([sys.executable, "-m", "distgen", "data", "encode", str(ae_folder), str(images), str(tmp_path / "lat"),
             "--samples-per-shard", "90", "--batch-size", "32"], env_with_repo)
    assert "200 latents 4x8x8 (scaling factor 0.7)" in r.stdout
    m = json.loads((tmp_path / "lat" / "train.manifest.json").read_text())
    assert m["kind"] == "latents" and m["total"] == 200 and [s["count"] for s in m["shards"]] == [90, 90, 20]
    assert m["num_classes"] == 10 and m["autoencoder"]["scaling_factor"] == 0.7

    cfg = DataConfig(resolution=AE_RES, channels=1, labels=True, workers=1)
    lat = list(make_loader(str(tmp_path / "lat" / "train.manifest.json"), cfg, batch_size=64, mode="eval"))
    img = list(make_loader(str(images), cfg, batch_size=64, mode="eval"))
    keys = [k for b in lat for k in b["key"]]
    assert keys == [k for b in img for k in b["key"]] and len(set(keys)) == 200
    assert torch.equal(torch.cat([b["label"] for b in lat]), torch.cat([b["label"] for b in img]))
    ae = load_autoencoder(ae_folder)
    moments = torch.cat([b["latent"] for b in lat])
    with torch.no_grad():
        direct = latent_moments(ae, torch.cat([b["image"] for b in img]))
        assert moments.shape == (200, 8, 8, 8) and torch.allclose(moments, direct, atol=1e-5)
        gens = lambda: [torch.Generator().manual_seed(i) for i in range(200)]  # noqa: E731
        on_the_fly = ae.encode(torch.cat([b["image"] for b in img])).latent_dist.sample(generator=gens()) * 0.7
        assert torch.allclose(draw_latents(moments, 0.7, gens()), on_the_fly, atol=1e-4)
    with pytest.raises(DataError, match="holds latents"):
        make_loader(str(tmp_path / "lat" / "train.manifest.json"), DataConfig(resolution=AE_RES, flip=True),
                    batch_size=8, mode="train")

    # stage 2 on the latent shards
    over = {"train": {"total_kimg": 0.08}}
    c = ldm_config(tmp_path / "t", tmp_path / "lat" / "train.manifest.json", ae_folder, **over)
    run([sys.executable, "-m", "distgen", "train", str(c)], env_with_repo)
    recs = records(tmp_path / "t" / "run")
    assert recs[-1]["kimg"] == 0.08 and all(np.isfinite(r["loss"]) for r in recs)

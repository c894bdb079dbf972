"""The DiT backbone's exports (distgen.families.backbones.dit_diffusers): diffusers' DiTPipeline samples what distgen samples, a plain
DiTTransformer2DModel folder computes what the backbone computes, and distgen reads both back exactly; folders
that are not what distgen wrote are refused before anything is built."""

from __future__ import annotations

import json

import pytest
import torch

from distgen.errors import SampleError
from distgen.families.backbones.dit_diffusers import (IMAGENET_NULL, from_diffusers_transformer, load_dit_transformer, save_dit_transformer,
                                to_diffusers_transformer, write_dit_pipeline)
from distgen.families.backbones.dit import DiT
from distgen.families.formulations import DDPM

K = 3  # classes of the conditional cases; K is our null class


def _dit(channels, resolution, classes, seed=0):
    torch.manual_seed(seed)
    net = DiT(channels, resolution, classes, patch_size=2, hidden_size=32, depth=2, num_heads=2)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # off adaLN-Zero's zeros: every path (the class table included) carries a signal
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return net.eval()


def _gens(n):
    return [torch.Generator().manual_seed(100 + i) for i in range(n)]


# -- DiTPipeline

@pytest.fixture(scope="module")
def latent_model(tmp_path_factory):
    from diffusers import AutoencoderKL, DDPMScheduler

    from distgen.families.autoencoder import autoencoder_kwargs

    torch.manual_seed(1)
    vae = AutoencoderKL(**autoencoder_kwargs("tiny", 1, 16), scaling_factor=0.7).eval()  # 4 x 8 x 8 latents
    dit = _dit(4, 8, K)
    # latent diffusion's training schedule (scheduler_kwargs with clip_sample off), v-prediction: the pipeline's
    # scheduler must take the prediction type from the export, not assume epsilon
    train = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                          clip_sample=False, prediction_type="v_prediction")
    return dit, vae, train, tmp_path_factory.mktemp("dit")


def _ours(dit, vae, train, sampler, labels, guidance, steps):
    """distgen's sampling, as Diffusion.sample / LatentDiffusion.finish do it, mapped to DiTPipeline's [0, 1]."""
    from diffusers.utils.torch_utils import randn_tensor

    x = randn_tensor((len(labels), 4, 8, 8), generator=_gens(len(labels)), dtype=torch.float32)
    x, _ = DDPM(None, train).sample(dit, x, labels, K, guidance, sampler, steps)
    image = vae.decode(x / vae.config.scaling_factor).sample.clamp(-1, 1)
    return (image + 1) / 2


@pytest.mark.parametrize("sampler", ["ddim", "dpmsolver"])
def test_dit_pipeline_samples_what_distgen_samples(latent_model, sampler):
    from diffusers import DiTPipeline

    dit, vae, train, root = latent_model
    folder = root / sampler
    write_dit_pipeline(folder, dit, vae, train, sampler=sampler, class_names=["cat", "dog", "tabby, tabby cat"])
    pipe = DiTPipeline.from_pretrained(folder, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == {"ddim": "DDIMScheduler", "dpmsolver": "DPMSolverMultistepScheduler"}[
        sampler]
    assert pipe.labels == {"cat": 0, "dog": 1, "tabby": 2, "tabby cat": 2}  # id2label reached DiTPipeline
    labels = torch.tensor([0, 2, 1])

    def theirs(class_labels, g):  # the same generators, fresh: DiTPipeline draws its latents with randn_tensor
        return pipe(class_labels=class_labels, guidance_scale=g, num_inference_steps=3, generator=_gens(3),
                    output_type="pt").images

    with torch.no_grad():
        for g in (3.0, 1.0):  # guided (a 2B batch, [cond, null=1000]) and DiTPipeline's unguided path
            ours = _ours(dit, vae, train, sampler, labels, g, 3)
            torch.testing.assert_close(theirs(labels.tolist(), g), ours, atol=1e-5, rtol=0)
        assert not torch.allclose(_ours(dit, vae, train, sampler, labels, 3.0, 3), ours, atol=1e-3)
        # guidance_scale <= 1 is the conditional pass alone in DiTPipeline: 0.5 samples what g = 1 does ...
        torch.testing.assert_close(theirs(labels.tolist(), 0.5), ours, atol=1e-5, rtol=0)
        # ... and distgen's g = 0 (unconditional) is the null label there, row 1000 or any unused row K..999
        uncond = _ours(dit, vae, train, sampler, labels, 0.0, 3)
        torch.testing.assert_close(theirs([IMAGENET_NULL, K, 999], 1.0), uncond, atol=1e-5, rtol=0)
    # distgen reads the pipeline's transformer/ back as the DiT it wrote
    back = load_dit_transformer(folder / "transformer", K)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), dit.state_dict().values()))
    assert back.state_dict().keys() == dit.state_dict().keys()


def test_imagenet_layout_maps_our_null_to_row_1000(latent_model):
    dit = latent_model[0]
    model = to_diffusers_transformer(dit, imagenet_layout=True)
    assert model.config.num_embeds_ada_norm == IMAGENET_NULL and not model.training
    x, t = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 17, 500, 999])
    with torch.no_grad():
        assert torch.equal(model(x, t, torch.tensor([0, 1, 2, 1000])).sample, dit(x, t, torch.tensor([0, 1, 2, K])))
        null = dit(x, t, torch.full((4,), K))
        assert torch.equal(model(x, t, torch.tensor([K, 500, 999, 1000])).sample, null)  # unused rows: null
    with pytest.raises(ValueError, match="unconditional"):
        to_diffusers_transformer(_dit(4, 8, 0), imagenet_layout=True)
    with pytest.raises(ValueError, match="1 to 1000 classes"):
        to_diffusers_transformer(DiT(4, 8, 1001, hidden_size=8, depth=1, num_heads=1), imagenet_layout=True)


# -- plain transformer/ folders

# (channels, resolution, classes, noise_cond): pixel space with DDPM timesteps; unconditional with EDM's
# c_noise = ln(sigma) / 4; one class with flow's 1000 t
PLAIN = {"pixel ddpm": (3, 16, 10, torch.tensor([0, 250, 999, 7])),
         "unconditional edm": (1, 8, 0, torch.log(torch.tensor([0.002, 0.5, 3.0, 80.0])) / 4),
         "one class flow": (4, 8, 1, torch.tensor([0.0, 333.3, 900.0, 1000.0]))}


@pytest.mark.parametrize("case", PLAIN)
def test_plain_transformer_folder_equals_the_module_and_round_trips(case, tmp_path):
    from diffusers import DiTTransformer2DModel

    c, r, classes, t = PLAIN[case]
    dit = _dit(c, r, classes)
    x = torch.randn(4, c, r, r, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 3, 9, 10]) if classes == 10 else (torch.tensor([0, 1, 0, 1]) if classes else None)
    save_dit_transformer(tmp_path / "transformer", dit)
    theirs = DiTTransformer2DModel.from_pretrained(tmp_path / "transformer", use_safetensors=True)
    back = load_dit_transformer(tmp_path / "transformer", classes)
    assert back.config == dit.config
    assert all(b.norm1.emb is back.dit.transformer_blocks[0].norm1.emb for b in back.dit.transformer_blocks)
    with torch.no_grad():
        ours = dit(x, t, labels)
        # diffusers' convention: labels always given, the unconditional model's one class is 0
        assert torch.equal(theirs(x, t, labels if classes else torch.zeros(4, dtype=torch.long)).sample, ours)
        assert torch.equal(back(x, t, labels), ours)
    saved, again = dit.state_dict(), back.state_dict()
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)


# -- what is refused

def _rewrite(folder, **changes):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def test_exports_that_are_not_distgens_dit_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    dit = _dit(4, 8, K)
    folder = tmp_path / "transformer"
    save_dit_transformer(folder, dit)
    weights = folder / "diffusion_pytorch_model.safetensors"
    good = load_file(str(weights))

    # block 1's embedder copy no longer equals block 0's: diffusers' model would differ from one shared embedder
    bad = dict(good)
    key = "transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.bias"
    bad[key] = bad[key] + 1e-3
    save_file(bad, str(weights))
    with pytest.raises(SampleError, match=rf"{folder}: block 1's conditioning embedder differs"):
        load_dit_transformer(folder, K)
    # the same check in memory
    model = to_diffusers_transformer(dit, imagenet_layout=False)
    with torch.no_grad():
        model.transformer_blocks[1].norm1.emb.class_embedder.embedding_table.weight[0, 0] += 1
    with pytest.raises(SampleError, match="block 1's conditioning embedder differs"):
        from_diffusers_transformer(model, K)

    # an ImageNet-layout table whose unused rows are not the null row's copies
    save_dit_transformer(folder, dit, imagenet_layout=True)
    wide = load_file(str(weights))
    for i in range(2):
        wide[f"transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table.weight"][500] += 1
    save_file(wide, str(weights))
    with pytest.raises(SampleError, match="must be copies of the null row"):
        load_dit_transformer(folder, K)

    save_dit_transformer(folder, dit)  # a good export again: now each refusal below is the config's
    assert load_dit_transformer(folder, K).config == dit.config
    with pytest.raises(SampleError, match="class table is for 3 classes; the model has 5"):
        load_dit_transformer(folder, 5)
    for changes, message in [
            ({"out_channels": 8}, "predicts no sigma"),  # a learned-sigma DiT
            ({"num_layers": "2"}, "num_layers: expected an integer"),
            ({"patch_size": 0}, "patch_size: 0 is out of range"),
            ({"num_attention_heads": 1024, "attention_head_dim": 1024}, "hidden channels"),
            ({"sample_size": 9}, "not a multiple of patch_size"),
            ({"norm_type": "ada_norm"}, "norm_type is 'ada_norm'"),
            ({"num_layers": 3}, "do not fit the network"),  # shapes checked before anything is built
            ({"_class_name": "UNet2DModel"}, "not 'DiTTransformer2DModel'"),
            ({"cross_attention_dim": 64}, "unknown key")]:
        _rewrite(folder, **changes)
        with pytest.raises(SampleError, match=message):
            load_dit_transformer(folder, K)
        save_dit_transformer(folder, dit)
    weights.unlink()
    torch.save(good, folder / "diffusion_pytorch_model.bin")  # pickled weights are never loaded
    with pytest.raises(SampleError, match="no diffusion_pytorch_model.safetensors"):
        load_dit_transformer(folder, K)

"""DeepSpeed with mixed precision: every family under every ZeRO stage it does not refuse, in bf16; the
precision comes from distgen's config; likelihoods keep float32 precision under autocast."""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO
from distgen import checkpoint as ckpt
from distgen.config import load_config
from distgen.data import shard_source
from distgen.families import DataInfo, build_family
from distgen.sample import export
from distgen.dist import free_port
from test_train import ACCEL, launch, run

# Each family at its smallest, with the parts DeepSpeed has to cope with switched on: a GAN's two engines
# and lazy R1, StyleGAN2's learned scalars (0-dim in the paper's code), BigGAN's attention scalar, the
# autoencoder's discriminator, latent diffusion's frozen autoencoder, Glow's data-dependent init.
MODELS = {
    "diffusion": ({"family": "diffusion", "preset": "tiny", "sample_steps": 2}, 8),
    "latent_diffusion": ({"family": "latent_diffusion", "preset": "tiny", "sample_steps": 2}, 16),
    "autoencoder": ({"family": "autoencoder", "preset": "tiny", "disc_weight": 0.1}, 16),
    "gan-mlp": ({"family": "gan", "arch": "mlp", "preset": "tiny"}, 8),
    "gan-dcgan": ({"family": "gan", "arch": "dcgan", "preset": "tiny", "r1_gamma": 1.0, "r1_every": 2}, 16),
    "gan-biggan": ({"family": "gan", "arch": "biggan", "preset": "tiny", "loss": "hinge"}, 16),
    "gan-stylegan2": ({"family": "gan", "arch": "stylegan2", "preset": "tiny", "r1_gamma": 1.0, "r1_every": 2}, 16),
    # ProGAN: blocks not yet grown take part through a zero term; the resume lands in the middle of a fade
    # (4 images a step: step 1 at 4x4, step 2 at 8x8 with alpha 0.5); its default wgan-gp's penalty differentiates
    # the critic through the plain module beside its engine's forwards
    "gan-progan": ({"family": "gan", "arch": "progan", "preset": "tiny", "stable_kimg": 0.002,
                    "fade_kimg": 0.004}, 16),
    "vae": ({"family": "vae", "arch": "vae", "preset": "tiny"}, 8),
    "hvae": ({"family": "vae", "arch": "hvae", "preset": "tiny"}, 8),
    "pixelcnn": ({"family": "pixelcnn", "preset": "tiny"}, 8),
    "glow": ({"family": "glow", "preset": "tiny"}, 8),
    # PixelRNN's recurrence calls each LSTM's convolutions once a row / diagonal within one forward (ZeRO-3)
    "pixelrnn": ({"family": "pixelrnn", "preset": "tiny", "arch": "diagonal_bilstm"}, 8),
    "pix2pix": ({"family": "pix2pix", "preset": "tiny"}, 32),
    "cyclegan": ({"family": "cyclegan", "preset": "tiny", "blocks": 1, "pool_size": 2}, 32),
    # score models: the VE U-Net's frozen Fourier features; sliced score matching's double backward (NCSN levels)
    "score-ve": ({"family": "score", "preset": "tiny", "sde": "ve", "sample_steps": 2, "n_steps_each": 1}, 8),
    "score-ncsn-ssm": ({"family": "score", "preset": "tiny", "sde": "ncsn", "objective": "ssm", "num_scales": 2,
                        "n_steps_each": 1}, 8),
    # SGLD through the plain module beside the engine's one forward; JEM's logits on labelled data, spectral norm
    "ebm": ({"family": "ebm", "preset": "tiny", "sgld_steps": 2, "buffer_size": 8, "sample_steps": 2}, 16),
    "ebm-jem": ({"family": "ebm", "preset": "tiny", "jem": True, "spectral_norm": True, "sgld_steps": 2,
                 "buffer_size": 8, "sample_steps": 2}, 16),
    # FFJORD: Hutchinson's double backward through torchdiffeq's solve, and odeint_adjoint's own backward solve
    "ffjord": ({"family": "ffjord", "preset": "tiny", "rtol": 0.01, "atol": 0.01}, 8),
    "ffjord-adjoint": ({"family": "ffjord", "preset": "tiny", "rtol": 0.01, "atol": 0.01, "adjoint": True,
                        "kinetic_energy": 0.01, "jacobian_norm": 0.01}, 8),
}
# What DeepSpeed cannot do, refused at start with the reason (engine_problem): one network outside its own
# engine in another's phase under ZeRO-3's partitioned parameters, or a double backward through them (SSM,
# FFJORD's trace estimate).
REFUSED = {("autoencoder", 3), ("gan-mlp", 3), ("gan-dcgan", 3), ("gan-biggan", 3), ("gan-stylegan2", 3),
           ("gan-progan", 3), ("pix2pix", 3), ("cyclegan", 3), ("score-ncsn-ssm", 3), ("ebm", 3), ("ebm-jem", 3),
           ("ffjord", 3), ("ffjord-adjoint", 3)}


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, fm_test_shards):
    """Every model of MODELS under ZeRO-1, 2 and 3 in bf16, one process: a step, a checkpoint, then a
    resume for a second step. All in one `accelerate launch` (tests/scripts/ds_matrix.py)."""
    from diffusers import AutoencoderKL

    from distgen.families.autoencoder import autoencoder_kwargs

    root = tmp_path_factory.mktemp("ds-matrix")
    torch.manual_seed(0)
    AutoencoderKL(**autoencoder_kwargs("tiny", 1, 16), scaling_factor=0.7).save_pretrained(root / "ae")
    # the translators' data: the paired edges task, and two class domains
    shard_source("fashion-mnist:edges", root / "edges", "test", 5000)
    shard_source("fashion-mnist:classes=Sneaker/Ankle boot", root / "boots", "test", 1000)
    data = {"pix2pix": {"train": [str(root / "edges" / "test.manifest.json")]},
            "cyclegan": {"train": [str(root / "boots" / "testA.manifest.json")],
                         "train_b": [str(root / "boots" / "testB.manifest.json")]}}
    spec = []
    for stage, (name, (model, res)) in itertools.product((1, 2, 3), MODELS.items()):
        model = {**model, **({"autoencoder": str(root / "ae")} if name == "latent_diffusion" else {})}
        cfg = {"run": {"dir": str(root / f"{name}-z{stage}"), "seed": 1}, "model": model,
               "data": {"train": [str(fm_test_shards)], "resolution": res, "resize": "stretch", "workers": 0,
                        "shuffle_buffer": 50, **data.get(name, {})},
               "train": {"batch_size": 4, "total_kimg": 1, "log_every": 1, "checkpoint_every": 100,
                         "sample_every": 0, "sample_num": 1, "mixed_precision": "bf16"},
               "ema": {"halflife_kimg": [0.05], "rampup": None}}
        path = root / f"{name}-z{stage}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        spec.append({"name": name, "config": str(path), "stage": stage, "steps": 2})
    (root / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run([*ACCEL, "--config_file", "configs/accelerate/zero2.yaml", "--num_processes", "1", "--main_process_port",
         str(free_port()), str(REPO / "tests/scripts/ds_matrix.py"), str(root / "spec.json"), str(root / "out.json")],
        env, timeout=900)
    return {r["name"] + f"-z{r['stage']}": r for r in json.loads((root / "out.json").read_text())}


@pytest.mark.parametrize("name,stage", list(itertools.product(MODELS, (1, 2, 3))))
def test_every_family_trains_in_bf16_under_every_zero_stage_it_does_not_refuse(matrix, name, stage, tmp_path):
    rec = matrix[f"{name}-z{stage}"]
    run_dir = Path(yaml.safe_load(Path(rec["config"]).read_text())["run"]["dir"])
    if (name, stage) in REFUSED:
        assert len(rec["calls"]) == 1 and rec["calls"][0]["error"].startswith(f"DeepSpeed ZeRO-{stage}: ")
        assert not (run_dir / "checkpoints").exists()  # refused before any compute
        return
    assert [c.get("rc") for c in rec["calls"]] == [0, 0], rec["calls"]
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2]  # the second call resumed from the first's checkpoint
    # every step finite (a lazy phase that did not run in a record's interval logs null)
    assert recs[-1]["nonfinite_total"] == 0 and all(math.isfinite(r["loss"]) for r in recs), recs
    assert all(math.isfinite(v) for r in recs for k, v in r.items() if k.startswith("loss/") and v is not None)
    cps = ckpt.checkpoint_folders(run_dir / "checkpoints")
    assert [p.name for p in cps] == ["step-00000001", "step-00000002"] and (cps[-1] / "deepspeed").is_dir()
    # the EMA (float32, as under DDP: DeepSpeed's autocast leaves the weights in float32) samples and exports
    ema = ckpt.load_tensors(next(cps[-1].glob("ema0-*.safetensors")))
    assert all(t.dtype in (torch.float32, torch.int64, torch.bool) and torch.isfinite(t.float()).all()
               for t in ema.values())
    assert (run_dir / "samples" / "step-00000002.png").is_file()
    if name not in ("autoencoder", "latent_diffusion"):  # those two calibrate on 2048 images: slow, tested elsewhere
        assert (export(run_dir, tmp_path / "export") / "distgen.json").is_file()


def test_a_deepspeed_file_that_contradicts_train_mixed_precision_is_refused(tmp_path, fm_test_shards,
                                                                            env_with_repo):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True},
                              "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}))
    acc = tmp_path / "acc.yaml"
    acc.write_text(yaml.safe_dump({"compute_environment": "LOCAL_MACHINE", "distributed_type": "DEEPSPEED",
                                   "deepspeed_config": {"deepspeed_config_file": str(ds)}, "num_processes": 1,
                                   "num_machines": 1, "machine_rank": 0, "use_cpu": False}))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"run": {"dir": str(tmp_path / "run")}, "data": {"train": [str(fm_test_shards)],
                                   "resolution": 8, "resize": "stretch"}, "model": {"preset": "tiny"}}))
    r = run(launch(1, str(acc)) + ["train", str(cfg)], env_with_repo, check=False)
    assert r.returncode != 0
    assert (f"distgen: error: train.mixed_precision=no conflicts with bf16.enabled=true in the DeepSpeed config "
            f"{ds}") in r.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("family,extra", [("pixelcnn", {}), ("pixelrnn", {}), ("glow", {}), ("vae", {}), ("vae", {"arch": "hvae"}),
                                          ("diffusion", {"num_train_timesteps": 20, "sample_steps": 2}),
                                          ("score", {"sde": "vp", "ode_tol": 0.01})])
def test_bits_per_dim_keeps_its_precision_under_bf16_autocast(family, extra):
    """The likelihood maths runs in float32 whatever the network's precision: on the same weights and
    images, bits/dim under bf16 autocast is within 0.01 of float32's."""
    from test_eval import _fm_images

    x, _ = _fm_images(16)
    x = torch.nn.functional.interpolate(torch.from_numpy(x)[:, None].float(), size=16, mode="area").round()
    cfg = load_config(None, [f"model.family={family}", "model.preset=tiny", "data.resolution=16",
                             *[f"model.{k}={v}" for k, v in extra.items()]])
    fam = build_family(cfg.model, DataInfo(16, 1, 10))
    torch.manual_seed(0)
    nets = {k: v.eval() for k, v in fam.build_networks().items()}

    def bpd(bf16: bool) -> float:
        gens = [torch.Generator().manual_seed(i) for i in range(len(x))]
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logp = fam.log_likelihood(nets, x.to(torch.uint8), None, gens)
        assert logp.dtype in (torch.float32, torch.float64)
        return float(-logp.double().mean() / (16 * 16 * math.log(2)))

    plain, low = bpd(False), bpd(True)
    assert np.isfinite(plain) and abs(low - plain) <= 0.01, (plain, low)


def test_learned_scalars_load_from_checkpoints_that_stored_them_0_dim():
    """StyleGAN2's noise strength and BigGAN's attention gain are [1] now (DeepSpeed cannot broadcast a
    0-dim parameter); state dicts written with the 0-dim shape still load, with the same value."""
    from distgen.families.gan.biggan import SelfAttention
    from distgen.families.gan.stylegan2 import SynthesisLayer

    layer = SynthesisLayer(4, 4, 8, 8, up=False)
    old = {k: (v.reshape(()) + 0.25 if k == "noise_strength" else v) for k, v in layer.state_dict().items()}
    layer.load_state_dict(old)
    assert layer.noise_strength.shape == (1,) and float(layer.noise_strength.detach()) == 0.25
    attn = SelfAttention(16)
    attn.load_state_dict({k: (torch.tensor(0.5) if k == "gamma" else v) for k, v in attn.state_dict().items()})
    assert attn.gamma.shape == (1,) and float(attn.gamma.detach()) == 0.5


def test_the_path_length_regulariser_is_refused_under_deepspeed_with_the_reason():
    cfg = load_config(None, ["model.family=gan", "model.arch=stylegan2", "model.preset=tiny", "model.pl_weight=2",
                             "data.resolution=16"])
    fam = build_family(cfg.model, DataInfo(16, 1, 10))
    for stage in (1, 2):
        assert "path-length regulariser" in fam.engine_problem(stage) and "reduce_ipg_grads" in fam.engine_problem(stage)

"""DeepSpeed with mixed precision: every family under ZeRO-2 and ZeRO-3 (unless refused) with 2 processes in bf16,
resumed exactly; the precision comes from distgen's config; likelihoods keep float32 precision under autocast."""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from safetensors.torch import load_file

from distgen import checkpoint as ckpt
from distgen import phema
from distgen.config import load_config
from distgen.families import DataInfo, build_family
from distgen.export.native import export
from matrix import MODELS, _load_raw, differences, edm2_off_sphere, launch_matrix, record_differences, \
    records, snapshot_differences, straight_and_resumed
from test_train import launch, run

pytestmark = [pytest.mark.e2e, pytest.mark.deepspeed]  # 2-process ZeRO-2/3 trainings (make test-fast leaves these out)

# What DeepSpeed cannot do, refused at start with the reason (engine_problem): one network outside its own
# engine in another's phase under ZeRO-3's partitioned parameters, or a double backward through them (SSM,
# FFJORD's trace estimate).
REFUSED = {("autoencoder", 3), ("gan-mlp", 3), ("gan-dcgan", 3), ("gan-biggan", 3), ("gan-stylegan2", 3),
           ("gan-progan", 3), ("pix2pix", 3), ("cyclegan", 3), ("score-ncsn-ssm", 3), ("ebm", 3), ("ebm-jem", 3),
           ("ffjord", 3), ("ffjord-adjoint", 3)}
STAGES = (2, 3)
STEPS, STOP = 4, 2
BF16 = {"mixed_precision": "bf16"}


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, matrix_data):
    """Every model of MODELS under ZeRO-2 and ZeRO-3 in bf16 with 2 processes (parameters, gradients and optimizer
    states really partitioned): 4 steps straight, and 2 steps then a resume to 4. All in one `accelerate launch`
    (tests/scripts/train_matrix.py), each run's stage from the environment its engine is built in."""
    root = tmp_path_factory.mktemp("ds-matrix")
    data = matrix_data
    # ZeRO-2 first: once a ZeRO-3 engine exists, DeepSpeed keeps F.linear replaced by its own for the process
    spec = [straight_and_resumed(root, name, data, STEPS, STOP, BF16, tag=f"-z{stage}",
                                 env={"ACCELERATE_DEEPSPEED_ZERO_STAGE": str(stage)})
            for stage, name in itertools.product(STAGES, MODELS)]
    # activation checkpointing (diffusers' U-Net recomputing its blocks over ZeRO-3's partitioned parameters)
    spec.append(straight_and_resumed(root, "diffusion", data, STEPS, STOP, {**BF16, "activation_checkpointing": True},
                                     tag="-ac-z3", env={"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}))
    # EDM2's power EMAs kept as ZeRO-3 partitions, gathered for a post-hoc EMA snapshot at every step
    spec.append(straight_and_resumed(root, "diffusion-power", data, STEPS, STOP, BF16, tag="-z3",
                                     env={"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}))
    return root, launch_matrix(spec, root, 2, "configs/accelerate/zero2.yaml", timeout=1800)


@pytest.mark.parametrize("name,stage", list(itertools.product(MODELS, STAGES)))
def test_every_family_trains_and_resumes_exactly_in_bf16_under_zero_2_and_3_it_does_not_refuse(matrix, name, stage,
                                                                                               tmp_path):
    root, results = matrix
    rec = results[f"{name}-z{stage}"]
    a, b = root / f"{name}-z{stage}-a", root / f"{name}-z{stage}-b"
    if (name, stage) in REFUSED:
        assert len(rec["calls"]) == 1 and rec["calls"][0]["error"].startswith(f"DeepSpeed ZeRO-{stage}: ")
        assert not (a / "checkpoints").exists()  # refused before any compute
        return
    assert [c.get("rc") for c in rec["calls"]] == [0, 0, 0], rec["calls"]
    last = f"checkpoints/step-{STEPS:08d}"
    # one engine per trained network (a GAN's D and G, the autoencoder's and its discriminator, ...)
    nets = {"gan": {"D", "G"}, "autoencoder": {"ae", "disc"}, "pix2pix": {"D", "G"}, "cyclegan": {"D", "G"}}
    trained = {p.name for p in (a / last / "deepspeed").iterdir()}
    assert trained == nets.get(MODELS[name][0]["family"], trained) and len(trained) >= 1, trained
    # exact resume under ZeRO: DeepSpeed's partitioned optimizer states, the weights and EMAs, bit for bit
    assert differences(a / last, b / last) == []
    assert record_differences(a, b, STOP) == []
    if name in ("diffusion-edm", "diffusion-flow"):
        _check_master_weights(name, stage, b / last / "deepspeed" / "unet" / "state")
    recs = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    # every step finite (a lazy phase that did not run in a record's interval logs null)
    assert recs[-1]["nonfinite_total"] == 0 and all(math.isfinite(r["loss"]) for r in recs), recs
    assert all(math.isfinite(v) for r in recs for k, v in r.items() if k.startswith("loss/") and v is not None)
    # the EMA (float32, as under DDP: DeepSpeed's autocast leaves the weights in float32) samples and exports
    ema = ckpt.load_tensors(next((b / last).glob("ema0-*.safetensors")))
    assert all(t.dtype in (torch.float32, torch.int64, torch.bool) and torch.isfinite(t.float()).all()
               for t in ema.values())
    assert (b / "samples" / f"step-{STEPS:08d}.png").is_file()
    if name not in ("autoencoder", "latent_diffusion"):  # those two calibrate on 2048 images: slow, tested elsewhere
        assert (export(b, tmp_path / "export") / "distgen.json").is_file()


def test_activation_checkpointing_resumes_exactly_under_zero_3(matrix):
    """train.activation_checkpointing under ZeRO-3: 4 steps straight and 2 then a resume, bit for bit; the first
    step's loss is the one without it (the same maths, recomputed)."""
    root, results = matrix
    assert [c.get("rc") for c in results["diffusion-ac-z3"]["calls"]] == [0, 0, 0], results["diffusion-ac-z3"]
    a, b = root / "diffusion-ac-z3-a", root / "diffusion-ac-z3-b"
    last = f"checkpoints/step-{STEPS:08d}"
    assert (a / last / "deepspeed" / "unet").is_dir()
    assert differences(a / last, b / last) == [] and record_differences(a, b, STOP) == []
    assert "activation checkpointing unet" in (root / "launch.out").read_text()  # on (only this run asks)
    assert records(a)[1]["loss"] == records(root / "diffusion-z3-a")[1]["loss"]


def test_post_hoc_ema_snapshots_resume_exactly_under_zero_3(matrix):
    """Power EMAs under ZeRO-3 (each rank holds its partition of them) snapshotted at every step: the same
    snapshots straight and resumed, bit for bit, the same final checkpoint, and each snapshot the EMAs gathered
    whole."""
    root, results = matrix
    assert [c.get("rc") for c in results["diffusion-power-z3"]["calls"]] == [0, 0, 0], results["diffusion-power-z3"]
    a, b = root / "diffusion-power-z3-a", root / "diffusion-power-z3-b"
    last = f"checkpoints/step-{STEPS:08d}"
    assert differences(a / last, b / last) == [] and record_differences(a, b, STOP) == []
    index = phema.read_index(a)
    assert len(index) == STEPS and snapshot_differences(a, b) == []
    # the last snapshot (step 4) is both EMAs as the step-4 checkpoint holds them, gathered whole, in the
    # snapshot's dtype (ema.snapshot_dtype)
    snap = load_file(str(a / phema.SNAPSHOT_DIR / index[-1]["file"]))  # unet/<EMA index>/<parameter name>
    for i in (0, 1):
        ema = ckpt.load_tensors(a / last / f"ema{i}-unet.safetensors")
        assert {k for k in snap if k.startswith(f"unet/{i}/")} == {f"unet/{i}/{k}" for k in ema}
        assert all(snap[f"unet/{i}/{k}"].equal(v.to(snap[f"unet/{i}/{k}"].dtype)) for k, v in ema.items())


def _check_master_weights(name: str, stage: int, state: Path) -> None:
    """DeepSpeed's fp32 master weights, consolidated from the partitions as DeepSpeed's zero_to_fp32 does. EDM2: at
    unit RMS per output channel, as the projection after each step leaves them (distgen.engines.projections; a
    write into the module's weights alone is undone by ZeRO's next step: 1.6e-4 off after 4 steps). ZeRO-2's
    module weights too (ZeRO-3's are partitioned: the master is its only stored copy). DiT: the embedder its
    blocks share is partitioned once, DeepSpeed's consolidation gives every block's name that one tensor, and the
    result loads into a fresh network."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    master = get_fp32_state_dict_from_zero_checkpoint(str(state.parent), tag=state.name)
    if name == "diffusion-edm":
        off = edm2_off_sphere(master)
        assert off < 1e-5
        if stage == 2:
            off = edm2_off_sphere(_load_raw(next(state.glob("mp_rank_*_model_states.pt")))["module"])
            assert off < 1e-5
    else:
        from distgen.families.backbones import build_backbone

        net = build_backbone("dit", 1, MODELS[name][1], 10, MODELS[name][0]["preset"])
        assert len({id(t) for t in master.values()}) == len(list(net.parameters()))  # partitioned once
        shared = [k for k in master if ".norm1.emb." in k and not k.startswith("dit.transformer_blocks.0.")]
        assert shared and all(master[k] is master[re.sub(r"blocks\.\d+\.", "blocks.0.", k)] for k in shared)
        net.load_state_dict(master)  # strict


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_deepspeed_state_with_pickled_code_is_refused_not_run(matrix, tmp_path, env_with_repo):
    """DeepSpeed reads its own files with weights_only=False; distgen hands it a reader that refuses pickled code.
    A copy of the ZeRO-2 run with its model states replaced by a payload that would create a file: the resume
    stops on it, and the file is never created (the same payload does create it when loaded the unsafe way)."""
    import shutil

    root, _ = matrix
    evil = tmp_path / "evil"
    shutil.copytree(root / "diffusion-z2-b", evil)
    cfg = yaml.safe_load((root / "diffusion-z2-b.yaml").read_text())
    cfg["run"]["dir"] = str(evil)
    (tmp_path / "evil.yaml").write_text(yaml.safe_dump(cfg))
    state = evil / "checkpoints" / f"step-{STEPS:08d}" / "deepspeed" / "unet" / "state"
    model_file = next(state.glob("mp_rank_*_model_states.pt"))
    marker = tmp_path / "pwned"
    torch.save({"module": _Evil(str(marker))}, model_file)
    bad = run(launch(2, "configs/accelerate/zero2.yaml") + ["train", str(tmp_path / "evil.yaml"),
                                                             f"train.max_steps={STEPS + 1}"], env_with_repo, check=False)
    assert "Weights only load failed" in bad.stdout + bad.stderr, bad.stdout[-2000:] + bad.stderr[-2000:]
    assert not marker.exists()
    kept = evil / "checkpoints" / f"step-{STEPS:08d}.damaged"  # set aside whole, the run fell back to step 2
    torch.load(kept / model_file.relative_to(state.parent.parent.parent), weights_only=False)  # the payload is live
    assert marker.exists()


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
    """The likelihood maths runs in float32 whatever the network's precision. Under bf16 autocast the ops autocast
    lowers (convolutions, matmuls, attention) round to bf16 (unit roundoff 2^-8), and how far that moves bits/dim
    depends on the weights (broad untrained mixtures move little, sharp trained ones much), so no bound on
    |bf16 - float32| follows from the maths. What does: the same log-likelihood run again in float32 with each of
    those ops returning the bf16 value it gave under autocast gives every later op the very inputs it had. Maths
    in float32 then computes the same float32 values, to the bit; maths run in bf16 would differ by up to 2^-8
    relative (bits/dim off by ~0.02 at 5 bits/dim). The score family's likelihood turns autocast off: there the
    two runs are one float32 computation, equal to the bit without replaying anything."""
    import contextlib

    from torch.overrides import TorchFunctionMode

    from test_eval import _fm_images

    F = torch.nn.functional
    lowered = {F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.linear, torch.matmul,
               torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.bmm, torch.addmm, torch.baddbmm,
               torch.einsum, F.scaled_dot_product_attention}

    class Replay(TorchFunctionMode):
        """Record the lowered ops' outputs (``outs`` empty), or hand them back in the same order."""

        def __init__(self, outs: list):
            super().__init__()
            self.outs, self.replay, self.i = outs, bool(outs), 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func not in lowered:
                return out
            if not self.replay:
                self.outs.append(out)
                return out
            was, self.i = self.outs[self.i], self.i + 1
            assert was.shape == out.shape, (func, was.shape, out.shape)
            return was.to(out.dtype) if was.dtype == torch.bfloat16 else out  # float32 as it was: keep the graph

    x, _ = _fm_images(16)
    x = torch.nn.functional.interpolate(torch.from_numpy(x)[:, None].float(), size=16, mode="area").round()
    cfg = load_config(None, [f"model.family={family}", "model.preset=tiny", "data.resolution=16",
                             *[f"model.{k}={v}" for k, v in extra.items()]])
    fam = build_family(cfg.model, DataInfo(16, 1, 10))
    torch.manual_seed(0)
    nets = {k: v.eval() for k, v in fam.build_networks().items()}
    outs = []

    def bpd(bf16: bool) -> torch.Tensor:
        gens = [torch.Generator().manual_seed(i) for i in range(len(x))]
        replay = Replay(outs) if family != "score" else contextlib.nullcontext()  # hooks slow its ODE tenfold
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), replay:
            logp = fam.log_likelihood(nets, x.to(torch.uint8), None, gens)
        assert logp.dtype in (torch.float32, torch.float64)
        return -logp.double() / (16 * 16 * math.log(2))

    low = bpd(True)
    assert family == "score" or any(o.dtype == torch.bfloat16 for o in outs)  # the networks did run in bf16
    same_inputs = bpd(False)
    assert torch.isfinite(low).all() and torch.equal(low, same_inputs), (low - same_inputs).abs().max()


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

"""Shared by the suite's matrices (families x processes x engines): every family at its smallest, their configs,
one launch that trains many of them (tests/scripts/train_matrix.py), and the bitwise comparison of two
checkpoints that exact resume promises."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from conftest import REPO
from distgen.telemetry import PACE_KEYS

ACCEL = [sys.executable, "-m", "accelerate.commands.launch"]
# The shared runs (conftest.trained): checkpoints every 2 steps; the stop at 3 falls between two, and the resume
# restarts the data stream at 4, as the straight run does.
STEPS, STOP = 6, 3
TRAIN = {"checkpoint_every": 2, "keep_checkpoints": 2}

# Each family at its smallest, with the parts an engine has to cope with switched on: a GAN's two engines and
# lazy R1 (and ADA's state), StyleGAN2's learned scalars, BigGAN's attention scalar, the autoencoder's
# discriminator, latent diffusion's frozen autoencoder, Glow's data-dependent init, CycleGAN's image histories,
# the EBM's replay buffer. (name -> (model section, resolution))
MODELS: dict[str, tuple[dict, int]] = {
    "diffusion": ({"family": "diffusion", "preset": "tiny", "sample_steps": 2}, 8),
    # EDM2: EDM's preconditioning with the learned uncertainty (a second module in the trained network) on the
    # magnitude-preserving U-Net (weights renormalised in place each step), sampled by Heun. SiT: rectified flow's
    # logit-normal, shifted times on a class-conditional DiT (one embedder shared by every block). The U-Net
    # backbone is the ddpm entry's; every formulation x backbone pair trains in tests/test_formulations.py.
    "diffusion-edm": ({"family": "diffusion", "backbone": "edm2", "preset": "tiny", "formulation": "edm",
                       "edm_uncertainty": True, "sample_steps": 2}, 8),
    "diffusion-flow": ({"family": "diffusion", "backbone": "dit", "preset": "tiny", "formulation": "flow",
                        "flow_shift": 3.0, "class_conditional": True, "sample_steps": 2}, 8),
    "latent_diffusion": ({"family": "latent_diffusion", "preset": "tiny", "sample_steps": 2}, 16),
    "autoencoder": ({"family": "autoencoder", "preset": "tiny", "disc_weight": 0.1}, 16),
    "gan-mlp": ({"family": "gan", "arch": "mlp", "preset": "tiny"}, 8),
    # ADA's accumulators mid-interval at the stop (2 D steps a step, p updated every 4th)
    "gan-dcgan": ({"family": "gan", "arch": "dcgan", "preset": "tiny", "r1_gamma": 1.0, "r1_every": 2,
                   "augment": "ada", "ada_interval": 4, "ada_kimg": 0.05, "ada_target": 0.0, "d_steps": 2}, 16),
    "gan-biggan": ({"family": "gan", "arch": "biggan", "preset": "tiny", "loss": "hinge"}, 16),
    "gan-stylegan2": ({"family": "gan", "arch": "stylegan2", "preset": "tiny", "r1_gamma": 1.0, "r1_every": 2}, 16),
    # ProGAN: blocks not yet grown take part through a zero term; resumes land in the middle of a fade (2 images a
    # process at 4x4, 4 from 8x8 on); its default wgan-gp's penalty differentiates the critic through the plain
    # module beside its engine's forwards
    "gan-progan": ({"family": "gan", "arch": "progan", "preset": "tiny", "stable_kimg": 0.004, "fade_kimg": 0.016,
                    "batch_sizes": [2]}, 16),
    "vae": ({"family": "vae", "arch": "vae", "preset": "tiny", "beta": 2.0, "likelihood": "gaussian"}, 8),
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


# Runs of a family of MODELS with other settings (sections merged over the family's): EDM2's power EMAs with a
# snapshot every step (of 2 processes); VDVAE's stabiliser holding updates, with the KL warm-up and free bits
VARIANTS = {
    "diffusion-power": ("diffusion", {"ema": {"kind": "power", "power_stds": [0.05, 0.1], "snapshot_kimg": 0.008}}),
    # ... and with activation checkpointing (its latent groups' draws from the loss's generator replayed)
    "hvae-stabilised": ("hvae", {"model": {"free_bits": 0.05, "kl_warmup_kimg": 0.02},
                                 "train": {"skip_grad_norm": 4.0, "activation_checkpointing": True}}),
    # channels_last and fused AdamW (its skip on the device) on EDM2 (MP layers, the engine's weight projection, the
    # uncertainty head), one process; compile resumes exactly in tests/test_speed.py (the U-Net: a cold compile of
    # EDM2 took 74 s of the suite's one-process matrix)
    "diffusion-fast": ("diffusion-edm", {"train": {"channels_last": True, "optimizer_impl": "fused"}}),
}
# The formulation x backbone pairs MODELS does not hold (it has ddpm x unet, edm x edm2, flow x dit): each resumes
# exactly with 1 and 2 processes (tests/test_resume.py), plain EDM (no uncertainty) and flow's uniform times
PAIRS = {f"diffusion-{f}-{b}": ("diffusion", {"model": {"formulation": f, "backbone": b}})
         for f, b in [("edm", "unet"), ("flow", "unet"), ("ddpm", "dit"), ("ddpm", "edm2"), ("edm", "dit"),
                      ("flow", "edm2")]}
VARIANTS.update(PAIRS)


def data_sets(root: Path, fm_test_shards: Path) -> dict[str, dict]:
    """The data section each family trains on: the test split, the paired edges task (pix2pix), two class domains
    (CycleGAN); and an untrained tiny autoencoder folder for latent diffusion. Made once under ``root``."""
    from diffusers import AutoencoderKL

    from distgen.data import shard_source
    from distgen.families.autoencoder import autoencoder_kwargs

    if not (root / "ae" / "config.json").is_file():
        torch.manual_seed(0)
        AutoencoderKL(**autoencoder_kwargs("tiny", 1, 16), scaling_factor=0.7).save_pretrained(root / "ae")
        shard_source("fashion-mnist:edges", root / "edges", "test", 5000)
        shard_source("fashion-mnist:classes=Sneaker/Ankle boot", root / "boots", "test", 1000)
    return {"*": {"train": [str(fm_test_shards)]},
            "pix2pix": {"train": [str(root / "edges" / "test.manifest.json")]},
            "cyclegan": {"train": [str(root / "boots" / "testA.manifest.json")],
                         "train_b": [str(root / "boots" / "testB.manifest.json")]},
            "ae": str(root / "ae")}


def family_config(root: Path, name: str, run: str, data: dict, train: Optional[dict] = None,
                  ema: Optional[dict] = None) -> Path:
    """``root/<run>.yaml``: model ``name`` of MODELS (or of VARIANTS) trained into ``root/<run>``, batch 4,
    checkpoints and records as ``train`` says."""
    over: dict = {}
    if name in VARIANTS:
        name, over = VARIANTS[name]
    model, res = MODELS[name]
    model = {**model, **({"autoencoder": data["ae"]} if name == "latent_diffusion" else {}), **over.get("model", {})}
    train = {**(train or {}), **over.get("train", {})}
    ema = over.get("ema", ema)
    cfg = {"run": {"dir": str(root / run), "seed": 1}, "model": model,
           "data": {**data["*"], **data.get(name, {}), "resolution": res, "resize": "stretch", "workers": 0,
                    "shuffle_buffer": 50},
           "train": {"batch_size": 4, "total_kimg": 1, "log_every": 1, "checkpoint_every": 100, "sample_every": 0,
                     "sample_num": 1, **(train or {})},
           "ema": ema or {"halflife_kimg": [0.05, 0.2], "rampup": None}}
    path = root / f"{run}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch_matrix(spec: list[dict], root: Path, nproc: int, accel_config: str, timeout: int = 1200,
                  prefix: tuple[str, ...] = ()) -> dict:
    """One `accelerate launch` of tests/scripts/train_matrix.py over ``spec`` (run under ``prefix``, e.g. strace);
    returns {name: record}. Its stdout is kept in ``root/launch.out``."""
    import subprocess

    from distgen.dist import free_port

    (root / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or str(max(1, 2 // nproc))}
    cmd = [*prefix, *ACCEL, "--config_file", accel_config, "--num_processes", str(nproc), "--main_process_port",
           str(free_port()), str(REPO / "tests/scripts/train_matrix.py"), str(root / "spec.json"),
           str(root / "out.json")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    (root / "launch.out").write_text(r.stdout)  # the runs' start-up lines, for tests that check what a run chose
    (root / "launch.err").write_text(r.stderr)
    assert r.returncode == 0 and (root / "out.json").is_file(), r.stdout[-3000:] + r.stderr[-5000:]
    return read_matrix(root)


def read_matrix(root: Path) -> dict:
    """What launch_matrix returned for ``root``: {name: record}."""
    return {rec["name"]: rec for rec in json.loads((root / "out.json").read_text())}


def straight_and_resumed(root: Path, name: str, data: dict, steps: int, stop: int, train: Optional[dict] = None,
                         env: Optional[dict] = None, tag: str = "") -> dict:
    """A SPEC item: ``steps`` steps straight (``<name><tag>-a``), and ``stop`` steps then a resume to ``steps``
    (``<name><tag>-b``), of the same config (train.max_steps ends each call; the run's length, and so its
    schedules, stay those of train.total_kimg)."""
    calls = []
    for run, last in ((f"{name}{tag}-a", steps), (f"{name}{tag}-b", stop), (f"{name}{tag}-b", steps)):
        calls.append({"config": str(family_config(root, name, run, data, train)),
                      "overrides": [f"train.max_steps={last}"], "env": env or {}})
    return {"name": name + tag, "calls": calls}


def edm2_off_sphere(weights: dict[str, torch.Tensor]) -> float:
    """How far the stored MPConv weights of the ``diffusion-edm`` entry (EDM2 wrapped with its uncertainty: keys
    ``unet.<module>.weight``) are from what the engine's projection after each optimizer step leaves: every output
    channel's row at RMS r / (r + 1e-4) for its RMS r before (EDM2's normalize), 1 / (1 + 1e-4) within ~1e-8 after
    a step. Steps without the projection leave more (1.6e-4 after 4 steps, growing), as would any path where the
    projection is lost (DeepSpeed's fp32 master copy)."""
    from distgen.families.backbones import build_backbone
    from distgen.families.backbones.edm2 import MPConv

    net = build_backbone("edm2", 1, MODELS["diffusion-edm"][1], 0, MODELS["diffusion-edm"][0]["preset"])
    names = [f"unet.{n}.weight" for n, m in net.named_modules() if isinstance(m, MPConv)]
    assert names and all(n in weights for n in names), sorted(set(names) - set(weights))[:3]
    rms = [weights[n].detach().double().reshape(weights[n].shape[0], -1).square().mean(1).sqrt() for n in names]
    return max(float((r * (1 + 1e-4) - 1).abs().max()) for r in rms)


# --------------------------------------------------------------------------- exact resume
def _flat(state: Any, prefix: str = "") -> dict[str, Any]:
    """A nested state (optimizer, scaler, DeepSpeed's files) as {path: leaf}."""
    if isinstance(state, dict):
        out = {}
        for k, v in state.items():
            out.update(_flat(v, f"{prefix}/{k}"))
        return out
    if isinstance(state, (list, tuple)):
        out = {}
        for i, v in enumerate(state):
            out.update(_flat(v, f"{prefix}/{i}"))
        return out
    if hasattr(state, "__dict__") and not torch.is_tensor(state) and not isinstance(state, type):
        return _flat(vars(state), f"{prefix}<{type(state).__name__}>")  # DeepSpeed's loss scaler
    return {prefix: state}


def _load_pt(path: Path) -> dict:
    """An optimizer, scaler or DeepSpeed state, loaded as distgen loads it (no pickled code), flattened."""
    return _flat(_load_raw(path))


def zero3_real_elements(state_dir: Path, rank: int) -> dict[int, torch.Tensor]:
    """ZeRO-3: which elements of ``rank``'s flat partitions (fp32_flat_groups/<g>, and Adam's exp_avg/exp_avg_sq of
    sub-group g) hold parameters, as bool masks {g: mask}; {} for another stage. The rest is padding: ZeRO-3 splits
    every parameter into ceil(numel / world) elements per rank, and the last ranks' share past numel is
    uninitialized memory (torch.empty) that no gather ever reads. The layout is zero_to_fp32.py's: the
    parameters' shapes in flat order (model_states' param_shapes, one dict per group), the world size
    (optim_states' partition_count)."""
    import math

    optim = _load_raw(state_dir / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")["optimizer_state_dict"]
    if int(optim.get("zero_stage", 0)) != 3:  # ZeroStageEnum.weights
        return {}
    world = int(optim["partition_count"])
    shapes = _load_raw(state_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt")["param_shapes"]
    real = []
    for group in shapes:
        for shape in group.values():
            n, part = math.prod(shape), math.ceil(math.prod(shape) / world)
            real.append(torch.arange(part) < max(0, min(part, n - rank * part)))
    flat = torch.cat(real) if real else torch.zeros(0, dtype=torch.bool)
    sizes = [t.numel() for t in optim["fp32_flat_groups"]]
    assert sum(sizes) == flat.numel(), (sizes, flat.numel())
    return dict(enumerate(flat.split(sizes)))


def _load_raw(path: Path):
    """An optimizer, scaler or DeepSpeed state, loaded as distgen loads it (no pickled code)."""
    from distgen.engines_deepspeed import safe_globals as deepspeed_types

    with torch.serialization.safe_globals(deepspeed_types()):
        return torch.load(path, map_location="cpu", weights_only=True)


def _real_only(flat: dict[str, Any], masks: dict[int, torch.Tensor]) -> dict[str, Any]:
    """A flattened ZeRO-3 optimizer state with its flat tensors cut to the real elements (padding dropped)."""
    import re

    out = dict(flat)
    for k, v in flat.items():
        m = re.fullmatch(r"/optimizer_state_dict/(?:fp32_flat_groups|optimizer_state_dict/state)/(\d+)"
                         r"(?:/exp_avg|/exp_avg_sq)?", k)
        if m and torch.is_tensor(v) and int(m.group(1)) in masks and v.numel() == masks[int(m.group(1))].numel():
            out[k] = v[masks[int(m.group(1))]]
    return out


def _same(a: Any, b: Any) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and \
            torch.equal(a, b)
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:  # NaN == NaN here
        return True
    return a == b


# meta.json: what records the run's history rather than its state ("reason" differs: the resumed run's last
# checkpoint is its own end, like the straight run's)
_META_STATE = ("step", "nimg", "data_start_step", "data_skip", "counters", "ema_steps", "family_state", "best",
               "world_size", "global_batch", "world_size_changes", "reason")


def differences(a: Path, b: Path) -> list[str]:
    """What differs between two checkpoint folders, bitwise: every safetensors tensor (weights, EMAs, the family's
    per-rank state, RNG states), every optimizer, scaler and DeepSpeed state (loaded without running code), and
    meta.json's state. Empty when the checkpoints are the same."""
    from safetensors.torch import load_file

    from distgen import checkpoint as ckpt

    missing = [str(p) for p in (a, b) if not (p / "meta.json").is_file()]
    if missing:
        return [f"not a checkpoint: {', '.join(missing)}"]
    out = []
    fa = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    fb = sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    if fa != fb:
        return [f"files differ: {sorted(set(fa) ^ set(fb))}"]
    for rel in fa:
        pa, pb = a / rel, b / rel
        if pa.parent.name.endswith(".dcp"):  # DCP's files (sharded): compared as the tensors and values they hold,
            if pa.name != ".metadata":       # read whole once (.metadata's bytes hold the folder's path and an id)
                continue
            from distgen import checkpoint_dcp

            ta, tb = _flat(checkpoint_dcp.read_full(pa.parent)), _flat(checkpoint_dcp.read_full(pb.parent))
        elif rel.endswith(".safetensors"):
            ta, tb = load_file(str(pa)), load_file(str(pb))
        elif rel.endswith(".pt"):
            ta, tb = _load_pt(pa), _load_pt(pb)
            if rel.endswith("_optim_states.pt"):  # ZeRO-3's padding is garbage: compare the real elements
                rank = int(Path(rel).name.split("_")[3])  # zero_pp_rank_<r>_mp_rank_00_optim_states.pt
                masks = zero3_real_elements(pa.parent, rank)  # the same layout in b (else model_states differ)
                ta, tb = _real_only(ta, masks), _real_only(tb, masks)
        elif rel == "meta.json":
            ma, mb = ckpt.read_meta(a), ckpt.read_meta(b)
            ta, tb = {k: ma.get(k) for k in _META_STATE}, {k: mb.get(k) for k in _META_STATE}
        else:  # rng-<rank>.json, DeepSpeed's "latest" and the like
            ta, tb = {"": pa.read_bytes()}, {"": pb.read_bytes()}
        if ta.keys() != tb.keys():
            out.append(f"{rel}: keys differ: {sorted(set(ta) ^ set(tb))[:5]}")
            continue
        bad = [k for k in ta if not _same(ta[k], tb[k])]
        if bad:
            out.append(f"{rel}: {len(bad)} of {len(ta)} differ, e.g. {bad[0]}")
    return out


def records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())}


_PACE = PACE_KEYS  # the machine's pace and memory: a straight and a resumed run differ there only


def record_differences(a: Path, b: Path, stop: int, log_every: int = 1) -> list[str]:
    """metrics.jsonl of a straight and a resumed run: every record the same (pace aside). When the stop falls
    between records, the stopped run logged at its stop too, so the straight run's next record covers more steps
    than the resumed run's: those two are left out."""
    ra, rb = records(a), records(b)
    skip = set() if stop % log_every == 0 else {stop, min((s for s in ra if s > stop), default=-1)}
    out = []
    for s in sorted(set(ra) | set(rb)):
        if s in skip:
            continue
        if s not in ra or s not in rb:
            out.append(f"step {s}: logged by one run only")
            continue
        da = {k: v for k, v in ra[s].items() if k not in _PACE}
        db = {k: v for k, v in rb[s].items() if k not in _PACE}
        bad = [k for k in da if not _same(da[k], db.get(k))] + [k for k in db if k not in da]
        if bad:
            out.append(f"step {s}: {bad[:4]} differ")
    return out


def snapshot_differences(a: Path, b: Path) -> list[str]:
    """Post-hoc EMA snapshots of two runs: the same sample counts, and each file's tensors bit for bit (not the
    files' hashes: safetensors writes its metadata in a hash map's order)."""
    from safetensors.torch import load_file

    from distgen import phema

    ia, ib = phema.read_index(a), phema.read_index(b)
    if [e["nimg"] for e in ia] != [e["nimg"] for e in ib]:
        return [f"snapshots at {[e['nimg'] for e in ia]} and {[e['nimg'] for e in ib]}"]
    out = []
    for ea, eb in zip(ia, ib):
        ta, tb = (load_file(str(r / phema.SNAPSHOT_DIR / e["file"])) for r, e in ((a, ea), (b, eb)))
        if ta.keys() != tb.keys() or not all(ta[k].equal(tb[k]) for k in ta):
            out.append(ea["file"])
    return out
